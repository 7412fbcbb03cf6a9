"""README (`samflow student`): ``trainer.barebones true`` is refused in one line before anything is
written, and a run writes exactly checkpoints/last.ckpt, metrics.csv, student_metrics.json and
results.json (COCO results that ``COCO.loadRes`` reads, with the original category ids)."""

from __future__ import annotations

import json
import sys

from pycocotools.coco import COCO
from test_student import HEAD, _student_experiment

from samflow.cli import main


def test_barebones_is_refused_and_a_run_writes_the_four_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["samflow"])
    monkeypatch.chdir(tmp_path)
    exp, pseudo = _student_experiment(tmp_path)
    base = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--head", json.dumps(HEAD)]
    capsys.readouterr()
    assert main([*base, "--out", "b", "--trainer.barebones", "true"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.barebones True is not supported" in err
    assert not (tmp_path / "b").exists()

    exp_text = exp.read_text().replace(
        "    batch_size: 2\n", f"    batch_size: 2\n    test: {{annotations: {pseudo}}}\n"
    )
    exp.write_text(exp_text)
    args = [*base, "--out", "s", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]
    assert main(args) == 0
    out = tmp_path / "s"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "checkpoints/last.ckpt", "metrics.csv", "results.json", "student_metrics.json"
    ]  # fmt: skip
    truth = COCO(str(pseudo))
    results = json.loads((out / "results.json").read_text())
    if results:  # an untrained head may detect nothing; what it writes loads as COCO results
        truth.loadRes(str(out / "results.json"))
        assert {r["category_id"] for r in results} <= set(truth.getCatIds())
