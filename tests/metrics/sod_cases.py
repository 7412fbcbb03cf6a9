"""Prediction / GT cases shared by the SOD metric tests (a plain module: tests import it by name)."""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy.ndimage import gaussian_filter


def _blob(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return gaussian_filter(rng.standard_normal(shape), sigma)


@cache
def make_sod_cases(seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, 8-bit prediction, 8-bit GT in {0, 255}) pairs of varied sizes and content."""
    rng = np.random.default_rng(seed)
    cases = []
    kinds = [
        "smooth blob",
        "uniform noise",
        "all-zero pred",
        "empty gt",
        "full gt",
        "pred equals gt",
        "constant pred",
        "low-contrast pred",
        "smooth blob 2",
        "salt-and-pepper pred",
        "binary pred",
        "single-pixel gt",
    ]
    for kind in kinds:
        h, w = (int(v) for v in rng.integers(24, 72, size=2))
        gt = _blob(rng, (h, w), 5) > 0.03
        pred = 1 / (1 + np.exp(-(20 * _blob(rng, (h, w), 3) + rng.uniform(0, 4) * (gt - 0.5))))
        if kind == "uniform noise":
            pred = rng.uniform(size=(h, w))
        elif kind == "all-zero pred":
            pred = np.zeros((h, w))
        elif kind == "empty gt":
            gt[:] = False
        elif kind == "full gt":
            gt[:] = True
        elif kind == "pred equals gt":
            pred = gt.astype(np.float64)
        elif kind == "constant pred":
            pred = np.full((h, w), 0.3)
        elif kind == "low-contrast pred":
            pred = 0.1 + 0.2 * pred
        elif kind == "salt-and-pepper pred":
            pred = (rng.uniform(size=(h, w)) > 0.7).astype(np.float64)
        elif kind == "binary pred":
            pred = (pred > 0.5).astype(np.float64)
        elif kind == "single-pixel gt":
            gt[:] = False
            gt[h // 3, w // 2] = True
        cases.append((kind, np.round(pred * 255).astype(np.uint8), gt.astype(np.uint8) * 255))
    return cases
