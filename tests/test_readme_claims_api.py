"""README claims on Python APIs not proven elsewhere:

- "Use a trained model": the signatures it prints (``Predictor.from_run(run, checkpoint=None,
  sam_checkpoint=None)``, ``Predictor.from_checkpoint(ckpt, config=None, sam_checkpoint=None)``,
  ``predict(point_coords, point_labels, box, mask_input, multimask_output=True, return_logits=False)``)
  are the code's; a ``Predictor`` puts its model in eval mode, on CUDA when available (else the CPU);
  ``predict_tiled``'s windows are by default the model's input size overlapping by a quarter of it;
- "SAPNet": ``LinearWarmup(steps, ratio)``;
- "Predictions": the metrics given by a short name that threshold are exactly ``iou``, ``dice``,
  ``boundary_iou``, ``ber`` and ``slide_dice``, and they threshold at ``model.threshold``;
- "Checkpoints": the best checkpoint is named like ``epoch=3-step=40-val_iou=0.8123.ckpt``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from samflow import Predictor
from samflow.callbacks.warmup import LinearWarmup
from samflow.main_metric import checkpoint_filename
from samflow.metrics.registry import METRICS, build_metrics
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam

README = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())


def readme_parameters(call: str) -> list[tuple[str, object]]:
    """``call(a, b=1, ...)`` as the README writes it: [(parameter, default or Parameter.empty)]."""
    found = re.search(rf"`{re.escape(call)}\(([^`]*)\)`", README)
    assert found, f"README: no `{call}(...)`"
    out = []
    for item in found[1].split(", "):
        key, _, value = item.partition("=")
        out.append((key, eval(value) if value else inspect.Parameter.empty))  # the README's literals
    return out


@pytest.mark.parametrize(
    ("call", "target", "skip"),
    [
        ("Predictor.from_run", Predictor.from_run, 0),
        ("Predictor.from_checkpoint", Predictor.from_checkpoint, 0),
        ("predict", Predictor.predict, 1),  # self
        ("samflow.callbacks.warmup.LinearWarmup", LinearWarmup, 0),
    ],
)
def test_the_readme_signature_is_the_codes(call, target, skip):
    """The README's names are the positional parameters in order (``run``/``ckpt`` for the code's
    ``run_dir``/``checkpoint``: the first parameter is only compared by position) and its defaults hold."""
    code = list(inspect.signature(target).parameters.values())[skip:]
    said = readme_parameters(call)
    assert len(code) >= len(said)
    for i, (key, default) in enumerate(said):
        if i > 0 or skip:
            assert code[i].name == key, (call, code[i].name, key)
        if default is not inspect.Parameter.empty:
            assert code[i].default == default, (call, key)


def tiny_model() -> HookedSam:
    model = HookedSam(build_sam("tiny", seed=0), PluginStack())
    return model.train()


def test_a_predictor_puts_its_model_in_eval_mode_on_cuda_when_available():
    predictor = Predictor(tiny_model())
    assert not any(m.training for m in predictor.model.modules())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in predictor.model.parameters()} == {expected}


def test_predict_tiled_windows_default_to_the_input_size_overlapping_by_a_quarter():
    predictor = Predictor(tiny_model(), device="cpu")
    side = predictor.model.img_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (int(side * 1.6), int(side * 2.3), 3), dtype=np.uint8)
    boxes = np.array([[100, 10, 120, 60], [170, 100, 200, 150]])  # each within two windows or more
    default = predictor.predict_tiled(image, boxes, return_logits=True)[0]
    explicit = predictor.predict_tiled(image, boxes, tile=side, overlap=side // 4, return_logits=True)[0]
    np.testing.assert_array_equal(default, explicit)
    other = predictor.predict_tiled(image, boxes, tile=side, overlap=side // 8, return_logits=True)[0]
    both = np.isfinite(other) & np.isfinite(default)  # -inf outside a prompt's windows
    assert np.abs(other[both] - default[both]).max() > 1e-3  # the overlap shows: the default is a quarter


THRESHOLDED = re.search(r"Metrics given by a short name \(([^)]*)\) threshold at `model.threshold`", README)


def test_the_readmes_thresholded_metrics_are_those_that_take_a_threshold():
    assert THRESHOLDED, "README: the sentence on thresholded metrics moved"
    listed = re.findall(r"`(\w+)`", THRESHOLDED[1])
    takes = [name for name, cls in METRICS.items() if "threshold" in inspect.signature(cls).parameters]
    assert sorted(listed) == sorted(takes)


@pytest.mark.parametrize("name", re.findall(r"`(\w+)`", THRESHOLDED[1]) if THRESHOLDED else [])
def test_a_short_named_metric_thresholds_at_the_models_threshold(name):
    """What ``SamflowModule`` builds (``build_metrics(spec, model.threshold)``) with threshold 0.3."""
    assert build_metrics([name], threshold=0.3)[name].threshold == 0.3
    assert build_metrics([name])[name].threshold == 0.5


def test_the_best_checkpoint_is_named_like_the_readmes_example(tmp_path):
    callback = ModelCheckpoint(
        dirpath=tmp_path, filename=checkpoint_filename("val/iou"), auto_insert_metric_name=False
    )
    name = callback.format_checkpoint_name({"epoch": 3, "step": 40, "val/iou": torch.tensor(0.81234)})
    assert Path(name).name == "epoch=3-step=40-val_iou=0.8123.ckpt"
    assert "`epoch=3-step=40-val_iou=0.8123.ckpt`" in README
