"""Quasi-centre points of COCO instances, as SAPNet / P2BNet's point generation (``points="qc"``).

For an instance whose mask spans pixel columns x0..x1 and rows y0..y1 (w = x1 - x0 + 1, h likewise;
centre cx = (x0 + x1) / 2, cy likewise), each mask pixel gets the weight of a 2-D Gaussian on the
box centre with sigma 0.25 in normalised box units (pixel indices 0..w-1 map to [-0.5, 0.5], as the
reference's ``gaussian2d``), ``exp(-((x-cx)/(w-1))^2 / (2*0.25^2) - ((y-cy)/(h-1))^2 / (2*0.25^2))``;
sampling is restricted to the mask pixels inside the central ellipse with semi-axes
``min(96, 0.125 w)`` x ``min(96, 0.125 h)`` (``size_range`` 0.25), or to the whole mask when that
is empty; the chosen pixel index gets a uniform jitter in (-0.5, 0.5) px. Differences from the
reference (``TOV_mmdetection/huicv/coarse_utils/noise_data_mask_utils.py``, ``center_gaussian``): the
ellipse is the exact inequality about the exact centre, not OpenCV's rasterised ellipse about
``(round(w/2), round(h/2))`` with rounded axes; the box is the mask's extent, not the annotation's
float ``bbox``; instances under 2 px a side use the same rule instead of a polygon vertex.
``CocoInstances`` seeds each point with ``samflow.seeding.stable_seed(seed, image id, annotation id, point index)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["qc_point", "qc_weights"]


def qc_weights(
    mask: Tensor, sigma: float = 0.25, size_range: float = 0.25, limit: float = 96.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidate pixels of a quasi-centre point and their (unnormalised) weights (module docstring).

    Returns ``xs``, ``ys`` (long) and ``weight`` (float64), one entry per candidate mask pixel.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("qc_point: empty mask.")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = float(x1 - x0 + 1), float(y1 - y0 + 1)
    cx, cy = float(x0 + x1) / 2, float(y0 + y1) / 2
    dx, dy = (xs.double() - cx), (ys.double() - cy)
    ax, ay = min(limit, size_range / 2 * w), min(limit, size_range / 2 * h)
    inside = (dx / max(ax, 1e-9)) ** 2 + (dy / max(ay, 1e-9)) ** 2 <= 1
    if inside.any():
        xs, ys, dx, dy = xs[inside], ys[inside], dx[inside], dy[inside]
    # the reference's gaussian2d: box pixel indices 0..W-1 map to [-0.5, 0.5], i.e. divide by W - 1
    nx, ny = max(w - 1, 1.0), max(h - 1, 1.0)
    weight = torch.exp(-((dx / nx) ** 2 + (dy / ny) ** 2) / (2 * sigma**2))
    return xs, ys, weight


def qc_point(
    mask: Tensor,
    generator: torch.Generator,
    sigma: float = 0.25,
    size_range: float = 0.25,
    limit: float = 96.0,
) -> Tensor:
    """A quasi-centre point (x, y) inside ``mask`` (H, W) bool, as SAPNet's point generation (module docstring)."""
    xs, ys, weight = qc_weights(mask, sigma, size_range, limit)
    pick = torch.multinomial(weight, 1, generator=generator)[0]
    jitter = (torch.rand(2, generator=generator, dtype=torch.float64) - 0.5) * 0.999
    return torch.stack([xs[pick].double(), ys[pick].double()]) + jitter
