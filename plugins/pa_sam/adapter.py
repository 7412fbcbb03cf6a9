"""Prompt adapter: dense prompt compensation, adaptive detail enhancement and the refined token.

Runs inside one two-way transformer layer, after its token-to-image attention. With the layer's
tokens Q (N, T, C), image tokens K (N, hw, C), their positional encodings and the guide g (N, hw, C):

    G   = g ⊙ K                                              (dense prompt compensation)
    A   = Attn(q = Q + PE_Q, k = G + PE_K, v = G)             (token-to-image attention, no residual)
    m   = A[:, 1]                                             (the adapted single-mask token)
    t_U = MLP_U([e_U ; m]),  t_R = MLP_R([e_R ; m])           (uncertain and refined tokens)
    M_C = m · Gᵀ,  M_R = t_R · Gᵀ,  M_U = σ(t_U · Gᵀ)          (coarse, refined, uncertainty; h x w)

and the mask token becomes the refined token: A' = A with A'[:, 1] = t_R. The MLPs are
2C -> C/4 -> C/4 -> C with ReLU (512 -> 64 -> 64 -> 256 for SAM); the attention is SAM's decoder
``Attention`` with SAM's head count and downsampling (256-d, 8 heads, downsample 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from samflow.sam import attend

#: Position of SAM's single-mask token among the decoder's output tokens [iou, mask_0..3, ...].
MASK_TOKEN = 1


@dataclass
class AdapterOutput:
    """What the prompt adapter returns for one layer."""

    tokens: Tensor  # (N, T, C) A' (the adapted tokens, mask token replaced by t_R)
    guided: Tensor  # (N, hw, C) G = g ⊙ K
    coarse: Tensor  # (N, 1, h, w) M_C logits
    refined: Tensor  # (N, 1, h, w) M_R logits
    uncertainty: Tensor  # (N, 1, h, w) t_U · Gᵀ, the logits of M_U


class PromptAdapter(nn.Module):
    """The prompt adapter's parameters and forward (see the module docstring).

    Args:
        dim: SAM's decoder width C.
        num_heads: heads of the adapter attention.
        downsample_rate: internal width of the attention is ``dim // downsample_rate``.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int) -> None:
        super().__init__()
        self.static_uncertain_token = nn.Embedding(1, dim)  # e_U
        self.static_refined_token = nn.Embedding(1, dim)  # e_R
        self.uncertain_mlp = MLP(2 * dim, dim // 4, dim, 3)  # MLP_U
        self.refined_mlp = MLP(2 * dim, dim // 4, dim, 3)  # MLP_R
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=downsample_rate)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        guide: Tensor,
        grid: tuple[int, int],
    ) -> AdapterOutput:
        """Args are the layer's state (see ``DecoderState``), the guide g (N, hw, C) and the grid (h, w)."""
        guided = guide * keys  # G (N, hw, C)
        adapted = attend(self.cross_attn_token_to_image, queries + query_pe, guided + key_pe, guided)  # A
        mask_token = adapted[:, MASK_TOKEN]  # m (N, C)
        rows = mask_token.shape[0]
        e_u = self.static_uncertain_token.weight.expand(rows, -1)
        e_r = self.static_refined_token.weight.expand(rows, -1)
        uncertain = self.uncertain_mlp(torch.cat([e_u, mask_token], dim=-1))  # t_U (N, C)
        refined = self.refined_mlp(torch.cat([e_r, mask_token], dim=-1))  # t_R (N, C)

        def project(token: Tensor) -> Tensor:  # (N, C) -> (N, 1, h, w): token · Gᵀ
            return (token.unsqueeze(1) @ guided.transpose(1, 2)).unflatten(-1, grid)

        before, after = adapted[:, :MASK_TOKEN], adapted[:, MASK_TOKEN + 1 :]
        tokens = torch.cat([before, refined.unsqueeze(1), after], dim=1)  # A'
        return AdapterOutput(
            tokens=tokens,
            guided=guided,
            coarse=project(mask_token),
            refined=project(refined),
            uncertainty=project(uncertain),
        )
