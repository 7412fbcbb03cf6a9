"""What an image encoder other than SAM's ViT provides so that ``HookedSam`` runs it with hook sites.

``HookedSam.run_encoder`` drives every encoder the same way: ``embed`` -> ``on_image`` ->
``add_position`` -> for each block i: ``block_input(i)`` -> ``run_block(i)`` -> ``block_output(i)`` ->
``neck``. Between hooks the activations are channels-last (B, h, w, C), as in SAM's ViT, whatever
layout the backbone uses inside a block. Blocks are numbered over the whole encoder in run order, so
``encoder_features`` and the block hooks take one index, as for SAM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

if TYPE_CHECKING:
    from samflow.sam.types import ForwardContext, HookSites


class Backbone(nn.Module):
    """An image encoder with SAM's hook sites, used as ``Sam.image_encoder``.

    Subclasses provide ``img_size``, ``blocks`` (a sequence of the units the block hooks see, in run
    order),
    ``neck`` (channels-first in, SAM's embedding (B, 256, h, w) out), ``early_block`` (the block whose
    output HQ-SAM-style plugins fuse as the early, local-detail feature), ``block_channels``,
    ``embed``, ``add_position`` and ``run_block``. ``forward`` is the plain encoder (no hooks).
    """

    img_size: int
    early_block: int
    blocks: list[nn.Module] | nn.ModuleList
    neck: nn.Module
    #: state-dict keys (prefixes, without ``image_encoder.``) of official checkpoints that the
    #: architecture has but SAM never runs; dropped, by name, when a checkpoint is loaded
    unused_checkpoint_keys: tuple[str, ...] = ()
    #: whether the official checkpoints hold SAM's own prompt encoder and mask decoder (MobileSAM) or a
    #: decoder of their own that SAM's modules do not compute (EfficientSAM): then only the image
    #: encoder is loaded from them
    checkpoint_has_sam_decoder: bool = True

    def __init__(self, img_size: int) -> None:
        super().__init__()
        if img_size <= 0 or img_size % 16:
            raise ValueError(f"{type(self).__name__}: img_size {img_size} is not a positive multiple of 16.")
        self.img_size = img_size

    def block_channels(self, i: int) -> int:
        """Channels of block ``i``'s output (what ``block_output(i)`` and ``features[i]`` hold)."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, S, S) -> the first tokens (B, h0, w0, C0), as ``on_image`` sees them."""
        raise NotImplementedError

    def add_position(self, tokens: Tensor) -> Tensor:
        """Add absolute position embeddings (none by default)."""
        return tokens

    def run_block(self, i: int, x: Tensor, hooks: HookSites | None, ctx: ForwardContext | None) -> Tensor:
        """Block ``i`` on (B, h, w, C) -> (B, h', w', C'), calling ``attn_logits(i)`` where it has attention."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """The encoder without hooks: normalised images (B, 3, S, S) -> embeddings (B, 256, h, w)."""
        x = self.add_position(self.embed(x))
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, None, None)
        return self.neck(x.permute(0, 3, 1, 2))


def sam_neck(dim: int, out_chans: int) -> nn.Sequential:
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d; (B, dim, h, w) -> (B, out_chans, h, w)."""
    return nn.Sequential(
        nn.Conv2d(dim, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )


def channels_last(conv: nn.Module, x: Tensor) -> Tensor:
    """Apply a channels-first module to channels-last ``x``: (B, h, w, C) -> (B, h', w', C')."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def attention(
    i: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None,
    hooks: HookSites | None,
    ctx: ForwardContext | None,
) -> Tensor:
    """softmax(scale * q k^T + bias) v through SDPA, with the ``attn_logits(i)`` site.

    q, k, v: (B, heads, L, d); bias broadcastable to (B, heads, L, L). -> (B, heads, L, d_v)
    """
    logit_scale: float | Tensor = scale
    if hooks is not None and ctx is not None and hooks.uses("attn_logits"):
        logit_scale, bias = hooks.attn_logits(i, logit_scale, bias, q, ctx)
    if isinstance(logit_scale, Tensor):
        q, logit_scale = q * logit_scale, 1.0
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=logit_scale)
