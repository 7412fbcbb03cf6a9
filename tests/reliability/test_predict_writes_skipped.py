"""`samflow predict --prompts ... --skip-bad`: a run that predicted nothing is not a success.

With every image unreadable the run lists each one and ends with one error line naming
``skipped.json``, exit 1; with some images readable it still exits 0 and lists the skipped ones.
The model is a stand-in (the command loads it before reading any image): these tests are about the
exit status and the files, not the masks (``../predictor/test_prompted_predict.py`` checks those).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.cli import main
from samflow.predictor import Predictor


class BoxPredictor:
    """Predicts each box prompt's box as the mask, score 0.5."""

    device = torch.device("cpu")  # as Predictor's: the run's record names it

    def set_image(self, image: np.ndarray) -> None:
        self.shape = image.shape[:2]

    def predict(self, *, point_coords, point_labels, box, multimask_output):
        mask = np.zeros((1, *self.shape), bool)
        x0, y0, x1, y1 = np.asarray(box).astype(int)
        mask[0, y0:y1, x0:x1] = True
        return mask, np.array([0.5]), None

    def reset_image(self) -> None:
        pass


@pytest.fixture()
def images(tmp_path, monkeypatch) -> Path:
    """``a.png``, ``b.png`` readable; a model path that loads the stand-in."""
    monkeypatch.setattr(Predictor, "from_run", classmethod(lambda cls, *args, **kwargs: BoxPredictor()))
    folder = tmp_path / "images"
    folder.mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / f"{stem}.png")
    return folder


def predict(images: Path, out: Path) -> int:
    prompts = images.parent / "prompts.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [4, 6, 30, 24]}], "b.png": [{"box": [1, 2, 9, 9]}] * 2}))
    args = ["--images", str(images), "--out", str(out), "--model", str(images.parent / "run"), "--skip-bad"]
    return main(["predict", "--prompts", str(prompts), *args])


def test_every_image_unreadable_exits_1_in_one_line_naming_the_skipped_list(images, tmp_path, capsys):
    for image in images.iterdir():
        image.write_bytes(b"not a png")
    out = tmp_path / "out"
    assert predict(images, out) == 1
    text = capsys.readouterr()
    lines = text.err.splitlines()
    listed = [line.split()[4] for line in lines if line.startswith("samflow: skipped unreadable image ")]
    assert listed == [str(images / "a.png"), str(images / "b.png")]  # each bad image is still listed
    (error,) = [line for line in lines if line.startswith("samflow: error:")]
    assert "nothing predicted" in error and str(out / "skipped.json") in error
    assert "predicted 0 prompts" not in text.out
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(s["file_name"], s["prompts"]) for s in skipped] == [("a.png", 1), ("b.png", 2)]
    assert json.loads((out / "results.json").read_text()) == []


def test_some_images_readable_exits_0_and_lists_the_skipped_ones(images, tmp_path, capsys):
    (images / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert predict(images, out) == 0
    text = capsys.readouterr()
    assert "samflow: error" not in text.err and f"skipped unreadable image {images / 'b.png'}" in text.err
    assert "predicted 1 prompts on 1 images" in text.out and "skipped 1 unreadable (2 prompts" in text.out
    assert [s["file_name"] for s in json.loads((out / "skipped.json").read_text())] == ["b.png"]
    assert [r["file_name"] for r in json.loads((out / "results.json").read_text())] == ["a.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png"]
