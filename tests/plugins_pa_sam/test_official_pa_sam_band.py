"""PA-SAM's boundary band (the target of L_U) against the reference's own ``mask_to_boundary``.

``samflow_plugins.pa_sam.loss.boundary_band`` says it builds the band "as the reference does":
xzz2/pa-sam's ``utils/losses.py`` ``loss_uncertain`` takes ``mask_to_boundary(fg, 0.005, value=0) +
mask_to_boundary(bg, 0.005, value=1)`` (``utils/misc.py``: a 1-px border of ``value``, then ``d``
OpenCV erosions with a 3 x 3 square, d = round(0.005 * diagonal)). That function is cut out of the
checkout named by ``SAMFLOW_PA_SAM_SRC`` (``official_code.official_function``; it needs OpenCV, the
``opencv`` extra) and run on masks that touch the image border, have holes and thin parts; without the
checkout, its outputs recorded in ``tests/reference_outputs/pa_sam_band.pt`` are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from official_code import ReferenceOutputs, assert_close, fingerprint, known, official_function

from samflow_plugins.pa_sam.loss import band_width, boundary_band

REF = ReferenceOutputs("pa_sam_band", "SAMFLOW_PA_SAM_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())


def masks(size: int) -> torch.Tensor:
    """(3, 1, size, size) in {0, 1}: discs and rectangles cut by the border, a hole, a 1-px line."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    s = size
    disc = (xx - 0.1 * s) ** 2 + (yy - 0.5 * s) ** 2 < (0.3 * s) ** 2  # cut by the left border
    ring = ((xx - 0.6 * s) ** 2 + (yy - 0.6 * s) ** 2 < (0.25 * s) ** 2) & ~(
        (xx - 0.6 * s) ** 2 + (yy - 0.6 * s) ** 2 < (0.1 * s) ** 2
    )
    line = (yy == s // 3) & (xx > s // 4)  # 1 px thick, up to the right border
    block = (xx > 0.7 * s) & (yy < 0.2 * s)  # in the top-right corner
    return torch.stack([disc | line, ring, block | ring]).unsqueeze(1).float()


def reference_band(m: torch.Tensor) -> torch.Tensor:
    """The reference's band of ``m`` (N, 1, H, W): ``loss_uncertain``'s sum of two ``mask_to_boundary``."""
    import cv2

    path = Path(REF.src or ".") / "utils" / "misc.py"
    to_boundary = official_function(path, "mask_to_boundary", np=np, cv2=cv2)
    fg, bg = (m >= 0.5).int(), (m < 0.5).int()
    out = [
        torch.from_numpy(to_boundary(fg[i, 0].numpy(), dilation_ratio=0.005, value=0))
        + torch.from_numpy(to_boundary(bg[i, 0].numpy(), dilation_ratio=0.005, value=1))
        for i in range(m.shape[0])
    ]
    return torch.stack(out).unsqueeze(1)


@official
@pytest.mark.parametrize("size", [200, 1024])  # d = 1 and d = 7
def test_boundary_band_equals_the_reference_mask_to_boundary(size):
    m = masks(size)
    expected = REF.get(f"band_{size}", fingerprint(m, 0.005), lambda: {"band": reference_band(m)})
    ours = boundary_band(m, band_width((size, size)))
    assert ours.sum() > 0
    assert_close(ours.to(known(expected["band"]).dtype), expected["band"], atol=0, rtol=0)
