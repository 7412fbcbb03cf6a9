"""``samflow predict --prompts``: what it writes never collides, never outlives a run, and never
looks complete when the run did not finish.

| case                                                        | result                                   |
|---|---|
| ``a.png`` and ``A.jpg`` (one name on a case-insensitive disk) | exit 1 before anything runs, both named |
| a prompt file with no prompt for any image                  | exit 1, the file named, nothing written  |
| ``--overwrite`` after a run with more prompts               | the earlier run's extra masks removed    |
| a stale ``masks/<stem>_<k>.png`` of these images            | refused unless ``--overwrite``           |
| ``--overwrite`` interrupted half-way                        | no ``results.json`` (the earlier one removed) |
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from helpers import prompted_predict_args
from PIL import Image

from samflow.cli import main

BOX = [4, 6, 30, 24]


def _images(folder: Path, names: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _prompts(tmp_path: Path, prompts: dict, name: str = "prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(prompts))
    return path


def _args(run: Path, images: Path, prompts: Path, out: Path) -> list[str]:
    return prompted_predict_args(prompts, run, images, out, "--device", "cpu")


def test_names_that_differ_only_in_case_are_refused(trained_run, tmp_path, capsys):
    """``a_0.png`` and ``A_0.png`` are one file on macOS and Windows: the second would replace the first."""
    images = _images(tmp_path / "images", ("a.png", "A.jpg"))
    prompts = _prompts(tmp_path, {"a.png": [{"box": BOX}], "A.jpg": [{"box": BOX}]})
    out = tmp_path / "out"
    assert main(_args(trained_run, images, prompts, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.png" in err and "A.jpg" in err and "case-insensitive" in err, err
    assert not out.exists()


def test_a_prompt_file_with_no_prompt_is_refused(trained_run, tmp_path, capsys):
    images = _images(tmp_path / "images", ("a.png",))
    out = tmp_path / "out"
    for prompts in ({}, {"a.png": []}):
        path = _prompts(tmp_path, prompts)
        assert main(_args(trained_run, images, path, out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and "nothing to predict" in err, err
        assert not out.exists()


def test_overwrite_removes_the_masks_an_earlier_run_wrote_for_more_prompts(trained_run, tmp_path, capsys):
    images = _images(tmp_path / "images", ("a.png", "b.png"))
    three = _prompts(tmp_path, {"a.png": [{"box": BOX}] * 3}, "three.json")
    one = _prompts(tmp_path, {"a.png": [{"box": BOX}]}, "one.json")
    out = tmp_path / "out"
    assert main(_args(trained_run, images, three, out)) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png", "a_1.png", "a_2.png"]
    (out / "masks" / "b_0.png").write_bytes(b"another image's mask")  # not an output of this run
    (out / "results.json").unlink()  # an earlier mask alone still blocks a run without --overwrite
    (out / "skipped.json").unlink()
    (out / "masks" / "a_0.png").unlink()
    assert main(_args(trained_run, images, one, out)) == 1
    assert "a_1.png" in capsys.readouterr().err
    assert main([*_args(trained_run, images, one, out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png", "b_0.png"]
    assert len(json.loads((out / "results.json").read_text())) == 1


def test_an_interrupted_overwrite_leaves_no_earlier_results(trained_run, tmp_path):
    """The earlier ``results.json`` beside half-replaced masks would look like a finished run."""
    images = _images(tmp_path / "images", ("a.png", "b.png"))
    prompts = _prompts(tmp_path, {"a.png": [{"box": BOX}], "b.png": [{"box": BOX}]})
    out = tmp_path / "out"
    assert main(_args(trained_run, images, prompts, out)) == 0
    assert (out / "results.json").is_file()
    (images / "b.png").write_bytes(b"not a png")  # the run stops at the second image
    assert main([*_args(trained_run, images, prompts, out), "--overwrite"]) == 1
    assert not (out / "results.json").exists() and not (out / "skipped.json").exists()
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png"]


def test_overwrite_in_the_other_format_removes_the_earlier_format(trained_run, tmp_path):
    images = _images(tmp_path / "images", ("a.png",))
    prompts = _prompts(tmp_path, {"a.png": [{"box": BOX}, {"box": [1, 1, 20, 20]}]})
    out = tmp_path / "out"
    assert main(_args(trained_run, images, prompts, out)) == 0
    assert main([*_args(trained_run, images, prompts, out), "--format", "labels", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == []
    assert (out / "labels" / "a.png").is_file()
