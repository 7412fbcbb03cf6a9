"""A patch's WSI-SAM output does not depend on its batch: alone or among patches with other prompt
kinds (box, 10 points, noisy mask, the negative point of an empty patch: padded point slots, rows
without a box), in training and in evaluation mode, for both views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_wsi_sam_plugin import model

from samflow.data.batch import collate
from samflow.data.prompts import NoisyMaskPrompt, PointPrompt
from samflow.data.wsi.patches import CentreSizeBoxPrompt, pair_item

P = 64  # patch side; the tiny SAM's input is 128


def items() -> list[dict]:
    rng = np.random.default_rng(0)
    samplers = [CentreSizeBoxPrompt(), PointPrompt(positive=10), NoisyMaskPrompt(), PointPrompt(positive=3)]
    out = []
    for i, sampler in enumerate(samplers):
        hr, lr = (rng.integers(0, 256, (P, P, 3), dtype=np.uint8) for _ in range(2))
        hr_gt = np.zeros((P, P), dtype=bool)
        if i < 3:  # the last patch is empty: one negative point
            hr_gt[10 + 5 * i : 40, 8 : 30 + 6 * i] = True
        lr_gt = np.zeros((P, P), dtype=bool)
        lr_gt[P // 4 : 3 * P // 4, P // 4 : 3 * P // 4] = hr_gt[::2, ::2]
        gen = torch.Generator().manual_seed(i)
        out.append(
            pair_item(
                hr, lr, hr_gt, lr_gt, factor=2.0, size=128, sampler=sampler, generator=gen, item_id=str(i)
            )
        )
    return out


@pytest.mark.parametrize("training", [False, True])
def test_each_patch_alone_equals_it_in_a_mixed_batch(tiny_sam, training):
    hooked, _ = model(tiny_sam)
    hooked.train(training)
    patches = items()
    batch = collate(patches)
    assert batch.point_labels is not None and (batch.point_labels == -1).any()  # padded point slots
    assert batch.has_box is not None and not batch.has_box.all()  # rows without a box
    with torch.no_grad():
        full = hooked(batch)
        for i, item in enumerate(patches):
            alone = hooked(collate([item]))
            torch.testing.assert_close(full.pred[i], alone.pred[0], atol=1e-5, rtol=0)
            for key in ("wsi/wsi", "wsi/wsi_sam"):
                torch.testing.assert_close(full.masks[key][i], alone.masks[key][0], atol=1e-5, rtol=0)
                torch.testing.assert_close(
                    full.context.masks[key][i], alone.context.masks[key][0], atol=1e-5, rtol=0
                )
