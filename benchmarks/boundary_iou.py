"""Time the boundary band of one mask: samflow's mask_boundary, its previous max-pool erosion, and cv2.

    python benchmarks/boundary_iou.py --size 1024 --runs 15
    python benchmarks/boundary_iou.py --threads 1

Each method runs ``--runs`` times on the same smooth random mask (after one untimed call); the
median is printed in ms. The three bands are checked to be equal first. cv2 (opencv-python, the test
extra) is optional: without it that row is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from samflow.metrics.functional import boundary_iou, boundary_width, mask_boundary


def maxpool_boundary(mask: torch.Tensor, dilation_ratio: float) -> torch.Tensor:
    """samflow's mask_boundary before the change: two 1-D max-pools of width 2d + 1 of the complement."""
    d = boundary_width(mask.shape[-2], mask.shape[-1], dilation_ratio)
    background = F.pad((~mask).to(torch.float32)[:, None], (d, d, d, d), value=1.0)
    background = F.max_pool2d(background, kernel_size=(2 * d + 1, 1), stride=1)
    background = F.max_pool2d(background, kernel_size=(1, 2 * d + 1), stride=1)
    return mask & ~(background[:, 0] == 0)


def opencv_boundary(mask: np.ndarray, dilation_ratio: float) -> np.ndarray:
    """Cheng et al.'s mask_to_boundary (HQ-SAM's copy): pad 1, cv2.erode 3x3 d times, subtract."""
    import cv2

    h, w = mask.shape
    d = boundary_width(h, w, dilation_ratio)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="mask height and width (default 1024)")
    parser.add_argument("--ratio", type=float, default=0.02, help="dilation ratio (default 0.02)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per method (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 1, args.size, args.size, generator=generator)
    mask = F.avg_pool2d(noise, 31, stride=1, padding=15)[:, 0] > 0.5  # (1, H, W) blobs
    mask_np = mask[0].numpy().astype(np.uint8)
    band = mask_boundary(mask, args.ratio)
    assert torch.equal(band, maxpool_boundary(mask, args.ratio))
    prob = torch.rand(args.size, args.size, generator=generator) * 0.2 + mask[0] * 0.7  # > 0.5 on the mask
    rows = [
        ("samflow mask_boundary (shifted ANDs)", lambda: mask_boundary(mask, args.ratio)),
        ("samflow boundary_iou (prob vs mask)", lambda: boundary_iou(prob, mask[0], args.ratio)),
        ("previous (1-D max-pools)", lambda: maxpool_boundary(mask, args.ratio)),
    ]
    try:
        import cv2  # noqa: F401
    except ImportError:
        print("cv2 not installed: the OpenCV row is skipped")
    else:
        assert np.array_equal(band[0].numpy(), opencv_boundary(mask_np, args.ratio).astype(bool))
        rows.append(("OpenCV mask_to_boundary (cv2.erode)", lambda: opencv_boundary(mask_np, args.ratio)))
    d = boundary_width(args.size, args.size, args.ratio)
    print(
        f"{args.size}x{args.size} mask, dilation_ratio {args.ratio} (d = {d}), torch threads "
        f"{torch.get_num_threads()}, median of {args.runs} runs; the bands are equal"
    )
    for name, fn in rows:
        print(f"  {name:40s} {median_ms(fn, args.runs):9.2f} ms")


if __name__ == "__main__":
    main()
