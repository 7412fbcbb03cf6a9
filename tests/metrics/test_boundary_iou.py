"""Boundary IoU on hand-made masks, against the official erosion (cv2) and the previous max-pool erosion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from samflow.metrics import BoundaryIoU
from samflow.metrics.functional import boundary_iou, boundary_width, mask_boundary


def _square(top: int, left: int, size: int = 8, shape: tuple[int, int] = (20, 20)) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[top : top + size, left : left + size] = 1
    return mask


def test_boundary_width() -> None:
    assert boundary_width(20, 20) == 1  # round(0.02 · 28.3) = 1
    assert boundary_width(10, 10) == 1  # round(0.28) = 0, clamped to 1
    assert boundary_width(1024, 1024) == 29  # round(28.96)
    assert boundary_width(480, 640) == 16  # round(0.02 · 800)


def test_square_against_itself_is_one() -> None:
    assert boundary_iou(_square(5, 5), _square(5, 5)).item() == 1.0


def test_shifted_square_by_hand() -> None:
    # d = 1: each band is the 28-pixel outline of an 8x8 square. Shifted by one column the outlines
    # share 7 pixels of the top row and 7 of the bottom row: 14 / (28 + 28 - 14) = 1/3.
    pred, gt = _square(5, 6), _square(5, 5)
    assert mask_boundary(gt.bool()[None]).sum().item() == 28
    assert boundary_iou(pred, gt).item() == pytest.approx(1 / 3)


def test_image_border_counts_as_boundary() -> None:
    full = torch.ones(1, 20, 20, dtype=torch.bool)
    band = mask_boundary(full)
    assert band.sum().item() == 20 * 20 - 18 * 18
    assert not band[0, 1:-1, 1:-1].any()


def test_empty_masks() -> None:
    empty = torch.zeros(20, 20)
    assert boundary_iou(empty, empty).item() == 1.0
    assert boundary_iou(empty, _square(5, 5)).item() == 0.0
    assert boundary_iou(_square(5, 5), empty).item() == 0.0


def _official_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """Cheng et al.'s mask_to_boundary: zero-pad by 1, cv2.erode 3x3 d times, subtract."""
    h, w = mask.shape
    d = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))  # noqa: RUF046 (as the official code)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask - eroded


@pytest.mark.parametrize(("shape", "ratio"), [((37, 53), 0.02), ((64, 48), 0.05), ((90, 70), 0.1)])
def test_matches_official_erosion(shape: tuple[int, int], ratio: float) -> None:
    rng = np.random.default_rng(sum(shape))
    masks = [(gaussian_filter(rng.standard_normal(shape), 4) > t).astype(np.uint8) for t in (-0.05, 0.0, 0.1)]
    for pred_np, gt_np in zip(masks, masks[1:] + masks[:1], strict=True):
        ours = mask_boundary(torch.from_numpy(pred_np).bool()[None], ratio)[0].numpy()
        official_pred = _official_boundary(pred_np, ratio)
        np.testing.assert_array_equal(ours, official_pred.astype(bool))
        official_gt = _official_boundary(gt_np, ratio)
        expected = (official_pred & official_gt).sum() / (official_pred | official_gt).sum()
        got = boundary_iou(torch.from_numpy(pred_np).float(), torch.from_numpy(gt_np), ratio).item()
        assert got == pytest.approx(expected, abs=1e-12)


def test_metric_averages_images_of_different_sizes() -> None:
    metric = BoundaryIoU()
    metric.update(_square(5, 6), _square(5, 5))  # 1/3
    metric.update(torch.zeros(1, 30, 40), torch.zeros(1, 30, 40))  # both empty: 1
    metric.update(_square(2, 2, shape=(12, 12))[None], _square(2, 2, shape=(12, 12))[None])  # 1
    assert metric.compute().item() == pytest.approx((1 / 3 + 1 + 1) / 3)


def _maxpool_boundary(mask: torch.Tensor, dilation_ratio: float) -> torch.Tensor:
    """samflow's previous mask_boundary: two 1-D max-pools of width 2d + 1 of the padded complement."""
    d = boundary_width(mask.shape[-2], mask.shape[-1], dilation_ratio)
    background = F.pad((~mask).to(torch.float32)[:, None], (d, d, d, d), value=1.0)
    background = F.max_pool2d(background, kernel_size=(2 * d + 1, 1), stride=1)
    background = F.max_pool2d(background, kernel_size=(1, 2 * d + 1), stride=1)
    return mask & ~(background[:, 0] == 0)


def _random_masks(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(8, H, W) uint8: empty, full, noise at three densities, smooth blobs, and full with sparse holes."""
    h, w = shape
    noise = [(rng.random(shape) < p) for p in (0.5, 0.9, 0.995)]
    sigma = min(max(1.0, min(h, w) / 8), 6.0)
    blobs = [gaussian_filter(rng.standard_normal(shape), sigma) > t for t in (-0.1, 0.05)]
    holes = rng.random(shape) > 2 / (h * w) ** 0.5
    masks = [np.zeros(shape, bool), np.ones(shape, bool), *noise, *blobs, holes]
    return np.stack(masks).astype(np.uint8)


SIZES = [(1, 1), (2, 7), (5, 5), (9, 16), (37, 53), (64, 48), (101, 100), (257, 300)]
RATIOS = [0.001, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]  # d from 1 to wider than the small images


@pytest.mark.parametrize("shape", SIZES)
def test_random_masks_equal_official_and_previous_erosion(shape: tuple[int, int]) -> None:
    """Exact equality of the bands, batched, for every d from 1 up to wider than the image."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    masks = _random_masks(shape, rng)
    batch = torch.from_numpy(masks).bool()
    for ratio in RATIOS if max(shape) < 100 else RATIOS[:-2]:
        ours = mask_boundary(batch, ratio)
        assert torch.equal(ours, _maxpool_boundary(batch, ratio)), (shape, ratio)
        for i, mask in enumerate(masks):
            official = _official_boundary(mask, ratio).astype(bool)
            np.testing.assert_array_equal(ours[i].numpy(), official, err_msg=f"{shape} {ratio} mask {i}")


def test_1024_masks_equal_official_and_previous_erosion() -> None:
    rng = np.random.default_rng(1024)
    masks = _random_masks((1024, 1024), rng)[[3, 5, 6]]  # noise at density 0.9, then two blob masks
    batch = torch.from_numpy(masks).bool()
    for ratio in (0.02,):
        ours = mask_boundary(batch, ratio)
        assert torch.equal(ours, _maxpool_boundary(batch, ratio))
        for i, mask in enumerate(masks):
            np.testing.assert_array_equal(ours[i].numpy(), _official_boundary(mask, ratio).astype(bool))
    pred, gt = torch.from_numpy(masks[1]).float(), torch.from_numpy(masks[2])
    old_pred, old_gt = _maxpool_boundary(pred.bool()[None], 0.02), _maxpool_boundary(gt.bool()[None], 0.02)
    expected = (old_pred & old_gt).sum().item() / (old_pred | old_gt).sum().item()
    assert boundary_iou(pred, gt).item() == expected
