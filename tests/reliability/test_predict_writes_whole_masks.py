"""`samflow predict` (Lightning) writes each mask whole or not at all.

A run killed while a PNG is half written must not leave a truncated file under a mask's final name
(it looks complete to the next step); each mask is written as ``<name>.partial`` and renamed into
place. A killed run's ``.partial`` leftovers are not outputs: they do not make the next run need
``--predictions.overwrite``, and that run removes them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import crashing_png_saves
from PIL import Image

from samflow.callbacks import MaskWriter
from samflow.callbacks.mask_writer import PredictionOutputError
from samflow.data.listing import find_samples

STEMS = ("a", "b", "c")
SIZE = (30, 40)  # (H, W)


def make_root(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in STEMS:
        Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros(SIZE, np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


def trainer_on(root: Path, out: Path) -> SimpleNamespace:
    """The parts of a one-process Trainer that ``MaskWriter`` reads, predicting the folder ``root``."""
    loader = SimpleNamespace(dataset=SimpleNamespace(samples=find_samples(root)))
    return SimpleNamespace(
        log_dir=str(out.parent),
        is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda value, src: value),
        predict_dataloaders=[loader],
    )


def predictions() -> dict:
    """``predict_step``'s output for the three images: mask k has k + 1 foreground rows."""
    masks = [torch.zeros(SIZE, dtype=torch.bool) for _ in STEMS]
    for k, mask in enumerate(masks):
        mask[: k + 1] = True
    return {"id": list(STEMS), "masks": masks, "probs": [m.float() for m in masks]}


def run(writer: MaskWriter, trainer: SimpleNamespace) -> None:
    """The writer's hooks as Lightning calls them: ``on_exception`` on an error, ``teardown`` at the end
    (each lets go of the folder's lock, ``.predict.lock``)."""
    try:
        writer.on_predict_start(trainer, None)
        writer.write_on_batch_end(trainer, None, predictions(), None, None, 0, 0)
    except BaseException as err:
        writer.on_exception(trainer, None, err)
        raise
    writer.teardown(trainer, None, "predict")


def assert_whole(out: Path, stems) -> None:
    """Exactly these masks and the run's record, each mask a complete PNG with its own mask, and no
    ``.partial`` file."""
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{s}.png" for s in stems), MaskWriter.RECORD])
    for stem in stems:
        with Image.open(out / f"{stem}.png") as image:
            mask = np.asarray(image)  # a truncated PNG fails here
        assert mask.shape == SIZE and mask[: STEMS.index(stem) + 1].min() == 255 and mask.sum() > 0


@pytest.fixture()
def crash_on(monkeypatch):
    """``crash_on(n)``: the n-th PNG save after it writes half of its bytes, then raises (0: none)."""
    return crashing_png_saves(monkeypatch)


def test_a_crash_mid_write_leaves_no_mask_under_its_final_name_and_a_rerun_works(tmp_path, crash_on):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    crash_on(1)
    with pytest.raises(OSError, match="simulated"):
        run(MaskWriter(output_dir=str(out)), trainer_on(root, out))
    assert not (out / "a.png").exists()  # the old writer left half a PNG here
    assert [p.name for p in out.iterdir()] == [MaskWriter.RECORD]  # written before the first mask
    crash_on(0)  # no more crashes
    run(MaskWriter(output_dir=str(out)), trainer_on(root, out))  # not refused: nothing was written
    assert_whole(out, STEMS)


def test_masks_written_before_the_crash_are_whole_and_still_need_overwrite(tmp_path, crash_on):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    crash_on(2)
    with pytest.raises(OSError, match="simulated"):
        run(MaskWriter(output_dir=str(out)), trainer_on(root, out))
    assert_whole(out, ["a"])  # b.png absent, not half written
    crash_on(0)
    with pytest.raises(PredictionOutputError, match="already holds 1 of the 3 files") as refused:
        run(MaskWriter(output_dir=str(out)), trainer_on(root, out))
    assert str(out / "a.png") in str(refused.value) and "--predictions.overwrite true" in str(refused.value)
    run(MaskWriter(output_dir=str(out), overwrite=True), trainer_on(root, out))
    assert_whole(out, STEMS)


def test_a_killed_runs_partial_files_are_not_outputs_and_the_next_run_removes_them(tmp_path):
    """A kill -9 runs no clean-up: its ``.partial`` file stays. The next run is not refused because of it
    (with or without probabilities), and removes it; other files are left alone."""
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "b.png.partial").write_bytes(b"\x89PNG\r\n\x1a\n half")
    (out / "b_prob.png.partial").write_bytes(b"\x89PNG half")
    (out / "notes.partial").write_text("kept")
    writer = MaskWriter(output_dir=str(out), save_probabilities=True)
    assert writer.check_output(out, find_samples(root)) is None
    run(writer, trainer_on(root, out))
    assert sorted(p.name for p in out.glob("*.partial")) == ["notes.partial"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{s}{x}.png" for s in STEMS for x in ("", "_prob")
    )
