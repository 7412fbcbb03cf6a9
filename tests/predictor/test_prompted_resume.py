"""``samflow predict --prompts ... --resume`` continues a killed run.

A run over a large set killed at 90% is continued, not started again: the images whose outputs are all
in ``--out`` get no forward, the others are predicted, and the folder (masks or label images, each
image's ``results/<stem>.json``, ``results.json``, ``skipped.json``, the record ``samflow_prompts.json``)
ends byte for byte as an uninterrupted run's, in both formats. A killed run is simulated by deleting
some outputs (one image keeps its part of the results but loses a mask) and leaving a ``.partial``.
Every run writes the record before its first output, so a killed plain run is continued too; a continued
run with another model, prompt file, format, seed, tile or device is refused in one line naming what differs,
and so are a folder of outputs without a record and ``--resume`` with ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samflow.cli import main
from samflow.predictor import Predictor

SIZES = {"a": (40, 30), "b": (36, 44), "c": (32, 32), "d": (48, 28)}  # (W, H): an image by its shape
PROMPTS = {
    "a.png": [{"box": [4, 6, 30, 24]}, {"points": [[10, 12], [20, 8]], "labels": [1, 0]}],
    "b.png": [{"box": [2, 2, 30, 40], "points": [[10, 10]]}],
    "c.png": [{"box": [1, 1, 20, 20]}, {"box": [8, 8, 30, 30]}],
    "d.png": [{"points": [[20, 14]]}],
    "e.png": [{"box": [1, 1, 5, 5]}],  # unreadable: skipped (--skip-bad), listed in skipped.json
}


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for stem, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    (images / "e.png").write_bytes(b"not a png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    return images, prompts


@pytest.fixture()
def forwards(monkeypatch) -> dict[str, list[str]]:
    """The images the model encodes (``set_image``) and the prompts it decodes, by image stem."""
    seen: dict[str, list[str]] = {"encoded": [], "decoded": []}
    by_shape = {(h, w): stem for stem, (w, h) in SIZES.items()}
    set_image, predict = Predictor.set_image, Predictor.predict

    def spy_set_image(self, image, *args, **kwargs):
        self._spy_stem = by_shape[image.shape[:2]]
        seen["encoded"].append(self._spy_stem)
        return set_image(self, image, *args, **kwargs)

    def spy_predict(self, *args, **kwargs):
        seen["decoded"].append(self._spy_stem)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "set_image", spy_set_image)
    monkeypatch.setattr(Predictor, "predict", spy_predict)
    return seen


def run(model: Path, images: Path, prompts: Path, out: Path, *args: str) -> int:
    argv = ["predict", "--prompts", str(prompts), "--model", str(model), "--images", str(images)]
    return main([*argv, "--out", str(out), "--device", "cpu", "--skip-bad", *args])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill(out: Path) -> list[str]:
    """What a run killed after its first images leaves: no results.json / skipped.json; b's part of the
    results but not its (first) mask; c's first files, its last image file as a ``.partial``, no part;
    nothing of d. Returns the images left to predict."""
    (out / "results.json").unlink()
    (out / "skipped.json").unlink()
    pictures = {
        stem: sorted((out / "masks").glob(f"{stem}_*.png")) + list(out.glob(f"labels/{stem}.png"))
        for stem in "bcd"
    }
    pictures["b"][0].unlink()
    last = pictures["c"][-1]
    last.rename(last.with_name(f".{last.name}.partial"))
    (out / "results" / "c.json").unlink()
    for path in [*pictures["d"], out / "results" / "d.json"]:
        path.unlink()
    return ["b", "c", "d"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["instances", "labels"])
def test_a_continued_run_predicts_only_the_images_left_and_equals_an_uninterrupted_run(
    trained_run, setup, tmp_path, forwards, fmt
):
    images, prompts = setup
    plain = tmp_path / "plain"
    assert run(trained_run, images, prompts, plain, "--format", fmt) == 0
    assert forwards["encoded"] == ["a", "b", "c", "d"]
    uninterrupted = files(plain)
    record = json.loads(uninterrupted["samflow_prompts.json"])
    assert record["model"]["sha256"] == sha256(trained_run / "checkpoints" / "last.ckpt")
    assert record["prompts"]["sha256"] == sha256(prompts) and record["format"] == fmt
    assert [s["file_name"] for s in json.loads(uninterrupted["skipped.json"])] == ["e.png"]
    assert len(json.loads(uninterrupted["results.json"])) == 6

    out = tmp_path / "killed"
    shutil.copytree(plain, out)  # a plain run's files, killed: continued with --resume
    left = kill(out)
    forwards["encoded"].clear()
    forwards["decoded"].clear()
    assert run(trained_run, images, prompts, out, "--format", fmt, "--resume") == 0
    assert forwards["encoded"] == left  # no forward for a finished image
    assert forwards["decoded"] == [stem for stem in left for _ in PROMPTS[f"{stem}.png"]]
    assert files(out) == uninterrupted  # byte for byte, no .partial left

    forwards["encoded"].clear()
    assert run(trained_run, images, prompts, out, "--format", fmt, "--resume") == 0
    assert forwards["encoded"] == []  # everything there: nothing predicted
    assert files(out) == uninterrupted


def test_a_run_started_with_resume_is_the_same_run(trained_run, setup, tmp_path, forwards):
    images, prompts = setup
    assert run(trained_run, images, prompts, tmp_path / "plain") == 0
    out = tmp_path / "resumed"
    assert run(trained_run, images, prompts, out, "--resume") == 0  # an empty folder: the run starts
    assert files(out) == files(tmp_path / "plain")


def test_a_continued_run_with_other_settings_is_refused_naming_what_differs(
    trained_run, setup, tmp_path, capsys
):
    images, prompts = setup
    out = tmp_path / "out"
    assert run(trained_run, images, prompts, out) == 0
    capsys.readouterr()
    kill(out)
    before = files(out)
    other_model = tmp_path / "other_run"
    shutil.copytree(trained_run, other_model)
    with (other_model / "checkpoints" / "last.ckpt").open("ab") as handle:
        handle.write(b"\0")  # other weights (refused before they are loaded)
    other_prompts = tmp_path / "other.json"
    other_prompts.write_text(json.dumps({**PROMPTS, "d.png": [{"points": [[21, 14]]}]}))
    cases = [
        (trained_run, prompts, ["--seed", "3"], "seed: 0 -> 3"),
        (trained_run, prompts, ["--tile", "32"], "tile: null -> 32"),
        (trained_run, prompts, ["--format", "labels"], 'format: "instances" -> "labels"'),
        (trained_run, other_prompts, [], f"prompts: {prompts} (SHA-256 {sha256(prompts)[:12]}) -> "),
        (other_model, prompts, [], f"model: {trained_run / 'checkpoints' / 'last.ckpt'} (SHA-256 "),
    ]
    for model, given, args, named in cases:
        assert run(model, images, given, out, "--resume", *args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "other settings" in err and named in err, err
    assert files(out) == before  # nothing written, nothing removed


def test_a_run_on_another_device_is_continued_only_there(trained_run, setup, tmp_path, capsys):
    """A GPU model (or the CPU) computes other last bits: the record holds what ran the first images."""
    images, prompts = setup
    out = tmp_path / "out"
    assert run(trained_run, images, prompts, out) == 0
    capsys.readouterr()
    record = json.loads((out / "samflow_prompts.json").read_text())
    assert record["device"] == "cpu"
    kill(out)
    record["device"] = "NVIDIA H100 80GB HBM3"  # as a run on that GPU writes it
    (out / "samflow_prompts.json").write_text(json.dumps(record, indent=2) + "\n")
    before = files(out)
    assert run(trained_run, images, prompts, out, "--resume") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'device: "NVIDIA H100 80GB HBM3" -> "cpu"' in err, err
    assert files(out) == before


def test_resume_is_refused_without_a_record_and_with_overwrite(trained_run, setup, tmp_path, capsys):
    images, prompts = setup
    out = tmp_path / "out"
    assert run(trained_run, images, prompts, out) == 0
    capsys.readouterr()
    assert run(trained_run, images, prompts, out) == 1  # a plain run into outputs: told of --resume
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume to continue" in err and "pass --overwrite" in err, err
    assert run(trained_run, images, prompts, out, "--resume", "--overwrite") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass one of them" in err, err
    kill(out)
    (out / "samflow_prompts.json").unlink()  # outputs of an unknown run (older samflow, another tool)
    before = files(out)
    assert run(trained_run, images, prompts, out, "--resume") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "but no samflow_prompts.json" in err and "--overwrite" in err, err
    assert files(out) == before
