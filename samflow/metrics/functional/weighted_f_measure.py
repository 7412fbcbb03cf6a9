"""Weighted F-measure (Margolin et al., "How to Evaluate Foreground Maps?", CVPR 2014)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import Tensor

from samflow.metrics.functional._inputs import EPS, format_inputs, minmax_normalize


def weighted_f_measure(preds: Tensor, target: Tensor, beta2: float = 0.3, normalize: bool = True) -> Tensor:
    """Weighted F-measure per image, (N,); 0 for an empty GT (the SOD benchmarks' convention).

    With the error ``E = |p - g|``:

    1. Pixel dependency: background pixels take the error of their nearest foreground pixel
       (``E_t``), which is blurred by a 7×7 Gaussian with σ = 5 (MATLAB ``fspecial``, zero padding)
       into ``E_A``; on the foreground ``E' = min(E, E_A)``, elsewhere ``E' = E``.
    2. Pixel importance: ``B = 2 - exp(ln(0.5)/5 · Δ)`` on the background, Δ the Euclidean distance
       to the foreground, 1 on the foreground; ``E_w = E'·B``.
    3. ``TP_w = |G| - Σ_G E_w``, ``FP_w = Σ_¬G E_w``, ``R_w = 1 - mean_G E_w``,
       ``P_w = TP_w / (TP_w + FP_w + eps)`` and ``F = (1 + β²)·P_w·R_w / (R_w + β²·P_w + eps)``.

    The distance transform with nearest-foreground indices is ``scipy.ndimage.distance_transform_edt``
    on the CPU (one image at a time); everything else runs on the input's device.
    ``normalize`` min-max stretches each prediction first (PySODMetrics' convention).
    """
    preds, target = format_inputs(preds, target)
    if normalize:
        preds = minmax_normalize(preds)
    scores = [_weighted_f_single(p, g, beta2) for p, g in zip(preds, target, strict=True)]
    return torch.stack(scores) if scores else preds.new_zeros(0)


def _weighted_f_single(pred: Tensor, gt: Tensor, beta2: float) -> Tensor:
    if not gt.any():
        return pred.new_zeros(())
    distance, nearest = _distance_to_foreground(gt)
    gt_f = gt.to(pred.dtype)
    error = (pred - gt_f).abs()
    # Pixel dependency: background error taken from its nearest foreground pixel, then blurred.
    error_t = error[nearest[0], nearest[1]]
    kernel = _matlab_gaussian(7, 5.0, pred)
    error_a = F.conv2d(error_t[None, None], kernel[None, None], padding=kernel.shape[-1] // 2)[0, 0]
    min_error = torch.where(gt & (error_a < error), error_a, error)
    # Pixel importance: background errors count more the farther they are from the foreground.
    importance = torch.where(gt, torch.ones_like(distance), 2 - torch.exp(math.log(0.5) / 5 * distance))
    error_w = min_error * importance
    tp_w = gt_f.sum() - error_w[gt].sum()
    fp_w = error_w[~gt].sum()
    recall = 1 - error_w[gt].mean()
    precision = tp_w / (tp_w + fp_w + EPS)
    return (1 + beta2) * recall * precision / (recall + beta2 * precision + EPS)


def _distance_to_foreground(gt: Tensor) -> tuple[Tensor, Tensor]:
    """Euclidean distance of each pixel to the nearest foreground pixel, and that pixel's (row, col)."""
    background = (~gt).cpu().numpy()
    distance, indices = distance_transform_edt(background, return_indices=True)
    device = gt.device
    return torch.from_numpy(distance).to(device), torch.from_numpy(indices.astype(np.int64)).to(device)


def _matlab_gaussian(size: int, sigma: float, like: Tensor) -> Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)``: normalised, values below eps·max set to 0."""
    r = (size - 1) / 2
    coords = torch.linspace(-r, r, size, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    kernel = torch.where(kernel < torch.finfo(kernel.dtype).eps * kernel.max(), 0.0, kernel)
    return kernel / kernel.sum()
