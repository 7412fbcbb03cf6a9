"""README "Use a trained model" / "From the command line" / "Export": the SAM file elsewhere.

``--sam-checkpoint PATH`` (``sam_checkpoint=``) when the run's SAM file is not at the config's path, for
``samflow predict`` (run folder, ``.ckpt``, export folder) and ``samflow export``; and every error on the
way names a flag the command has (was: ``--model.sam.checkpoint``, a ``samflow fit`` flag, for a run whose
SAM file moved, and ``--force``, which no command has, for an export given another SAM).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.cli import main
from samflow.export import file_sha256
from samflow.prompted_predict import main as prompted_main
from samflow.sam import build_sam

_spec = importlib.util.spec_from_file_location(
    "predictor_conftest", Path(__file__).parent / "predictor" / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run folder, images, prompts) of a trained run whose SAM file was moved to ``moved/sam.pth``."""
    root = tmp_path_factory.mktemp("moved")
    run = _conftest.make_run(root, {"decoder": _conftest.PLUGINS["decoder"]}, steps=1)
    (root / "moved").mkdir()
    shutil.move(root / "sam_tiny.pth", root / "moved" / "sam.pth")
    images = root / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [10, 10, 80, 60]}]}))
    return run, images, prompts


def flags_named(line: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*(?:\.[a-z_0-9]+)*", line))


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def predict_flags() -> set[str]:
    """The flags ``samflow predict --prompts --help`` lists."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        prompted_main(["--help"])
    flags = flags_named(text.getvalue())
    assert {"--sam-checkpoint", "--model", "--device"} <= flags
    return flags


PREDICT_FLAGS = predict_flags()


def test_predict_names_its_own_flag_when_the_runs_sam_file_moved(moved, tmp_path, capsys):
    run, images, prompts = moved
    sam = run.parents[2] / "moved" / "sam.pth"
    base = ["predict", "--images", str(images), "--prompts", str(prompts), "--device", "cpu"]
    outputs = []
    for i, model in enumerate([run, run / "checkpoints" / "last.ckpt"]):
        assert main([*base, "--model", str(model), "--out", str(tmp_path / f"x{i}")]) == 1
        line = one_error_line(capsys)
        assert "--sam-checkpoint" in line and flags_named(line) <= PREDICT_FLAGS, line
        out = tmp_path / f"o{i}"
        assert main([*base, "--model", str(model), "--out", str(out), "--sam-checkpoint", str(sam)]) == 0
        outputs.append(np.asarray(Image.open(out / "masks" / "a_0.png")))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_export_takes_the_sam_file_from_sam_checkpoint(moved, tmp_path, capsys):
    run, images, prompts = moved
    sam = run.parents[2] / "moved" / "sam.pth"
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 1
    line = one_error_line(capsys)
    assert "--sam-checkpoint" in line and "--model.sam.checkpoint" not in line, line
    assert not (tmp_path / "x").exists()
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--sam-checkpoint", str(sam)]) == 0
    manifest = json.loads((out / "samflow.json").read_text())
    assert manifest["sam"]["checkpoint_name"] == "sam.pth"
    assert manifest["sam"]["checkpoint_sha256"] == file_sha256(sam)
    capsys.readouterr()
    # the export predicts with that SAM file; another SAM is refused in one line naming both files, and the
    # way to force it is the Python API's force=True (samflow predict has no flag for it)
    base = [
        "predict",
        "--model",
        str(out),
        "--images",
        str(images),
        "--prompts",
        str(prompts),
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(tmp_path / "p"), "--sam-checkpoint", str(sam)]) == 0
    other = tmp_path / "other.pth"
    torch.save(build_sam("tiny", seed=1).state_dict(), other)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "q"), "--sam-checkpoint", str(other)]) == 1
    line = one_error_line(capsys)
    assert "sam.pth" in line and "other.pth" in line and "force=True" in line, line
    assert flags_named(line) <= PREDICT_FLAGS, line


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("bad", ["missing", "empty", "other_variant"])
def test_a_bad_sam_checkpoint_is_named_with_the_commands_own_flag(moved, tmp_path, capsys, command, bad):
    """A --sam-checkpoint that is missing, unreadable or of another variant: one line naming the file and
    --sam-checkpoint, no flag of ``samflow fit`` (was: ``--model.sam.checkpoint``)."""
    run, images, prompts = moved
    sam = tmp_path / f"{bad}.pth"
    if bad == "empty":
        sam.write_bytes(b"")
    elif bad == "other_variant":
        state = build_sam("tiny", seed=0).state_dict()
        torch.save({k: v for k, v in state.items() if not k.startswith("mask_decoder.")}, sam)
    if command == "predict":
        args = ["predict", "--model", str(run), "--images", str(images), "--prompts", str(prompts)]
        args += ["--device", "cpu", "--out", str(tmp_path / "out"), "--sam-checkpoint", str(sam)]
        known = PREDICT_FLAGS
    else:
        args = ["export", str(run), "--out", str(tmp_path / "out"), "--sam-checkpoint", str(sam)]
        known = {"--sam-checkpoint", "--out", "--merged", "--onnx", "--single-mask"}
    capsys.readouterr()
    assert main(args) == 1
    line = one_error_line(capsys)
    assert str(sam) in line and "--sam-checkpoint" in line, line
    assert flags_named(line) <= known, line
    assert not (tmp_path / "out").exists()
