"""`samflow predict` never writes over its inputs, its ground truth or an earlier run's masks.

Bad-input matrix, predict outputs:

| output folder                                  | result                                        |
|---|---|
| the image folder of the predict data           | exit 1, one line, inputs unchanged            |
| the mask folder of the predict data            | exit 1, one line, ground truth unchanged      |
| a link to (or another spelling of) those       | refused the same way                          |
| an output file that is a link to an input      | refused                                       |
| a new folder                                   | one mask per image                            |
| a folder holding masks of an earlier run       | exit 1, unless `--predictions.overwrite true` |
| two predict images with one stem (two folders) | exit 1, naming both images                    |
| stems equal but for case (`X.png`, `x.png`)    | refused the same way, naming both files       |
| any of the refusals on 2 DDP ranks             | every rank stops, nothing written             |
| two prompt rows of one image, no instance ids  | the run stops at the second one               |
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import samflow_here
from PIL import Image

from samflow.callbacks import MaskWriter
from samflow.callbacks.mask_writer import PredictionOutputError
from samflow.data.listing import find_samples

STEMS = ("a", "b", "c")


def make_root(root: Path, stems=STEMS, size=(40, 30)) -> Path:
    """``root/images/<stem>.png`` and ``root/masks/<stem>.png``: PNG images, so a mask written into the
    image folder would replace them."""
    rng = np.random.default_rng(len(str(root)))
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"{stem}.png"
        )
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[5:20, 5:25] = 255
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def tree_hash(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (so added files count too)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def predict(cwd: Path, data: str, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "predict",
        "--experiment",
        "quickstart",
        "--data.init_args.quickstart",
        "false",
        "--data.init_args.predict",
        data,
        "--predictions.output_dir",
        str(output_dir),
        *extra,
    ]
    return samflow_here(args, cwd)


def error_line(proc: subprocess.CompletedProcess, ranks: int = 1) -> str:
    """The run failed with exit 1 and one line per rank, ``samflow: error: ...``, without a traceback.

    Under DDP both ranks write to one pipe, so their lines may interleave: split on the prefix.
    """
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    messages = [part.split("\n", 1)[0] for part in proc.stderr.split("samflow: error: ")[1:]]
    assert len(messages) == ranks and len(set(messages)) == 1, proc.stderr[-3000:]
    assert messages[0]
    if ranks == 1:
        assert f"samflow: error: {messages[0]}" in proc.stderr.splitlines()
    return "samflow: error: " + messages[0]


def assert_masks(folder: Path, images: Path) -> None:
    written = sorted(folder.glob("*.png"))
    assert [p.stem for p in written] == sorted(STEMS)
    for mask in written:
        assert Image.open(mask).size == Image.open(images / mask.name).size
        assert set(np.unique(np.asarray(Image.open(mask)))) <= {0, 255}


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_predict_into_an_input_folder_is_refused_and_leaves_it_unchanged(tmp_path, folder):
    root = make_root(tmp_path / "data")
    before = tree_hash(root)
    line = error_line(predict(tmp_path, str(root), root / folder))
    assert str(root / folder) in line and f"{root / folder / 'a.png'}" in line
    assert "--predictions.output_dir" in line
    assert tree_hash(root) == before


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A predict into a new folder, which writes one mask per image: (work dir, data root, output)."""
    work = tmp_path_factory.mktemp("predict")
    root = make_root(work / "data")
    out = work / "out"
    proc = predict(work, str(root), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_masks(out, root / "images")
    return work, root, out


def test_the_record_names_the_prompts_the_masks_were_made_with(first_run, tmp_path):
    """A predict folder without masks is predicted without prompts (with a warning), but its record held
    only the data's prompt setting (a box), as if boxes had been drawn."""
    work, root, out = first_run
    record = json.loads((out / MaskWriter.RECORD).read_text())["predict_data"]
    assert list(record["predicted_with"]) == ["predict"]
    assert record["predicted_with"]["predict"].startswith("BoxPrompt(")
    bare = tmp_path / "bare"
    shutil.copytree(root / "images", bare / "images")
    proc = predict(work, str(bare), tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / MaskWriter.RECORD).read_text())["predict_data"]
    assert record["predicted_with"] == {"predict": "NoPrompt()"}


def test_predict_again_into_the_same_folder_is_refused(first_run):
    work, root, out = first_run
    before = tree_hash(out)
    line = error_line(predict(work, str(root), out))
    assert str(out) in line and "--predictions.overwrite true" in line and "a.png" in line
    assert tree_hash(out) == before


def test_overwrite_replaces_the_earlier_masks(first_run):
    work, root, out = first_run
    stale = np.full((30, 40), 7, np.uint8)  # no mask has the value 7
    for stem in STEMS:
        Image.fromarray(stale).save(out / f"{stem}.png")
    (out / "notes.txt").write_text("kept")
    inputs = tree_hash(root)
    proc = predict(work, str(root), out, "--predictions.overwrite", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_masks(out, root / "images")  # every stale file replaced by a 0 / 255 mask
    assert (out / "notes.txt").read_text() == "kept"  # files the run does not write are left alone
    assert tree_hash(root) == inputs


def test_overwrite_still_refuses_an_input_folder(tmp_path):
    root = make_root(tmp_path / "data")
    before = tree_hash(root)
    line = error_line(predict(tmp_path, str(root), root / "masks", "--predictions.overwrite", "true"))
    assert "ground-truth mask" in line
    assert tree_hash(root) == before


def test_two_images_with_one_stem_are_refused_naming_both(tmp_path):
    first = make_root(tmp_path / "first", stems=("a", "x"))
    second = make_root(tmp_path / "second", stems=("x", "y"))
    out = tmp_path / "out"
    spec = f"[{{root: {first}}}, {{root: {second}}}]"
    line = error_line(predict(tmp_path, spec, out))
    assert str(first / "images" / "x.png") in line and str(second / "images" / "x.png") in line
    assert str(out / "x.png") in line
    assert not out.exists() or not list(out.iterdir())


def test_stems_equal_but_for_case_are_refused_naming_both(tmp_path):
    """``X.png`` and ``x.png`` are one file on a case-insensitive disk (macOS, Windows): the second
    mask would silently replace the first, so they are refused like one stem, with their real names."""
    first = make_root(tmp_path / "first", stems=("a", "X"))
    second = make_root(tmp_path / "second", stems=("x", "y"))
    samples = find_samples(first) + find_samples(second)
    out = tmp_path / "out"
    for writer in (MaskWriter(), MaskWriter(overwrite=True, save_probabilities=True)):
        problem = writer.check_output(out, samples)
        assert problem and "case-insensitive" in problem and "--predictions.output_dir" in problem
        assert str(first / "images" / "X.png") in problem and str(second / "images" / "x.png") in problem
        assert str(out / "X.png") in problem and str(out / "x.png") in problem
    # stems that differ in more than case, and one root listed twice, are not refused
    assert MaskWriter().check_output(out, find_samples(first) + find_samples(first)) is None
    third = make_root(tmp_path / "third", stems=("xx",))
    assert MaskWriter().check_output(out, find_samples(first) + find_samples(third)) is None


def test_ddp_refuses_on_every_rank_after_a_first_run(tmp_path):
    """On two processes the check runs on rank 0 before any rank writes (a first run is not refused
    by masks another rank just wrote), and a refusal stops both ranks."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    root = make_root(tmp_path / "data")
    out = tmp_path / "out"
    proc = predict(tmp_path, str(root), out, *ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_masks(out, root / "images")
    before = tree_hash(tmp_path)
    line = error_line(predict(tmp_path, str(root), out, *ddp), ranks=2)
    assert "--predictions.overwrite true" in line
    assert {k: v for k, v in tree_hash(tmp_path).items() if not k.startswith("runs")} == {
        k: v for k, v in before.items() if not k.startswith("runs")
    }


# ---- the check itself, on folders the command line does not reach easily ----
def test_a_link_to_the_mask_folder_is_refused(tmp_path):
    root = make_root(tmp_path / "data")
    link = tmp_path / "link"
    link.symlink_to(root / "masks", target_is_directory=True)
    problem = MaskWriter(overwrite=True).check_output(link, find_samples(root))
    assert problem and str(link) in problem and "ground-truth mask" in problem


def test_inputs_given_through_a_link_are_found_in_their_real_folder(tmp_path):
    root = make_root(tmp_path / "data")
    (tmp_path / "view" / "images").mkdir(parents=True)
    for stem in STEMS:
        (tmp_path / "view" / "images" / f"{stem}.png").symlink_to(root / "images" / f"{stem}.png")
    problem = MaskWriter(overwrite=True).check_output(
        root / "images", find_samples(tmp_path / "view", require_masks=False)
    )
    assert problem and "input image" in problem


def test_an_output_file_linked_to_an_input_is_refused(tmp_path):
    root = make_root(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").symlink_to(root / "masks" / "b.png")
    problem = MaskWriter(overwrite=True).check_output(out, find_samples(root))
    assert problem and str(out / "b.png") in problem and str(root / "masks" / "b.png") in problem


def test_probability_files_count_as_outputs(tmp_path):
    root = make_root(tmp_path / "data", stems=("a", "a_prob"))
    problem = MaskWriter(save_probabilities=True).check_output(tmp_path / "out", find_samples(root))
    assert problem and "a_prob.png" in problem
    assert MaskWriter().check_output(tmp_path / "out", find_samples(root)) is None
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a_prob.png").write_bytes(b"earlier")
    problem = MaskWriter().check_output(tmp_path / "out", find_samples(root))
    assert problem and "--predictions.overwrite true" in problem


def test_unrelated_files_do_not_block_and_a_file_is_not_a_folder(tmp_path):
    root = make_root(tmp_path / "data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "z.png").write_bytes(b"other")
    assert MaskWriter().check_output(tmp_path / "out", find_samples(root)) is None
    problem = MaskWriter().check_output(tmp_path / "out" / "z.png", find_samples(root))
    assert problem and "is a file, not a folder" in problem


def test_another_spelling_of_the_image_folder_is_refused_on_a_case_insensitive_disk(tmp_path):
    root = make_root(tmp_path / "data")
    upper = root / "IMAGES"
    if not upper.exists():
        pytest.skip("this file system tells IMAGES from images")
    problem = MaskWriter(overwrite=True).check_output(upper, find_samples(root))
    assert problem and "input image" in problem


def test_rows_that_would_write_one_file_twice_stop_the_run(tmp_path):
    """Several prompt rows of one image without instance ids (no data module of samflow makes them)
    would overwrite each other's mask: the second one stops the run instead; instance ids name each."""
    trainer = SimpleNamespace(
        log_dir=str(tmp_path),
        is_global_zero=True,
        strategy=SimpleNamespace(broadcast=lambda value, src: value),
        predict_dataloaders=None,
    )
    mask = torch.zeros(4, 5, dtype=torch.bool)
    rows = {"id": ["a", "a"], "masks": [mask, ~mask], "probs": [mask.float(), (~mask).float()]}
    writer = MaskWriter(output_dir=str(tmp_path / "out"))
    writer.on_predict_start(trainer, None)
    with pytest.raises(PredictionOutputError, match="Two prompt rows would write the same mask"):
        writer.write_on_batch_end(trainer, None, rows, None, None, 0, 0)
    writer.on_predict_start(trainer, None)
    writer.write_on_batch_end(trainer, None, {**rows, "instance": [7, 8]}, None, None, 0, 0)
    writer.teardown(trainer, None, "predict")  # the run ends: the folder's lock file (held meanwhile) goes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a.png",
        "a_7.png",
        "a_8.png",
        MaskWriter.RECORD,
    ]
    assert np.asarray(Image.open(tmp_path / "out" / "a_8.png")).min() == 255
