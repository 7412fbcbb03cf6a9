"""Under bf16 autocast the sample pictures threshold the float32 probabilities the metrics use.

A validation step returns ``probs`` for ``SampleGrid``; they were the sigmoid of the bf16 prediction,
rounded to bf16 (steps of 2^-8 above 0.5), while the metrics took the sigmoid in float32. A logit of
0.004 is a probability of 0.501 in float32, foreground for the metrics, but 0.5 in bf16: the pictures
drew an empty prediction and an IoU of 0 for a row the metrics scored as all foreground.
"""

from __future__ import annotations

import torch
from helpers import random_batch

from samflow.callbacks.samples import batch_rows, row_ious
from samflow.module import SamflowModule, SamSpec
from samflow.sam import SamOutput

LOGIT = 0.004  # sigmoid: 0.50100 in float32, 0.5 in bf16


def test_pictures_and_metrics_see_the_same_mask_under_bf16():
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={}).eval()
    batch = random_batch(2, prompt="box", seed=1)
    ones = [torch.ones_like(g) for g in batch.gt_original]
    batch = batch.replace(mask=torch.ones_like(batch.mask), gt_original=ones)
    low = module.model.img_size // 4

    def forward(batch):  # SAM's prediction, as bf16 autocast leaves it: a bf16 logit near 0
        logits = torch.full((batch.num_rows, 1, low, low), LOGIT, dtype=torch.bfloat16)
        sam = logits.expand(-1, 4, -1, -1)
        out = SamOutput(
            masks={"sam": sam}, iou_pred=torch.ones(2, 4), image_index=batch.image_index, pred=logits
        )
        return out, None

    module.forward = forward  # type: ignore[method-assign]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = module.validation_step(batch, 0)
        metric_probs = module.probabilities(outputs["out"], batch)
    assert all(bool((p > 0.5).all()) for p in metric_probs)  # the metrics: every pixel foreground
    rows = batch_rows(batch, outputs, threshold=0.5)
    for row in rows:
        h, w = row.size
        assert bool((row.prob[0, :h, :w] > 0.5).all()), row.prob.unique()
        assert row.iou == 1.0
    assert row_ious(batch, outputs, threshold=0.5) == [1.0, 1.0]
    assert outputs["probs"].dtype == torch.float32
