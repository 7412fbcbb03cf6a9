"""What a researcher sees in W&B, read back from the offline run's ``.wandb`` file.

- a fit resumed offline (``--resume`` after a stop) numbers its history rows (``_step``) after the
  stopped run's: offline, W&B starts every run at row 0, and ``wandb sync`` of the two folders, one run
  id, dropped or overwrote the rows at or below the first run's last (before, the resumed run logged
  rows 0, 1, ... again);
- a validation's sample images sit at the ``trainer/global_step`` of its metrics (before, one later);
- the W&B config holds the whole resolved experiment of ``config.yaml``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import samflow_in_process, short_run

from samflow.callbacks.wandb_run import SamflowWandbLogger, _records, next_offline_row

TINY = [
    "--experiment", "quickstart", "--quiet", "--trainer.enable_progress_bar=false",
    "--data.init_args.img_size=64", "--model.sam.img_size=64", "--trainer.log_every_n_steps=1",
    "--last.every_n_train_steps=1", "--data.init_args.quickstart.n_train=4",
    "--data.init_args.quickstart.n_val=2", "--run_report.enabled=false",
]  # fmt: skip


def history(path: Path) -> list[dict]:
    """The history rows of an offline run file: ``{"_step": n, key: value, ...}``."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("history"):
            row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows.append({**row, "_step": record.history.step.num})
    return rows


def config(path: Path) -> dict:
    """The run's config as its file holds it last."""
    from wandb.proto import wandb_internal_pb2

    found: dict = {}
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("config"):
            found = {item.key: json.loads(item.value_json) for item in record.config.update}
    return found


def _offline(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline, no service or folder of the test process's, the working directory ``folder``."""
    for name in ("WANDB_SERVICE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    return _offline(tmp_path, monkeypatch)


def _fit(folder: Path, *args: str, quiet: bool = True) -> None:
    flags = [
        *(a for a in TINY if quiet or a != "--quiet"),
        "--data.init_args.quickstart.root",
        str(folder / "data"),
    ]
    assert samflow_in_process(["fit", *flags, *args]) == 0


def test_a_logger_numbers_its_rows_after_the_earlier_offline_runs_of_its_id(offline):
    import wandb

    earlier = wandb.init(mode="offline", id="abcd1234", dir=str(offline), project="p")
    for i in range(3):
        earlier.log({"x": i})
    earlier.finish()
    wandb.teardown()  # its service writes the file out
    time.sleep(1.1)  # W&B names an offline folder by its start second: the later run's must differ
    assert next_offline_row(offline / "wandb", "abcd1234") == 3
    assert next_offline_row(offline / "wandb", "other123") is None
    logger = SamflowWandbLogger(save_dir=str(offline), id="abcd1234", project="p")
    logger.log_metrics({"x": 10.0}, step=7)
    logger.log_metrics({"y": 11.0}, step=8)
    logger.experiment.finish()
    wandb.teardown()
    files = sorted(
        (offline / "wandb").glob("offline-run-*-abcd1234/run-abcd1234.wandb"), key=lambda p: p.parent.name
    )
    assert len(files) == 2
    later = next(h for f in files if (h := history(f)) and "y" in h[-1])
    assert [(r["_step"], r["trainer/global_step"]) for r in later] == [(3, "7"), (4, "8")]
    # a file cut short (a killed run) is read to its last whole record
    data = files[0].read_bytes()
    cut = offline / "cut" / "offline-run-1-abcd1234" / "run-abcd1234.wandb"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(data[: len(data) - 5])
    assert next_offline_row(offline / "cut", "abcd1234") in (2, 3)


def test_a_resumed_offline_fit_continues_its_rows_and_steps(offline, capsys):
    """Fit one epoch, resume to two: one run id, the resumed run's rows after the first's, its
    ``trainer/global_step`` going on from the stop, and every validation's images at its metrics' step;
    its header names both offline folders to upload (before, the new one alone)."""
    _fit(offline, *short_run(epochs=1, train=2, batch_size=2))
    run = offline / "runs" / "quickstart" / "version_0"
    capsys.readouterr()
    _fit(offline, *short_run(epochs=2, train=2, batch_size=2), "--resume", str(run), quiet=False)
    wandb_id = json.loads((run / "run.json").read_text())["wandb_id"]
    header = " ".join(capsys.readouterr().out.split())  # the header's lines wrap
    assert f"upload: wandb sync runs/wandb/offline-run-*-{wandb_id})" in header, header
    files = sorted(
        (offline / "runs" / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name
    )
    assert [f.name for f in files] == [f"run-{wandb_id}.wandb"] * 2
    first, resumed = history(files[0]), history(files[1])
    assert max(r["_step"] for r in first) < min(r["_step"] for r in resumed), (first, resumed)
    steps = [int(r["trainer/global_step"]) for r in resumed if "train/loss" in r]
    assert steps == [2, 3]  # the stopped run trained steps 0 and 1
    for rows in (first, resumed):
        images = [r["trainer/global_step"] for r in rows if "val/samples/_type" in r]
        metrics = [r["trainer/global_step"] for r in rows if "val/iou" in r]
        assert images and images == metrics
    # the W&B config is the resolved experiment of the run's config.yaml, nested as there
    logged = config(files[1])
    logged.pop("_wandb", None)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: v for k, v in logged.items() if k != "config"} == saved
    assert logged["model"]["sam"]["variant"] == "tiny" and "decoder" in logged["model"]["plugins"]


def _test(folder: Path, checkpoint: Path) -> None:
    args = [
        "test",
        *TINY,
        "--data.init_args.quickstart.root",
        str(folder / "data"),
        "--ckpt_path",
        str(checkpoint),
    ]
    assert samflow_in_process([*args, "--trainer.limit_test_batches=1"]) == 0


@pytest.fixture(scope="module")
def fit_then_test(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """A fit of one epoch, then ``samflow test`` of its last checkpoint: the run folder and the two
    offline run files (one W&B run id)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _fit_then_test(_offline(tmp_path_factory.mktemp("fit_test"), monkeypatch))


def _fit_then_test(offline: Path) -> tuple[Path, Path, Path]:
    _fit(offline, *short_run(epochs=1, train=2, batch_size=2))
    run = offline / "runs" / "quickstart" / "version_0"
    _test(offline, run / "checkpoints" / "last.ckpt")
    files = sorted(
        (offline / "runs" / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name
    )
    assert len(files) == 2 and files[0].name == files[1].name
    return run, files[0], files[1]


def test_a_test_of_a_run_logs_its_rows_after_the_fits(fit_then_test):
    _, fit, test = fit_then_test
    rows = history(test)
    assert any("test/iou" in r for r in rows)
    assert max(r["_step"] for r in history(fit)) < min(r["_step"] for r in rows)


def _run_name(path: Path) -> str:
    from wandb.proto import wandb_internal_pb2

    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("run"):
            return record.run.display_name
    return ""


def test_a_test_of_a_run_keeps_the_runs_name_and_config(fit_then_test):
    """The W&B run of a fit keeps its name (``quickstart/version_0``, not ``quickstart/test``) and the
    fit's config (the test command's, ``trainer.max_epochs`` 20 and no ``limit_train_batches``, replaced
    it) when ``samflow test`` logs its metrics into it."""
    _, fit, test = fit_then_test
    assert _run_name(fit) == _run_name(test) == "quickstart/version_0"
    assert config(fit)["trainer"]["max_epochs"] == 1
    assert "trainer" not in config(test)  # the test's file sets no config over the fit's
