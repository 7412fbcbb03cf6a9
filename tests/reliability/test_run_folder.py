"""validate / test / predict of a run's checkpoint write into that run's folder and W&B run.

One tiny quickstart fit (in this process, through ``samflow.cli.main`` as the command runs it) makes
``runs/quickstart/version_0``; each later command given one of its checkpoints writes a subfolder named
after the command (a numbered one when it exists), never a new ``version_N``, and logs to the run's
W&B id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from quickstart_tiny import samflow as run_tiny


def samflow(command: str, *args: str, root: Path) -> None:
    assert run_tiny(command, *args, data=root / "data") == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runfolder")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        samflow("fit", root=root)
    finally:
        mp.undo()
    return root / "runs" / "quickstart" / "version_0"


def _wandb_id(config: Path) -> str:
    loggers = yaml.safe_load(config.read_text())["trainer"]["logger"]
    return next(e["init_args"]["id"] for e in loggers if e["class_path"].endswith("WandbLogger"))


def test_a_fit_records_its_wandb_id(run):
    info = json.loads((run / "run.json").read_text())
    assert info["experiment"] == "quickstart" and len(info["wandb_id"]) == 8
    assert _wandb_id(run / "config.yaml") == info["wandb_id"]


def test_test_and_validate_write_into_the_run_folder(run, monkeypatch, capsys):
    root = run.parents[2]
    monkeypatch.chdir(root)
    ckpt = run / "checkpoints" / "last.ckpt"
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    samflow("test", "--ckpt_path", str(ckpt), root=root)
    samflow("test", "--ckpt_path", str(ckpt), root=root)
    samflow("validate", "--ckpt_path", str(ckpt), root=root)
    captured = capsys.readouterr()
    out = captured.out
    # the header names the checkpoint and the subfolder, relative to the working directory; no line before it
    header = [line.rstrip() for line in out.splitlines() if line.startswith(("checkpoint  ", "run folder  "))]
    assert header == [
        line
        for name in ("test", "test_1", "validate")
        for line in (
            "checkpoint  runs/quickstart/version_0/checkpoints/last.ckpt",
            f"run folder  runs/quickstart/version_0/{name}",
        )
    ]
    assert "writes into" not in captured.out + captured.err
    # one table of test metrics (samflow's, per dataset), not Lightning's too; paths relative as above
    assert out.count("Test metrics per dataset") == 2 and "Test metric " not in out
    assert "Run report: runs/quickstart/version_0/test/report.html\n" in out
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no version_1
    for name in ("test", "test_1", "validate"):
        folder = run / name
        assert (folder / "metrics.csv").is_file() and (folder / "config.yaml").is_file(), name
        assert _wandb_id(folder / "config.yaml") == wandb_id, name  # the run's W&B run, resumed
        assert f"run folder runs/quickstart/version_0/{name}\n" in out
    # the tests run W&B disabled: the header names no W&B folder, which would not exist
    shown = [line.rstrip() for line in out.splitlines() if line.startswith("W&B")]
    assert shown == ["W&B         disabled (WANDB_MODE=disabled): nothing is logged to W&B"] * 3
    assert "wandb/run-" not in out
    assert json.loads((run / "test" / "test_metrics.json").read_text()).keys() >= {"test/iou"}
    assert "test/iou" in (run / "test_1" / "metrics.csv").read_text()
    assert "val/iou" in (run / "validate" / "metrics.csv").read_text()
    assert "checkpoint runs/quickstart/version_0/checkpoints/last.ckpt (test/iou " in out


def test_predict_writes_its_masks_into_the_run_folder(run, monkeypatch):
    root = run.parents[2]
    monkeypatch.chdir(root)
    images = root / "data" / "val" / "images"
    samflow(
        "predict",
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--data.init_args.predict",
        str(images),
        root=root,
    )
    masks = sorted(p.stem for p in (run / "predict" / "predictions").glob("*.png"))
    assert masks == sorted(p.stem for p in images.iterdir())
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_a_checkpoint_outside_a_run_folder_starts_a_new_version(run, tmp_path, monkeypatch):
    root = run.parents[2]
    monkeypatch.chdir(root)
    loose = tmp_path / "model.ckpt"
    loose.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    samflow("validate", "--ckpt_path", str(loose), root=root)
    assert (run.parent / "version_1" / "metrics.csv").is_file()
    (run.parent / "version_1").rename(tmp_path / "moved")  # leave the run folder as the other tests expect


def test_resume_names_a_missing_run_on_one_line(run, monkeypatch, capsys):
    monkeypatch.chdir(run.parents[2])
    data = run.parents[2] / "data"
    assert run_tiny("fit", "--resume", "runs/quickstart/version_9", data=data) == 1
    assert run_tiny("test", "--resume", str(run), data=data) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2] == "samflow: error: --resume runs/quickstart/version_9: no such run folder or checkpoint."
    assert err[-1].startswith("samflow: error: --resume continues a fit; give `samflow test` the checkpoint")


def test_a_command_that_fails_leaves_no_empty_subfolder(run, monkeypatch, capsys, tmp_path):
    """A predict that stops before writing (its data folder is missing) removes its ``predict/``, so the
    next predict of the run writes ``predict``, not ``predict_1``."""
    root = run.parents[2]
    monkeypatch.chdir(root)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    before = {p.name for p in run.iterdir()}
    missing = str(tmp_path / "no-such-folder")
    assert (
        run_tiny("predict", "--ckpt_path", ckpt, "--data.init_args.predict", missing, data=root / "data") == 1
    )
    assert missing in capsys.readouterr().err
    assert {p.name for p in run.iterdir()} == before  # no empty predict/ left


def test_a_predict_without_predict_data_is_one_line_and_leaves_no_subfolder(run, monkeypatch, capsys):
    """No ``data.predict`` set: one error line naming the option (was a traceback), and the ``predict/``
    that held only the config Lightning writes at setup is removed too."""
    root = run.parents[2]
    monkeypatch.chdir(root)
    before = {p.name for p in run.iterdir()}
    assert run_tiny("predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), data=root / "data") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "samflow: error: SegmentationDataModule: no 'predict' data; set data.predict (a folder root)."
    ), err
    assert not any(line.startswith("Traceback") for line in err)
    assert {p.name for p in run.iterdir()} == before


def test_default_root_dir_holds_the_runs_that_resume_last_finds(run, tmp_path, monkeypatch):
    """``--trainer.default_root_dir D``: the run is ``D/version_0`` (its checkpoints, metrics, W&B files),
    and ``--resume last`` with D continues it. The runs were written to ``runs/quickstart`` whatever D
    was, and ``--resume last`` looked in D: it found nothing."""
    data = run.parents[2] / "data"
    monkeypatch.chdir(tmp_path)
    root = ["--trainer.default_root_dir", "elsewhere/mine"]
    assert run_tiny("fit", *root, data=data) == 0
    mine = tmp_path / "elsewhere" / "mine" / "version_0"
    assert (mine / "checkpoints" / "last.ckpt").is_file() and (mine / "metrics.csv").is_file()
    assert not (tmp_path / "runs" / "quickstart").exists()
    assert run_tiny("fit", *root, "--resume", "last", "--trainer.max_epochs", "2", data=data) == 0
    assert sorted(p.name for p in mine.parent.glob("version_*")) == ["version_0"]
    assert json.loads((mine / "run.json").read_text())["experiment"] == "quickstart"
    assert torch.load(mine / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
