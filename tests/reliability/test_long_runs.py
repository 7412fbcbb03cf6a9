"""State that must not grow with the number of images, batches or shard files of a long run.

- ``samflow predict`` keeps no predictions in memory: Lightning's ``Trainer.predict`` returns every
  batch's output by default, and samflow's are each image's mask and probabilities at its original
  size (5 bytes a pixel), which the ``MaskWriter`` has written already;
- ``Predictor.predict_tiled`` blends the windows' logits in place, not in new full-size maps;
- ``samflow embed``'s writer keeps only the shard files of its current chunk mapped:
  ``tests/embed/test_embed_leaks.py``, beside the reader's bound.
"""

from __future__ import annotations

import functools
import inspect
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from quickstart_tiny import samflow as run_tiny
from torchmetrics import Metric

from samflow import Predictor
from samflow.callbacks.run_report import images_section
from samflow.metrics.registry import METRICS, build_metrics
from samflow.sam import HookedSam


def _images(folder: Path, count: int, size: int = 48) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"i{i:03d}.png")
    return folder


def test_predict_keeps_no_predictions_in_memory(tmp_path, monkeypatch):
    """8 images in 2 batches: every mask is written, and the predict loop holds none of the batches'
    outputs afterwards (it held all 8 masks and probability maps before)."""
    images = _images(tmp_path / "predict", 8)
    held: list[int] = []
    predict = Trainer.predict

    @functools.wraps(predict)  # the CLI reads predict's parameters from its signature
    def counted(self: Trainer, *args, **kwargs):
        out = predict(self, *args, **kwargs)
        held.append(sum(len(batches) for batches in self.predict_loop._predictions))
        return out

    monkeypatch.setattr(Trainer, "predict", counted)
    monkeypatch.chdir(tmp_path)
    assert run_tiny("predict", "--data.init_args.predict", str(images), data=tmp_path / "data") == 0
    written = sorted(p.stem for p in (tmp_path / "runs/quickstart/version_0/predictions").glob("*.png"))
    assert written == sorted(p.stem for p in images.iterdir())
    assert held == [0]


def test_the_run_report_shows_the_grid_of_the_last_epoch_past_999(tmp_path):
    """``val_epoch1000.png`` is the last epoch's grid, not ``val_epoch999.png`` (names sort before numbers)."""
    (tmp_path / "samples").mkdir()
    for epoch in (998, 999, 1000, 1001):
        Image.new("RGB", (4, 4)).save(tmp_path / "samples" / f"val_epoch{epoch:03d}.png")
    assert "![last](samples/val_epoch1001.png)" in images_section(tmp_path)


def _state_bytes(metric: Metric) -> int:
    """Bytes of a metric's states (tensors, lists of tensors)."""
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        for t in value if isinstance(value, list) else [value]:
            total += t.numel() * t.element_size()
    return total


def _updated(name: str, images: int) -> Metric:
    metric = build_metrics([name], threshold=0.5)[name]
    gen = torch.Generator().manual_seed(0)
    for i in range(images):  # as validation: one update per prompt row, at the image's size
        prob = torch.rand(24 + i % 3, 20, generator=gen)
        target = torch.rand(prob.shape, generator=gen) > 0.5
        if "source" in inspect.signature(metric.update).parameters:
            metric.update(prob, target, source="slide.svs")
        else:
            metric.update(prob, target)
    return metric


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_states_do_not_grow_with_the_images(name):
    """Every registered metric holds the same states after 16 images as after 4, but ``slide_dice``: 3
    int64 per patch (its slide, ``|P ∩ G|`` and ``|P| + |G|``, concatenated over processes for an exact
    per-slide Dice), and one name per slide, not per patch. After ``reset``, the states of no image."""
    few, many = _updated(name, 4), _updated(name, 16)
    per_image = (_state_bytes(many) - _state_bytes(few)) / 12
    assert per_image == (24 if name == "slide_dice" else 0)
    assert len(getattr(many, "names", [0])) == 1
    many.reset()
    assert _state_bytes(many) == _state_bytes(build_metrics([name], threshold=0.5)[name])


@pytest.mark.parametrize("return_logits", [False, True])
def test_tiled_blending_holds_at_most_9_bytes_per_pixel_and_prompt(tiny_sam, return_logits):
    """``predict_tiled`` on a 512 x 512 image: the numpy buffers peak at the float32 sums and weights
    and one flag per pixel and prompt (they peaked at 17 bytes: the blend made three more full maps)."""
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 60], [300, 200, 380, 260]])
    tracemalloc.start()
    try:
        out, _ = predictor.predict_tiled(image, boxes, tile=128, overlap=32, return_logits=return_logits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (2, 1, 512, 512)
    assert peak / out[:, 0].size <= 9.25
