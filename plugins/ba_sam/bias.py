"""BA-SAM's two terms as plain functions: the length-dependent scale and the distance penalty.

- ``length_scale(n, n_train)``: the factor ln(N) / ln(N_train) that multiplies SAM's 1/sqrt(d);
  exactly 1.0 at N = N_train.
- ``alibi_slopes(heads)``: the geometric per-head slopes of ALiBi (Press et al., ICLR 2022).
- ``grid_distance(h, w, kind)``: the distance between the tokens of an h x w grid, (h*w, h*w).
- ``distance_bias(slopes, size, kind)``: the additive mask -beta_h * dist(i, j), (heads, h*w, h*w).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Distance = Literal["euclidean", "manhattan"]
DISTANCES: tuple[str, ...] = ("euclidean", "manhattan")


def length_scale(n: int, n_train: int) -> float:
    """ln(N) / ln(N_train): the factor BA-SAM puts on the attention scale for N keys (N_train at training).

    N = N_train gives exactly 1.0. Both must be at least 2 (ln 1 = 0).
    """
    if n < 1 or n_train < 2:
        raise ValueError(f"length_scale needs N >= 1 and N_train >= 2, got N={n}, N_train={n_train}.")
    if n == n_train:
        return 1.0
    return math.log(n) / math.log(n_train)


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's head-specific slopes: 2^(-8h/H), h = 1..H, for H a power of two.

    For other H, ALiBi's rule: the 2^k slopes of the largest power of two 2^k < H, then every other
    slope of the 2^(k+1) sequence (2^(-4h/2^k), h = 1, 3, 5, ...) until there are H. So 2 heads:
    1/16, 1/256; 8 heads: 1/2, 1/4, ..., 1/256; 12 heads: 1/2, ..., 1/256, 2^-0.5, 2^-1.5, 2^-2.5,
    2^-3.5.
    """
    if heads < 1:
        raise ValueError(f"alibi_slopes needs at least one head, got {heads}.")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(base)
    if base < heads:
        slopes += power_of_two(2 * base)[0::2][: heads - base]
    return slopes


def grid_distance(
    h: int,
    w: int,
    kind: Distance = "euclidean",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Distances between the tokens of an h x w grid in raster order, in token units, (h*w, h*w) in ``dtype``
    (computed in it: a float64 run gets float64 square roots).

    Token t sits at (row, col) = (t // w, t % w). ``euclidean``: sqrt(drow^2 + dcol^2);
    ``manhattan``: |drow| + |dcol|.
    """
    rows = torch.arange(h, device=device, dtype=dtype).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=dtype).repeat(h)
    d_row = rows[:, None] - rows[None, :]
    d_col = cols[:, None] - cols[None, :]
    if kind == "euclidean":
        return torch.sqrt(d_row**2 + d_col**2)
    if kind == "manhattan":
        return d_row.abs() + d_col.abs()
    raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}.")


def distance_bias(slopes: Tensor, distance: Tensor) -> Tensor:
    """The bias-mode mask -beta_h * dist(i, j): slopes (heads,), distance (L, L) -> (heads, L, L)."""
    return -slopes[:, None, None] * distance.to(slopes.dtype)
