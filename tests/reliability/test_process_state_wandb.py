"""W&B across runs: a fit logs in the mode of its own start and leaves no W&B service behind.

W&B reads its environment once a process (its setup singleton) and starts a service process, named in
``WANDB_SERVICE``, that the processes it starts attach to. Before: an offline fit after a disabled run
of the process logged nothing (W&B kept the first run's mode), and a ``samflow fit`` started by a
process with a service failed ("run-<id>.wandb.syncstate: no such file or directory": the service
resolved the run's relative folder in its own working directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import run_samflow, short_run

TINY = [
    "--quiet", "--trainer.enable_progress_bar=false", "--data.init_args.img_size=64",
    "--model.sam.img_size=64", *short_run(train=1, val=1, batch_size=2),
    "--data.init_args.quickstart.n_train", "2", "--data.init_args.quickstart.n_val", "2",
]  # fmt: skip


def _offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("runs/wandb/offline-run-*/run-*.wandb"))


def test_an_offline_fit_after_a_disabled_one_logs_its_metrics_and_ends_its_service(tmp_path, monkeypatch):
    from samflow.cli import main

    for name in ("WANDB_SERVICE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.quickstart.root", str(tmp_path / "data")]
    hooks = (sys.exit, sys.excepthook)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["fit", "--experiment", "quickstart", *TINY, *data]) == 0
    assert not (tmp_path / "runs" / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["fit", "--experiment", "quickstart", *TINY, *data]) == 0
    runs = _offline_runs(tmp_path)
    assert len(runs) == 1, sorted(str(p) for p in (tmp_path / "runs").rglob("*"))[:30]
    assert b"val/dice" in runs[0].read_bytes()  # the validation metrics were logged
    # the service the offline run started ended with it: a later run or child process starts its own
    assert "WANDB_SERVICE" not in os.environ
    assert (sys.exit, sys.excepthook) == hooks  # W&B had replaced both when it started the service


def test_a_fit_started_by_a_process_with_a_wandb_service_logs_offline(tmp_path, monkeypatch):
    """The parent (here, this test) logged to W&B; its ``samflow fit`` child, in another folder,
    attaches to the parent's service and writes its offline run in its own folder."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    had_service = bool(os.environ.get("WANDB_SERVICE"))
    run = wandb.init(mode="offline", project="parent", dir=str(tmp_path / "parent"))
    try:
        run.log({"x": 1.0})
        run.finish()
        assert os.environ.get("WANDB_SERVICE")
        child = tmp_path / "child"
        child.mkdir()
        args = [
            "fit",
            "--experiment",
            "quickstart",
            *TINY,
            "--data.init_args.quickstart.root",
            str(child / "d"),
        ]
        proc = run_samflow(args, child, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    finally:
        if not had_service:
            wandb.teardown()  # this test's own service
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = _offline_runs(child)
    assert len(runs) == 1 and b"val/dice" in runs[0].read_bytes()
