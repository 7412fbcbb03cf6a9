"""The SAPNet stage commands refuse bad input with one line that says what to do."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_coco import sapnet_experiment

from samflow.cli import main
from samflow.data.errors import DataError
from samflow.pseudo_masks import pseudo_index_of


def test_pseudo_masks_and_student_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["samflow"])
    exp = sapnet_experiment(tmp_path)
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    args = ["pseudo-masks", "--experiment", str(exp), "--ckpt", str(ckpt), "--out", str(tmp_path / "p.json")]
    assert main(args) == 1
    assert "has no proposal store; set data.init_args.proposals" in capsys.readouterr().err
    (tmp_path / "p.json").write_text("{}")
    assert main(args) == 1
    assert "p.json exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    missing = [
        "pseudo-masks",
        "--experiment",
        str(exp),
        "--ckpt",
        str(tmp_path / "no.ckpt"),
        "--out",
        "q.json",
    ]
    assert main(missing) == 1
    assert "checkpoint" in capsys.readouterr().err
    assert (
        main(["student", "--experiment", str(exp), "--pseudo", str(tmp_path / "none.json"), "--out", "s"])
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.json not found; write it with `samflow pseudo-masks`" in err


def test_the_selection_report_is_read_from_extras():
    index = torch.tensor([2, 0])
    assert torch.equal(pseudo_index_of({"sapnet": SimpleNamespace(pseudo_index=index), "other": 3}), index)
    with pytest.raises(DataError, match=r"exactly one plugin that selects among batch.proposals.*found none"):
        pseudo_index_of({})
    two = {"a": SimpleNamespace(pseudo_index=index), "b": SimpleNamespace(pseudo_index=index)}
    with pytest.raises(DataError, match=r"found \['a', 'b'\]"):
        pseudo_index_of(two)


def test_fit_refuses_proposals_of_another_sam(tmp_path, capsys, monkeypatch):
    from samflow.data.coco import CocoInstances
    from samflow.proposals import write_proposals
    from samflow.sam import build_sam

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    exp = sapnet_experiment(tmp_path)
    data = CocoInstances(tmp_path / "coco" / "instances.json", img_size=128)
    write_proposals(tmp_path / "store", build_sam("tiny", seed=0), data)  # the experiment's SAM (seed 0)
    args = ["fit", "--experiment", str(exp), "--data.init_args.proposals", str(tmp_path / "store")]
    assert main([*args, "--model.sam.seed", "1", "--trainer.max_epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "proposals of another SAM checkpoint" in err and "--overwrite" in err
    assert main([*args, "--data.init_args.seed", "5"]) == 1  # other points: other data
    assert "proposals of other data (differs in: data)" in capsys.readouterr().err
