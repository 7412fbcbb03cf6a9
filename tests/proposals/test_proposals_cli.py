"""`samflow proposals --experiment FILE` end to end on a tiny SAM and a generated COCO set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from tiny_coco import make_tiny_coco  # noqa: E402

from samflow.cli import main  # noqa: E402


def _experiment(tmp_path: Path, data: str) -> Path:
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam:\n    variant: tiny\n"
        f"data:\n  class_path: {data}\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {tmp_path / 'coco' / 'instances.json'}}}\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
    )
    return exp


def test_cli_writes_store_and_refuses_other_data(tmp_path, capsys):
    make_tiny_coco(tmp_path / "coco")
    exp = _experiment(tmp_path, "samflow.data.coco.CocoDataModule")
    out = tmp_path / "store"
    assert main(["proposals", "--experiment", str(exp), "--out", str(out), "--shard-size", "2"]) == 0
    anns = json.loads((out / "proposals.json").read_text())["annotations"]
    assert len(anns) == 9 and all(len(a["segmentation"]) == 6 for a in anns)
    # other points (another seed) -> another data key: refused with one line, exit 1
    args = ["proposals", "--experiment", str(exp), "--out", str(out), "--data.init_args.seed", "7"]
    assert main(args) == 1
    assert "differs in: data" in capsys.readouterr().err


def test_cli_needs_coco_data(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam:\n    variant: tiny\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n  init_args:\n    img_size: 128\n"
        "trainer:\n  accelerator: cpu\n"
    )
    assert main(["proposals", "--experiment", str(exp), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "data is SegmentationDataModule" in err and "samflow.data.coco.CocoDataModule" in err


def test_cli_refuses_sizes_below_one(tmp_path, capsys):
    make_tiny_coco(tmp_path / "coco")
    exp = _experiment(tmp_path, "samflow.data.coco.CocoDataModule")
    out = tmp_path / "store"
    for flag, value in (("--batch-size", "-1"), ("--batch-size", "0"), ("--shard-size", "0")):
        assert main(["proposals", "--experiment", str(exp), "--out", str(out), flag, value]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"samflow proposals: argument {flag}: must be an integer >= 1, got {value}" in err
        assert not (out / "proposals.json").exists()
