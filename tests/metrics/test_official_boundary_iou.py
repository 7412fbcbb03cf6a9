"""Boundary IoU against the official code HQ-SAM reports mBIoU with (SysCV/sam-hq ``train/utils/misc.py``).

``samflow.metrics.functional.boundary_iou`` says it is Boundary IoU "as HQ-SAM reports it", with the
band width rounded "as the official code". Here the official ``mask_to_boundary`` and ``boundary_iou``
(the gist of Cheng et al. that HQ-SAM and PA-SAM copy) are cut out of the checkout named by
``SAMFLOW_HQ_SAM_SRC`` (``official_code.official_function``; OpenCV erodes) and run on the same masks;
without the checkout their outputs recorded in ``tests/reference_outputs/boundary_iou.pt`` are used.
The official ``boundary_iou`` takes a ground truth on 0..255 (``> 128``) and a prediction's logits
(``> 0``); samflow takes a ground truth in {0, 1} and probabilities (``> 0.5``): the masks are the same.
Both masks empty is left out (the official code divides 0 by 0; samflow documents 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from official_code import ReferenceOutputs, assert_close, fingerprint, official_function
from scipy.ndimage import gaussian_filter

from samflow.metrics.functional import boundary_iou, mask_boundary

REF = ReferenceOutputs("boundary_iou", "SAMFLOW_HQ_SAM_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())

# (H, W) and dilation ratios: d from 1 to 29, bands wider than thin parts, odd and non-square sizes
CASES = [((37, 53), 0.02), ((64, 48), 0.05), ((101, 100), 0.1), ((257, 300), 0.02), ((480, 640), 0.02)]


def masks(shape: tuple[int, int]) -> torch.Tensor:
    """(6, H, W) bool: smooth blobs at three levels (cut by the border), noise, full with holes, a line."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    smooth = gaussian_filter(rng.standard_normal(shape), max(1.0, min(shape) / 10))
    out = [smooth > t for t in (-0.05, 0.0, 0.08)]
    out.append(rng.random(shape) < 0.7)
    out.append(rng.random(shape) > 3 / min(shape))
    line = np.zeros(shape, bool)
    line[shape[0] // 3, shape[1] // 4 :] = True
    out.append(line | out[2])
    return torch.from_numpy(np.stack(out))


def official_outputs(m: torch.Tensor, ratio: float) -> dict[str, torch.Tensor]:
    import cv2

    path = Path(REF.src or ".") / "train" / "utils" / "misc.py"
    to_boundary = official_function(path, "mask_to_boundary", np=np, cv2=cv2)
    biou = official_function(path, "boundary_iou", np=np, cv2=cv2, mask_to_boundary=to_boundary)
    bands = torch.stack([torch.from_numpy(to_boundary(x.numpy().astype(np.uint8), ratio)) for x in m])
    pairs = [(i, (i + 1) % len(m)) for i in range(len(m))]  # (ground truth, prediction)
    values = [biou(m[g][None].float() * 255, m[p][None].float() * 2 - 1, ratio) for g, p in pairs]
    return {"bands": bands, "biou": torch.stack(values)}


@official
@pytest.mark.parametrize(("shape", "ratio"), CASES, ids=[f"{h}x{w}-{r}" for (h, w), r in CASES])
def test_bands_and_boundary_iou_equal_the_official_code(shape, ratio):
    m = masks(shape)
    expected = REF.get(
        f"{shape[0]}x{shape[1]}-{ratio}", fingerprint(m, ratio), lambda: official_outputs(m, ratio)
    )
    assert_close(mask_boundary(m, ratio).to(torch.uint8), expected["bands"], atol=0, rtol=0)
    gt = m.float()
    pred = torch.roll(gt, -1, dims=0) * 0.9 + 0.05  # probabilities: > 0.5 exactly where the mask is
    ours = boundary_iou(pred, gt, ratio)
    assert_close(ours.float(), expected["biou"], atol=1e-6, rtol=0)
    assert float(expected["biou"].max()) > 0.1 and float(expected["biou"].max()) < 1  # not all 0 or 1
