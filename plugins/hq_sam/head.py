"""One HQ-SAM-style output head: a learnable token, its kernel MLP and the global-local fusion.

HQ-SAM has one; WSI-SAM has two (a high- and a low-resolution head) on the same frozen SAM. With C
the decoder width and C_vit the encoder width, a head holds (names as in the references):

- ``hf_token`` (1, C): the extra output token;
- ``hf_mlp`` (C -> C -> C -> C/8): the updated token -> a dynamic kernel k;
- ``compress_vit_feat``, ``embedding_encoder``, ``embedding_maskfeature``: the fusion of ``fusion.py``.

    features = refine(F_up) + up_vit(F_early) + up_emb(F_emb)      (N, C/8, 4h, 4w)
    mask     = k . features                                        (N, 1, 4h, 4w)
"""

from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn

from samflow_plugins.hq_sam.fusion import refine_3x3, upsample_x4


class HQHead(nn.Module):
    """The modules of one HQ-style head; ``build_head`` creates them once SAM's widths are known.

    ``HQSam`` is an ``HQHead`` itself (its parameter names stay ``hf_token``, ...); other plugins
    hold heads with ``HQHead.create``.
    """

    hf_token: nn.Embedding
    hf_mlp: MLP
    compress_vit_feat: nn.Sequential
    embedding_encoder: nn.Sequential
    embedding_maskfeature: nn.Sequential

    @classmethod
    def create(cls, vit_dim: int, dim: int) -> HQHead:
        """A head for encoder width ``vit_dim`` (C_vit) and decoder width ``dim`` (C)."""
        head = cls()
        head.build_head(vit_dim, dim)
        return head

    def build_head(self, vit_dim: int, dim: int) -> None:
        """Create the five modules (PyTorch's default initialisation, as the references)."""
        self.hf_token = nn.Embedding(1, dim)  # the extra output token
        self.hf_mlp = MLP(dim, dim, dim // 8, 3)  # token -> dynamic kernel (C/8)
        self.compress_vit_feat = upsample_x4(vit_dim, dim, dim // 8)  # F_early -> (C/8, 4h, 4w)
        self.embedding_encoder = upsample_x4(dim, dim // 4, dim // 8)  # F_emb -> (C/8, 4h, 4w)
        self.embedding_maskfeature = refine_3x3(dim // 8, dim // 4)  # F_up -> (C/8, 4h, 4w)

    def fused_features(
        self, early: Tensor, embeddings: Tensor, upscaled: Tensor, image_index: Tensor
    ) -> Tensor:
        """Global-local fusion (N, C/8, 4h, 4w) from early features (B, h, w, C_vit), embeddings
        (B, C, h, w) and SAM's upscaled features of each row (N, C/8, 4h, 4w); the image terms are
        computed once per image and shared by its rows (``image_index`` (N,))."""
        per_image = self.compress_vit_feat(early.permute(0, 3, 1, 2)) + self.embedding_encoder(embeddings)
        return self.embedding_maskfeature(upscaled) + rows_of(per_image, image_index)

    def kernel(self, token: Tensor) -> Tensor:
        """The updated token (N, C) -> its dynamic kernel (N, C/8)."""
        return self.hf_mlp(token)


def rows_of(per_image: Tensor, image_index: Tensor) -> Tensor:
    """``per_image[image_index]``: the (B, ...) image terms of each prompt row (N, ...).

    With one row per image, in order (``image_index`` = 0..B-1, checked on the CPU only, where it
    costs no wait for a device), ``per_image`` itself: the same values without the gather's copy and
    the scatter of its backward ((2, 32, 256, 256) at 1024 px).
    """
    rows = image_index.shape[0]
    if (
        image_index.device.type == "cpu"
        and rows == per_image.shape[0]
        and torch.equal(image_index, torch.arange(rows, dtype=image_index.dtype))
    ):
        return per_image
    return per_image[image_index]


def apply_kernel(kernel: Tensor, features: Tensor) -> Tensor:
    """``k . features``: kernel (N, C/8) on features (N, C/8, H, W) -> mask logits (N, 1, H, W)."""
    return (kernel.unsqueeze(1) @ features.flatten(2)).unflatten(-1, features.shape[-2:])
