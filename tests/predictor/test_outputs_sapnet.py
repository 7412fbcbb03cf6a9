"""The SAPNet stage commands' outputs: ``samflow proposals``, ``pseudo-masks`` and ``student`` refuse an
output path they cannot write before anything runs, and a student run never mixes with an earlier one.

| case                                                 | result                                              |
|---|---|
| ``proposals --out`` an existing file                 | one error (was: FileExistsError from mkdir)          |
| ``pseudo-masks --out`` a folder, ``--overwrite``     | refused before any image (was: IsADirectoryError after the whole run) |
| ``student --out`` holding an earlier student run     | refused; ``--overwrite`` replaces it (was: ``last-v1.ckpt`` beside the earlier ``last.ckpt``) |
| ``student --out`` an existing file                   | one line (was: FileExistsError traceback)            |
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sapnet_e2e"))
from overlap_coco import make_overlap_coco

from samflow.cli import main
from samflow.commands import build_experiment
from samflow.data.errors import DataError
from samflow.proposals import write_proposals
from samflow.pseudo_masks import write_pseudo_masks
from samflow.sam import build_sam

HEAD = json.dumps({"feat_channels": 16, "mask_channels": 8, "num_convs": 1, "num_grids": [8, 6, 4]})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sapnet")
    annotations = make_overlap_coco(root / "coco", n_images=2)
    exp = root / "exp.yaml"
    exp.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins:\n    sap: {class_path: SAPNet, init_args: {num_classes: 2}}\n"
        "  losses: {}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n    batch_size: 2\n"
        "trainer: {accelerator: cpu, devices: 1, max_epochs: 1, overfit_batches: 1}\n"
    )
    return exp, annotations


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["samflow"])


def test_proposals_into_a_file_is_refused(experiment, tmp_path):
    exp, _ = experiment
    _, data = build_experiment(str(exp), [])
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(DataError, match=r"--out .*taken is a file, not a folder"):
        write_proposals(taken, build_sam("tiny", seed=0), data.dataset("train"))
    assert taken.read_text() == "a file"


def test_pseudo_masks_into_a_folder_is_refused_before_any_image(experiment, tmp_path):
    exp, _ = experiment
    _, data = build_experiment(str(exp), ["--data.init_args.proposals", "null"])
    store = tmp_path / "store"
    write_proposals(store, build_sam("tiny", seed=0), data.dataset("train"), shard_size=2)
    module, data = build_experiment(str(exp), ["--data.init_args.proposals", str(store)])
    calls = []
    module.forward = lambda *a, **k: calls.append(1)
    folder = tmp_path / "pseudo"
    folder.mkdir()
    with pytest.raises(DataError, match=r"--out .*pseudo is a folder; give the JSON file"):
        write_pseudo_masks(module, data.dataset("train"), folder)
    assert calls == [] and list(folder.iterdir()) == []


def test_a_second_student_run_into_one_folder_is_refused_unless_overwrite(experiment, tmp_path, capsys):
    exp, pseudo = experiment
    out = tmp_path / "student"
    args = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--head", HEAD, "--out", str(out)]
    assert main(args) == 0
    first = (out / "checkpoints" / "last.ckpt").read_bytes()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier student run" in err and "--overwrite" in err, err
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == first
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    assert (out / "notes.txt").read_text() == "mine"
    taken = tmp_path / "taken"
    taken.write_text("a file")
    capsys.readouterr()
    assert main([*args[:-1], str(taken)]) == 1
    assert (
        capsys.readouterr().err
        == f"samflow: error: samflow student: --out {taken} is a file, not a folder; choose a folder.\n"
    )
