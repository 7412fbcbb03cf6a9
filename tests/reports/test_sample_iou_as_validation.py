"""The sample pictures threshold at ``model.threshold`` and show each row's IoU as validation scores it.

Before, ``SampleGrid``'s threshold was 0.5 whatever ``model.threshold`` (what predict and the metrics
use), and a row's IoU was computed in the S x S model frame, while validation resizes the logits to the
image's original size and thresholds there (``EvaluationMixin.probabilities``): the picture's IoU was
not the row's validation IoU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from samflow.callbacks import samples
from samflow.callbacks.sample_drawing import row_iou
from samflow.callbacks.samples import SampleGrid
from samflow.data.transforms import longest_side_shape
from samflow.metrics.segmentation import BinaryIoU
from samflow.module import SamflowModule, SamSpec
from samflow.testing import random_batch

S = 128  # the tiny SAM's input size
ORIGINAL = (37, 53)  # an image much smaller than the frame, of another aspect ratio


def small_images_batch():
    """Two 37 x 53 images brought into the 128 x 128 frame as the data module does; the ground truth at
    the original size is the frame's mask resized back (nearest), so it holds the same object."""
    batch = random_batch(2, size=S)
    h, w = longest_side_shape(*ORIGINAL, S)
    frame = torch.zeros(2, 1, S, S)
    frame[:, :, :h, :w] = batch.mask[:, :, :h, :w]
    originals = torch.nn.functional.interpolate(frame[:, :, :h, :w], size=ORIGINAL, mode="nearest-exact")
    return batch.replace(
        mask=frame,
        input_size=torch.tensor([[h, w]] * 2),
        original_size=torch.tensor([ORIGINAL] * 2),
        gt_original=[m[0] > 0.5 for m in originals],
    )


def validation_iou(module: SamflowModule, batch, row: int, threshold: float) -> float:
    """Row ``row``'s IoU as validation's ``iou`` metric scores it: that row alone through the validation
    step's metric (the metric's mean over one row is the row's IoU)."""
    module._reset("val")
    with torch.no_grad():
        module.validation_step(batch.select_images([row]), 0)
    metric = module._metric_set("val", 0)["iou"]
    assert isinstance(metric, BinaryIoU) and metric.threshold == threshold
    return float(metric.compute())


@pytest.mark.parametrize("explicit", [None, 0.49])
def test_the_pictures_iou_is_validations_per_row_iou(explicit):
    torch.manual_seed(0)
    module = SamflowModule(SamSpec(variant="tiny"), losses={"bce": 1.0}, threshold=0.51).eval()
    given = {} if explicit is None else {"threshold": explicit}
    callback = SampleGrid(num_samples=2, num_extremes=1, **given)
    threshold = 0.51 if explicit is None else explicit  # the model's unless one is given
    batch = small_images_batch()
    with torch.no_grad():
        outputs = module.validation_step(batch, 0)
    callback.on_validation_epoch_start(None, module)  # type: ignore[arg-type]
    callback.on_validation_batch_end(None, module, outputs, batch, 0)  # type: ignore[arg-type]
    shown = [row.iou for row in callback._rows]
    module.threshold = threshold  # the metric of the reference at the picture's threshold
    expected = [validation_iou(module, batch, n, threshold) for n in range(2)]
    assert shown == pytest.approx(expected, abs=1e-12)
    best, worst = callback.extremes()
    assert best[0].iou == pytest.approx(max(expected)) and worst[0].iou == pytest.approx(min(expected))
    # the case discriminates: in the S x S frame the IoU differs (the old computation)
    h, w = batch.input_size[0].tolist()
    frame = [
        row_iou(outputs["probs"][n, 0, :h, :w] > threshold, batch.mask[n, 0, :h, :w] > 0.5) for n in range(2)
    ]
    assert any(abs(a - b) > 1e-3 for a, b in zip(frame, expected))


def test_the_pictures_are_drawn_at_the_models_threshold(tmp_path, monkeypatch):
    drawn: list[float] = []
    monkeypatch.setattr(samples, "sample_grid", lambda rows, threshold: drawn.append(threshold) or _black())
    module = SimpleNamespace(threshold=0.3)
    callback = SampleGrid(num_samples=1, num_extremes=1)
    batch = random_batch(1, size=16)
    outputs = {"out": SimpleNamespace(image_index=torch.arange(1)), "probs": torch.rand(1, 1, 16, 16)}
    callback.on_validation_batch_end(None, module, outputs, batch, 0)  # type: ignore[arg-type]
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[], default_root_dir=str(tmp_path), sanity_checking=False,
        current_epoch=0, global_step=0,
    )  # fmt: skip
    callback.on_validation_epoch_end(trainer, module)  # type: ignore[arg-type]
    assert drawn == [0.3, 0.3, 0.3]  # the epoch's grid, the best and the worst
    assert SampleGrid().threshold_for(None) == 0.5  # a module without a threshold


def _black():
    import numpy as np

    return np.zeros((4, 4, 3), dtype=np.uint8)
