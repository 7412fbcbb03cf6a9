"""Hard point mining: pick uncertain cells where the refined and coarse maps disagree, make them tokens.

Sampling guidance (h x w grid, flattened to L = hw cells):

    S = M_U ⊙ (σ(M_R) − σ(M_C))

Positive points are the ``k`` cells chosen from ``S``, negative points the ``k`` cells chosen from
``−S``. In training the choice is a Gumbel top-k with a straight-through estimator, so the loss
reaches ``S`` (and through it M_U, M_R, M_C) via the selection weights; in evaluation it is a plain,
deterministic top-k.

Each chosen cell (i, j) becomes a point token for the remaining decoder layers:

    PE      = w · PE_SAM((j + ½) / w_grid, (i + ½) / h_grid) + e_±     (SAM's frozen encodings)
    content = w · (keys + G)[i, j]

with ``w`` the selection weight (1 in value; its gradient is the straight-through one) and ``e_+`` /
``e_−`` SAM's learned positive / negative point embeddings (``point_embeddings[1]`` / ``[0]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import Tensor, nn

from samflow.sam import fourier_pe, upcast


def sampling_guidance(coarse: Tensor, refined: Tensor, uncertainty: Tensor) -> Tensor:
    """S = M_U ⊙ (σ(M_R) − σ(M_C)) from the three maps (N, 1, h, w) -> (N, h*w).

    ``coarse`` and ``refined`` are logits, ``uncertainty`` is the probability M_U.
    """
    return (uncertainty * (refined.sigmoid() - coarse.sigmoid())).flatten(1)


def gumbel_topk(
    scores: Tensor, k: int, tau: float = 1.0, uniform: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gumbel top-k with a straight-through estimator over the last dimension.

    With g = s + Gumbel(0, 1) noise, h_0 = 0, khot_0 = 0, for t = 1..k:

        g ← g + log(max(1 − h_{t−1}, ε)),   h_t = softmax(g / τ),   khot ← khot + h_t

    then hard = one-hot(top-k(khot)) and the returned selection is hard − sg(khot) + khot: exactly the
    k-hot ``hard`` in value (up to rounding at the chosen cells), the soft ``khot`` in gradient.

    Args:
        scores: (N, L) scores s.
        k: how many cells to choose (at most L).
        tau: the softmax temperature τ.
        uniform: the U(0, 1) draws (N, L) behind the Gumbel noise (the plugin's come from
            ``ctx.rand``, one generator per row); None draws them from the global generator.

    Returns:
        The straight-through selection (N, L) and the chosen cells (N, k), k distinct per row,
        in increasing order (raster order on a grid, as the reference gathers them).
    """
    tiny = torch.finfo(scores.dtype).tiny
    if uniform is None:
        uniform = torch.rand_like(scores)
    uniform = uniform.to(scores.dtype).clamp(min=tiny, max=1.0 - torch.finfo(scores.dtype).eps)
    g = scores - torch.log(-torch.log(uniform))
    soft = torch.zeros_like(scores)
    khot = torch.zeros_like(scores)
    for _ in range(k):
        g = g + torch.log((1.0 - soft).clamp(min=tiny))
        soft = torch.softmax(g / tau, dim=-1)
        khot = khot + soft
    cells = khot.topk(k, dim=-1).indices.sort(dim=-1).values
    hard = torch.zeros_like(khot).scatter(-1, cells, 1.0)
    return hard - khot.detach() + khot, cells


def topk_cells(scores: Tensor, k: int) -> Tensor:
    """The k highest-scoring cells of each row (N, L) -> (N, k), in increasing order (deterministic)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def choose_cells(
    scores: Tensor, k: int, tau: float, sample: bool, uniform: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Chosen cells (N, k) and their selection weights (N, k): Gumbel top-k if ``sample`` else top-k.

    The weights are 1 in value; in sampling mode they carry the straight-through gradient to ``scores``
    (``uniform``: the draws behind the noise, as ``gumbel_topk``).
    """
    if sample:
        selection, cells = gumbel_topk(scores, k, tau, uniform)
        return cells, selection.gather(-1, cells)
    cells = topk_cells(scores, k)
    return cells, torch.ones_like(cells, dtype=scores.dtype)


def cell_centres(cells: Tensor, grid: tuple[int, int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Flat cell indices (N, k) on an h x w grid -> centres (x, y) normalised to [0, 1], (N, k, 2)."""
    h, w = grid
    x = (cells % w).to(dtype) + 0.5
    y = torch.div(cells, w, rounding_mode="floor").to(dtype) + 0.5
    return torch.stack([x / w, y / h], dim=-1)


@dataclass
class HardPoints:
    """The mined point tokens of one forward: 2k per row, positives first."""

    content: Tensor  # (N, 2k, C) w · (keys + G) at the cells
    pe: Tensor  # (N, 2k, C) w · PE(cell centre) + SAM's point embedding
    cells: Tensor  # (N, 2k) flat cell indices on the h x w grid
    labels: Tensor  # (N, 2k) 1 for positive, 0 for negative points


def mine_hard_points(
    guidance: Tensor,
    features: Tensor,
    grid: tuple[int, int],
    pe_layer: PositionEmbeddingRandom,
    point_embeddings: Sequence[nn.Embedding],
    k: int,
    tau: float = 1.0,
    sample: bool = False,
    uniforms: tuple[Tensor, Tensor] | None = None,
) -> HardPoints:
    """Choose k positive and k negative cells from the guidance and turn them into point tokens.

    Args:
        guidance: S (N, h*w).
        features: token content at every cell, keys + G (N, h*w, C).
        grid: (h, w).
        pe_layer: SAM's frozen ``PositionEmbeddingRandom`` (``prompt_encoder.pe_layer``).
        point_embeddings: SAM's frozen point embeddings ([0] negative, [1] positive).
        k: points per sign.
        tau: Gumbel-softmax temperature.
        sample: Gumbel top-k with straight-through (training) instead of plain top-k (evaluation).
        uniforms: with ``sample``, the U(0, 1) draws (N, h*w) behind the positives' and the negatives'
            Gumbel noise; None draws them from the global generator (positives first).
    """
    pos_uniform, neg_uniform = uniforms if uniforms is not None else (None, None)
    pos_cells, pos_weight = choose_cells(guidance, k, tau, sample, pos_uniform)
    neg_cells, neg_weight = choose_cells(-guidance, k, tau, sample, neg_uniform)
    cells = torch.cat([pos_cells, neg_cells], dim=1)  # (N, 2k)
    weight = torch.cat([pos_weight, neg_weight], dim=1).unsqueeze(-1).to(features.dtype)  # (N, 2k, 1)
    labels = torch.cat([torch.ones_like(pos_cells), torch.zeros_like(neg_cells)], dim=1)

    channels = features.shape[-1]
    content = features.gather(1, cells.unsqueeze(-1).expand(-1, -1, channels)) * weight
    dtype = upcast(features).dtype
    position = fourier_pe(pe_layer, cell_centres(cells, grid, dtype)).to(features.dtype)  # (N, 2k, C)
    sign = torch.cat(
        [point_embeddings[1].weight.expand(k, -1), point_embeddings[0].weight.expand(k, -1)], dim=0
    ).to(features.dtype)  # (2k, C)
    return HardPoints(content=content, pe=position * weight + sign, cells=cells, labels=labels)
