"""``samflow predict --prompts`` writes each mask PNG whole or not at all.

A run stopped while a PNG is half written (a full disk, a kill) must not leave a truncated file under
an output's name: it looks complete to the next step. Each file is written under a hidden temporary
name (``.<name>.partial``) and renamed when whole; a killed run's temporaries are not outputs (they
never make the next run need ``--overwrite``), and the next run on these images removes them.

The model is a stand-in that predicts each prompt's box as the mask, so every file's content is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import crashing_png_saves
from PIL import Image

from samflow import prompted_predict
from samflow.prompt_files import PromptFileError

SIZE = (30, 40)  # (H, W)
BOXES = [[2, 3, 10, 12], [5, 5, 30, 20], [20, 1, 39, 29]]


class BoxPredictor:
    """``SamPredictor``'s interface: the mask of a prompt is its box (x0 <= x < x1, y0 <= y < y1)."""

    device = torch.device("cpu")  # the run's record names it

    def set_image(self, image: np.ndarray) -> None:
        self.shape = image.shape[:2]

    def predict(self, point_coords, point_labels, box, multimask_output):
        mask = np.zeros(self.shape, bool)
        x0, y0, x1, y1 = np.asarray(box, int)
        mask[y0:y1, x0:x1] = True
        return mask[None], np.array([0.5]), None

    def reset_image(self) -> None:
        pass


def box_mask(box: list[int]) -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    return mask


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    """Images ``a.png`` (three box prompts) and ``b.png`` (one), and the argv of a run into ``out``."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(images / name)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": [{"box": b} for b in BOXES], "b.png": [{"box": BOXES[0]}]}))
    monkeypatch.setattr(prompted_predict, "_load_predictor", lambda *args: BoxPredictor())
    out = tmp_path / "out"
    argv = ["--model", "run", "--images", str(images), "--prompts", str(prompts), "--out", str(out)]
    return out, argv


@pytest.fixture()
def crash_on(monkeypatch):
    """``crash_on(n)``: the n-th PNG save after it writes half of its bytes, then raises (0: none)."""
    return crashing_png_saves(monkeypatch)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_masks(out: Path, names: list[str]) -> None:
    """Exactly these mask files (hidden ones aside), each a complete PNG holding its prompt's box."""
    assert sorted(p.name for p in (out / "masks").iterdir() if not p.name.startswith(".")) == sorted(names)
    expected = {"a_0.png": BOXES[0], "a_1.png": BOXES[1], "a_2.png": BOXES[2], "b_0.png": BOXES[0]}
    for name in names:
        with Image.open(out / "masks" / name) as image:
            np.testing.assert_array_equal(np.asarray(image), box_mask(expected[name]))  # truncated: fails


def test_a_crash_mid_png_leaves_no_truncated_mask_under_its_name(setup, crash_on):
    out, argv = setup
    crash_on(2)  # a_1.png
    with pytest.raises(OSError, match="simulated"):
        prompted_predict.main(argv)
    assert_masks(out, ["a_0.png"])  # the old writer left half of a_1.png here
    # no temporary, no results.json: the run did not finish (its record is written before any output)
    assert files_in(out) == ["masks/a_0.png", "samflow_prompts.json"]
    crash_on(0)
    with pytest.raises(PromptFileError, match="pass --overwrite"):  # a_0.png is an earlier run's output
        prompted_predict.main(argv)
    assert prompted_predict.main([*argv, "--overwrite"]) == 0
    assert_masks(out, ["a_0.png", "a_1.png", "a_2.png", "b_0.png"])
    assert files_in(out) == [
        "masks/a_0.png",
        "masks/a_1.png",
        "masks/a_2.png",
        "masks/b_0.png",
        "results.json",
        "results/a.json",
        "results/b.json",
        "samflow_prompts.json",
        "skipped.json",
    ]


def test_a_crash_mid_label_image_leaves_no_truncated_label_image(setup, crash_on):
    out, argv = setup
    crash_on(1)
    with pytest.raises(OSError, match="simulated"):
        prompted_predict.main([*argv, "--format", "labels"])
    assert files_in(out) == ["samflow_prompts.json"]  # the old writer left half of labels/a.png


def test_a_killed_runs_temporaries_are_not_outputs_and_the_next_run_removes_them(setup):
    """A kill -9 runs no clean-up: its temporaries stay. The next run is not refused because of them
    and removes those of its images' outputs; other files are left alone."""
    out, argv = setup
    (out / "masks").mkdir(parents=True)
    (out / "labels").mkdir()
    left = [
        "masks/.a_1.png.partial",
        "masks/.a_7.png.partial",
        "labels/.a.png.partial",
        ".results.json.partial",
    ]
    kept = ["masks/.z_0.png.partial", "masks/.notes.partial", "notes.partial"]  # not of these images
    for name in left + kept:
        (out / name).write_bytes(b"\x89PNG\r\n\x1a\n half")
    assert prompted_predict.main(argv) == 0
    assert_masks(out, ["a_0.png", "a_1.png", "a_2.png", "b_0.png"])
    assert [name for name in left + kept if (out / name).exists()] == kept
