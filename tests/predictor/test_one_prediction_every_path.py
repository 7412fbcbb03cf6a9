"""One trained run, one image, one prompt: every way samflow predicts gives the same mask.

| path                                                   | what is compared                                  |
|---|---|
| ``samflow validate`` (``val_sets``, one set per image) | ``val/iou/<set>``, ``val/dice/<set>``: IoU / Dice of the mask below against the GT file |
| ``samflow predict --predictions.output_dir``           | ``<stem>.png``, the reference mask; ``<stem>_prob.png`` |
| ``samflow predict --prompts FILE``                     | ``masks/<stem>_0.png``                            |
| ``Predictor.from_run``: ``predict``, ``predict_tiled`` (one window) | the boolean mask                     |
| ``samflow export --onnx``: ``Predictor.from_export``, the ONNX graph | the boolean mask (ONNX: logits > ``mask_threshold``) |

Masks are compared pixel for pixel. The images are not square and neither side is the model's 128
(one is upsampled, one shrunk), and the box is the evaluation prompt the data module draws. The run's
prediction head is scaled after training, so its logits are those of a confident model (several units
from 0 at most pixels): resizing probabilities and resizing logits then give other mask edges. The
run's ExtraTokens chooses the mask, so the ONNX graph (exported as the command exports it) has one
mask per prompt; it is left out without onnxruntime. ``model.threshold`` 0.5 and 0.3 are both run:
the threshold is one rule in every path, the metrics' ``iou`` and ``dice`` included.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
import yaml
from helpers import prompted_predict_args
from PIL import Image

import samflow.sam_spec  # noqa: F401  (allows SamSpec in torch.load(weights_only=True))
from samflow.cli import main
from samflow.data import SegmentationDataModule
from samflow.data.prompts import mask_to_box
from samflow.metrics.registry import build_metrics
from samflow.predictor import Predictor

SIZES = {"wide": (200, 120), "tall": (60, 90)}  # name -> (W, H): 128 x 77 and 85 x 128 in the frame
HEAD = "model.plugins.tokens.heads.0.layers.2"  # ExtraTokens' kernel: it makes the predicted mask
SCALE = 200.0


def _cli(*args: str) -> int:
    argv = sys.argv
    try:
        return main(list(args))
    finally:
        sys.argv = argv
        wandb.finish()


def _confident_run(trained_run: Path, root: Path, threshold: float) -> Path:
    """A copy of ``trained_run`` (decoder tuning + ExtraTokens choosing the prediction, one Lightning
    training step) with its prediction kernel scaled by ``SCALE`` (logits x SCALE) and
    ``model.threshold`` set to ``threshold``."""
    run = root / "runs" / "demo" / "version_0"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    for part in ("weight", "bias"):
        checkpoint["state_dict"][f"{HEAD}.{part}"] *= SCALE
    torch.save(checkpoint, ckpt)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["threshold"] = threshold
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


def _data(root: Path) -> dict[str, Path]:
    """One dataset root per image (``images/<name>.png``, ``masks/<name>.png``): an ellipse, brighter."""
    rng = np.random.default_rng(0)
    roots = {}
    for name, (width, height) in SIZES.items():
        folder = root / name
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        y, x = np.mgrid[:height, :width]
        inside = ((x - 0.45 * width) / (0.3 * width)) ** 2 + ((y - 0.5 * height) / (0.3 * height)) ** 2 < 1
        image = rng.integers(0, 120, (height, width, 3), dtype=np.uint8) + 100 * inside[..., None].astype(
            np.uint8
        )
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        Image.fromarray(inside.astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")
        roots[name] = folder
    return roots


def _eval_boxes(run: Path, roots: dict[str, Path]) -> dict[str, list[float]]:
    """The validation prompt of each image, as the run's data module draws it, in original pixels."""
    init_args = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]
    data = SegmentationDataModule(**init_args, val_sets={k: str(v) for k, v in roots.items()})
    data.setup("validate")
    boxes = {}
    for loader in data.val_dataloader():
        for batch in loader:
            (height, width), (h, w) = batch.original_size[0].tolist(), batch.input_size[0].tolist()
            scale = torch.tensor([width / w, height / h] * 2, dtype=torch.float64)
            boxes[batch.names[0]] = (batch.box[0].double() * scale).tolist()
    return boxes


def _masks(folder: Path, pattern: str) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(folder / pattern.format(name))) for name in SIZES}


def every_path(trained_run: Path, root: Path, threshold: float) -> dict[str, object]:
    """Run every path on the two images; returns their masks by path and what path 1 logged."""
    run = _confident_run(trained_run, root, threshold)
    roots = _data(root / "data")
    ground_truth = {k: np.asarray(Image.open(v / "masks" / f"{k}.png")) > 127 for k, v in roots.items()}
    boxes = {k: mask_to_box(torch.from_numpy(g)).tolist() for k, g in ground_truth.items()}
    drawn = _eval_boxes(run, roots)
    for name in SIZES:  # the evaluation prompt is the mask's tight box: the prompt file's box
        np.testing.assert_allclose(drawn[name], boxes[name], atol=1e-4, err_msg=name)
    experiment = [
        "--experiment",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
    ]
    cpu = ["--trainer.accelerator", "cpu", "--quiet"]
    # 1. samflow validate: one named set per image, so each image's metrics are logged apart
    sets = json.dumps({k: str(v) for k, v in roots.items()})
    assert _cli("validate", *experiment, "--data.init_args.val_sets", sets, *cpu) == 0
    (logged,) = (run / "validate").glob("**/metrics.csv")
    metrics = {
        k: float(v) for k, v in list(csv.DictReader(logged.open()))[-1].items() if k.startswith("val/") and v
    }
    # 2. samflow predict (Lightning), the predict data with masks: the same seeded box prompts
    lightning = root / "lightning"
    predict = ["--data.init_args.predict", json.dumps([str(v) for v in roots.values()])]
    writer = ["--predictions.output_dir", str(lightning), "--predictions.save_probabilities", "true"]
    assert _cli("predict", *experiment, *predict, *writer, *cpu) == 0
    # 3. samflow predict --prompts
    images = root / "images"
    images.mkdir()
    for name, folder in roots.items():
        shutil.copy(folder / "images" / f"{name}.png", images)
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({f"{k}.png": [{"box": b}] for k, b in boxes.items()}))
    prompted = root / "prompted"
    assert _cli(*prompted_predict_args(prompts, run, images, prompted, "--device", "cpu")) == 0
    # 4. and 5. Predictor of the run, of its export, and the ONNX graph
    onnx = importlib.import_module("samflow.onnx_export") if _has_onnxruntime() else None
    exported = root / "export"
    assert _cli("export", str(run), "--out", str(exported), *(["--onnx"] if onnx else [])) == 0
    masks: dict[str, dict[str, np.ndarray]] = {
        "lightning": {k: m > 0 for k, m in _masks(lightning, "{}.png").items()},
        "prompted": {k: m > 0 for k, m in _masks(prompted / "masks", "{}_0.png").items()},
        "predictor": {},
        "tiled": {},
        "export": {},
    }
    logits = {}
    from_run = Predictor.from_run(run, device="cpu")
    from_export = Predictor.from_export(exported, device="cpu")
    for name in SIZES:
        image = np.asarray(Image.open(images / f"{name}.png").convert("RGB"))
        box = np.array(boxes[name])
        from_run.set_image(image)
        masks["predictor"][name] = from_run.predict(box=box, multimask_output=None)[0][0]
        logits[name] = from_run.predict(box=box, multimask_output=None, return_logits=True)[0][0]
        tiled, _ = from_run.predict_tiled(image, boxes=box[None], tile=max(image.shape[:2]))
        masks["tiled"][name] = tiled[0, 0]
        from_export.set_image(image)
        masks["export"][name] = from_export.predict(box=box, multimask_output=None)[0][0]
        if onnx is not None:
            inputs = onnx.onnx_inputs(from_export, from_export.encoding, box=box)
            graph = onnx.run_onnx(exported / "decoder.onnx", inputs)[0]  # (1, 1, H, W) logits
            masks.setdefault("onnx", {})[name] = graph[0, 0] > from_export.mask_threshold
    return {
        "masks": masks,
        "metrics": metrics,
        "ground_truth": ground_truth,
        "logits": logits,
        "probabilities": _masks(lightning, "{}_prob.png"),
        "mask_thresholds": (from_run.mask_threshold, from_export.mask_threshold),
    }


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def paths(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("every_path")
    cwd = Path.cwd()
    os.chdir(root)  # validate / predict write their run folders under ./runs
    try:
        yield every_path(trained_run, root, threshold=0.5)
    finally:
        os.chdir(cwd)


def _assert_metrics_score_the_written_masks(found: dict) -> None:
    """``val/iou/<set>`` and ``val/dice/<set>`` are the IoU and Dice of samflow predict's mask PNG
    against the ground-truth file (the metrics compute in float32)."""
    for name, truth in found["ground_truth"].items():
        mask = found["masks"]["lightning"][name]
        both, either = (mask & truth).sum(), (mask | truth).sum()
        assert found["metrics"][f"val/iou/{name}"] == pytest.approx(both / either, rel=1e-6), name
        dice = 2 * both / (mask.sum() + truth.sum())
        assert found["metrics"][f"val/dice/{name}"] == pytest.approx(dice, rel=1e-6), name


def _assert_every_mask_equal(found: dict) -> None:
    for name, mask in found["masks"]["lightning"].items():
        for path, other in found["masks"].items():
            differ = int((other[name] != mask).sum())
            assert differ == 0, f"{path}: {differ} pixel(s) of {name} differ from samflow predict's mask"


def test_every_path_writes_the_same_mask(paths):
    reference = paths["masks"]["lightning"]
    assert {k: m.shape for k, m in reference.items()} == {k: (h, w) for k, (w, h) in SIZES.items()}
    for name, mask in reference.items():
        assert 0.1 < mask.mean() < 0.9, name  # both classes: a comparison that can fail
        assert (np.abs(paths["logits"][name]) > 1).mean() > 0.5, name  # the logits of a confident model
    _assert_every_mask_equal(paths)


def test_the_written_probabilities_are_the_predictors(paths):
    """``<stem>_prob.png`` is ``round(255 p)`` of ``p = sigmoid(logit)``, the logits of ``Predictor``."""
    for name, written in paths["probabilities"].items():
        expected = np.round(255 / (1 + np.exp(-paths["logits"][name].astype(np.float64))))
        assert np.abs(written.astype(np.float64) - expected).max() <= 1, name
        mask = paths["masks"]["lightning"][name]
        assert (written[mask] >= 128).all() and (written[~mask] <= 128).all(), name


def test_validation_metrics_are_those_of_the_written_mask(paths):
    _assert_metrics_score_the_written_masks(paths)


def test_the_threshold_is_the_runs_in_every_path(paths):
    """``model.threshold`` 0.5 is logit 0 in ``Predictor`` and its export (and so for the ONNX graph)."""
    assert paths["mask_thresholds"] == (0.0, 0.0)


def test_another_threshold_is_one_rule_in_every_path(trained_run, tmp_path, monkeypatch):
    """``model.threshold`` 0.3: samflow predict keeps ``p > 0.3``, the predictors ``logit > log(3 / 7)``,
    the metrics ``iou`` and ``dice`` ``p > 0.3``: the masks are equal and the metrics are theirs."""
    monkeypatch.chdir(tmp_path)
    found = every_path(trained_run, tmp_path, threshold=0.3)
    assert found["mask_thresholds"] == (math.log(0.3 / 0.7),) * 2
    for name, mask in found["masks"]["lightning"].items():
        assert (mask != (found["logits"][name] > 0)).any(), name  # 0.3 is not 0.5 here
    _assert_every_mask_equal(found)
    _assert_metrics_score_the_written_masks(found)


def test_metrics_named_by_short_name_take_the_models_threshold():
    metrics = build_metrics(
        {"iou": None, "strict": {"class_path": "BinaryIoU", "init_args": {"threshold": 0.7}}, "mae": None},
        threshold=0.3,
    )
    assert metrics["iou"].threshold == 0.3 and metrics["strict"].threshold == 0.7
    assert not hasattr(metrics["mae"], "threshold")
    assert build_metrics(["dice"])["dice"].threshold == 0.5
