"""mmcv's ``RoIAlign`` (average mode) written out in plain torch, from the semantics of its kernel, for the
SAPNet tests: an independent reference for samflow's RoI features (which call torchvision).

The reference configures ``roi_layer=dict(type='RoIAlign', output_size=7)``; mmcv 1.5's
``RoIAlign.__init__`` fills in ``sampling_ratio=0, pool_mode='avg', aligned=True`` (``MMCV_DEFAULTS``).
Per RoI (x1, y1, x2, y2) and bin (i, j) of the r × r output:

- the box in feature pixels, half-pixel aligned: x1 · s − 0.5 ... x2 · s − 0.5 (``aligned=True``; the
  width and height are not clamped to 1);
- g_h × g_w samples per bin at the centres of a regular grid over the bin, g = ``sampling_ratio`` if
  positive, else ⌈roi side / r⌉ (adaptive), each read bilinearly;
- bilinear reading at (y, x): 0 outside [−1, H] × [−1, W]; y, x clamped below at 0; a cell index at
  H − 1 (W − 1) or beyond reads the last row (column) alone;
- the bin's value: the sum of its samples over max(g_h · g_w, 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MMCV_DEFAULTS = {"sampling_ratio": 0, "pool_mode": "avg", "aligned": True}


def bilinear(feature: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Values (C, n) of ``feature`` (C, H, W) at the points (n,) y, x, read as mmcv's kernel does."""
    h, w = feature.shape[-2:]
    outside = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y0, x0 = y.floor().long(), x.floor().long()
    last_y, last_x = y0 >= h - 1, x0 >= w - 1
    y0, x0 = torch.where(last_y, h - 1, y0), torch.where(last_x, w - 1, x0)
    y1, x1 = torch.where(last_y, h - 1, y0 + 1), torch.where(last_x, w - 1, x0 + 1)
    y, x = torch.where(last_y, y0.to(y.dtype), y), torch.where(last_x, x0.to(x.dtype), x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    value = (
        hy * hx * feature[:, y0, x0]
        + hy * lx * feature[:, y0, x1]
        + ly * hx * feature[:, y1, x0]
        + ly * lx * feature[:, y1, x1]
    )
    return torch.where(outside, torch.zeros_like(value), value)


def mmcv_roi_align(
    features: Tensor,
    rois: Tensor,
    size: int,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """mmcv's ``roi_align`` (avg): (K, C, size, size) of ``rois`` (K, 5: image, x1, y1, x2, y2) on ``features``."""
    out = features.new_zeros(rois.shape[0], features.shape[1], size, size)
    offset = 0.5 if aligned else 0.0
    for k, roi in enumerate(rois.tolist()):
        image, box = int(roi[0]), [c * spatial_scale - offset for c in roi[1:]]
        width, height = box[2] - box[0], box[3] - box[1]
        if not aligned:
            width, height = max(width, 1.0), max(height, 1.0)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(height / size)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(width / size)
        if grid_h <= 0 or grid_w <= 0:
            continue  # no samples: the bins stay 0
        # sample centres: bin start + (i + 0.5) · bin / g, per bin, row-major over (bin, sample)
        steps_h = (torch.arange(size * grid_h, dtype=features.dtype) + 0.5) / grid_h
        steps_w = (torch.arange(size * grid_w, dtype=features.dtype) + 0.5) / grid_w
        ys = box[1] + steps_h * (height / size)
        xs = box[0] + steps_w * (width / size)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        values = bilinear(features[image], yy.reshape(-1), xx.reshape(-1))
        values = values.reshape(-1, size, grid_h, size, grid_w)
        out[k] = values.sum((2, 4)) / max(grid_h * grid_w, 1)
    return out
