"""The run report (report.md / report.html), the before metrics in the loggers, W&B's run by a mocked experiment."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from samflow.callbacks import ImprovementReport
from samflow.callbacks.run_report import SECTIONS, RunReport, log_artifacts, read_metrics
from samflow.callbacks.wandb_run import SamflowWandbLogger


def make_run(folder: Path) -> dict:
    """A run folder as a fit leaves it (config, metrics, sample grids, checkpoints) and the run's facts."""
    folder.mkdir(parents=True)
    config = {
        "seed_everything": 0,
        "model": {
            "sam": {"variant": "tiny"},
            "plugins": {
                "tokens": {"class_path": "samflow_plugins.tokens.ExtraTokens", "init_args": {"lr": 0.005}}
            },
            "metrics": ["iou", "dice"],
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001, "eps": 1e-8}},
        },
        "data": {"class_path": "samflow.data.SegmentationDataModule", "init_args": {"img_size": 128}},
        "trainer": {"max_epochs": 2},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {"before/val/iou": 0.1, "step": 0},
        {"train/loss": 1.5, "epoch": 0, "step": 4},
        {"val/iou": 0.4, "val/dice": 0.5, "val/loss": 1.2, "epoch": 0, "step": 9},
        {"train/loss": 1.1, "epoch": 1, "step": 14},
        {"val/iou": 0.6, "val/dice": 0.7, "val/loss": 0.9, "epoch": 1, "step": 19},
    ]
    keys = ["before/val/iou", "epoch", "step", "train/loss", "val/dice", "val/iou", "val/loss"]
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        writer.writerows(rows)
    (folder / "samples").mkdir()
    for name in ("val_best.png", "val_worst.png", "val_epoch001.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "samples" / name)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "best.ckpt").write_bytes(b"x")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"y")
    return {
        "before": {"val/iou": 0.1, "val/dice": 0.2},
        "after": {"val/iou": 0.6, "val/dice": 0.7},
        "test": {
            "test/iou/CAMO": 0.55,
            "test/iou/COD10K": 0.45,
            "test/dice/CAMO": 0.65,
            "test/dice/COD10K": 0.5,
        },
        "test_names": ["COD10K", "CAMO"],
        "best_checkpoint": str(folder / "checkpoints" / "best.ckpt"),
        "best_score": 0.6,
        "monitor": "val/iou",
        "last_checkpoint": "",
        "wandb": [],
    }


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_has_every_section_with_its_content(tmp_path):
    folder = tmp_path / "version_0"
    facts = make_run(folder)
    paths = RunReport("quickstart").write(folder, facts)
    markdown = paths["md"].read_text()
    assert markdown.startswith("# samflow run report: quickstart / version_0")
    assert re.findall(r"^## (.+)$", markdown, flags=re.MULTILINE) == list(SECTIONS)
    config = section(markdown, "Configuration")
    assert "| SAM | variant: tiny |" in config and "samflow_plugins.tokens.ExtraTokens (lr: 0.005)" in config
    assert "torch.optim.AdamW {lr: 0.001}" in config and "[config.yaml](config.yaml)" in config
    before_after = section(markdown, "Validation before and after training")
    assert "| val/iou | 0.1000 | 0.6000 | 0.5000 |" in before_after
    assert "| val/dice | 0.2000 | 0.7000 | 0.5000 |" in before_after
    curves = section(markdown, "Curves")
    assert "![loss](report/loss.png)" in curves and "![metrics](report/metrics.png)" in curves
    for name in ("loss", "metrics"):
        with Image.open(folder / "report" / f"{name}.png") as image:
            assert image.size == (640, 360)
    images = section(markdown, "Validation images")
    for name in ("val_best.png", "val_worst.png", "val_epoch001.png"):
        assert f"(samples/{name})" in images
    test = section(markdown, "Test")
    assert test.index("| COD10K | 0.4500 | 0.5000 |") < test.index("| CAMO | 0.5500 | 0.6500 |")
    files = section(markdown, "Files")
    assert "| best checkpoint (val/iou 0.6000) | [checkpoints/best.ckpt](checkpoints/best.ckpt) |" in files
    assert "[checkpoints/last.ckpt](checkpoints/last.ckpt)" in files
    page = paths["html"].read_text()
    assert (
        page.startswith("<!DOCTYPE html>") and page.count("<table>") == 4
    )  # config, before/after, test, files
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources == [
        "report/loss.png",
        "report/metrics.png",
        *(f"samples/{n}" for n in ("val_best.png", "val_worst.png", "val_epoch001.png")),
    ]
    assert all((folder / s).is_file() for s in sources)  # relative: the page opens from disk


def test_report_without_a_run_says_what_is_missing(tmp_path):
    markdown = RunReport().write(tmp_path, {})["md"].read_text()
    assert "No `config.yaml`" in markdown and "No validation ran" in markdown
    assert "No `metrics.csv`" in markdown and "No test in this run" in markdown


def test_curves_are_read_from_metrics_csv(tmp_path):
    make_run(tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert rows[0] == {"before/val/iou": 0.1, "step": 0.0}
    assert [r["val/iou"] for r in rows if "val/iou" in r] == [0.4, 0.6]


def fake_trainer(loggers, **extra):
    return SimpleNamespace(is_global_zero=True, loggers=loggers, global_step=0, current_epoch=0, **extra)


def wandb_logger(tmp_path) -> SamflowWandbLogger:
    logger = SamflowWandbLogger(project="p", save_dir=str(tmp_path), name="quickstart")
    logger._experiment = MagicMock()
    logger._experiment.id = "abc123"
    return logger


def test_before_metrics_go_to_metrics_csv_and_the_wandb_summary(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="run", version=0)
    wandb = wandb_logger(tmp_path)
    module = SimpleNamespace(initial_val_metrics={"val/iou": 0.25, "val/dice": 0.5})
    ImprovementReport().on_sanity_check_end(fake_trainer([csv_logger, wandb]), module)  # type: ignore[arg-type]
    csv_logger.save()
    rows = read_metrics(Path(csv_logger.log_dir) / "metrics.csv")
    assert rows == [{"before/val/iou": 0.25, "before/val/dice": 0.5, "step": 0.0}]
    wandb._experiment.summary.update.assert_called_once_with({"before/val/iou": 0.25, "before/val/dice": 0.5})


def test_wandb_run_named_tagged_config_once(tmp_path):
    logger = SamflowWandbLogger(
        project="p", save_dir=str(tmp_path / "runs"), name="quickstart", anonymous=None
    )
    assert "anonymous" not in logger._wandb_init  # W&B warns about any anonymous value, None too
    assert logger._wandb_init["settings"].silent  # the run's header/footer off; warnings stay
    logger.name_run("quickstart/version_3", ["DecoderTuning", "ExtraTokens"])
    assert logger._wandb_init["name"] == "quickstart/version_3"
    assert logger._wandb_init["tags"] == ["DecoderTuning", "ExtraTokens"]
    logger._experiment = MagicMock()
    logger.log_hyperparams({"sam": {"variant": "tiny"}})  # Lightning's copy of the hparams: not logged
    logger._experiment.config.update.assert_not_called()
    from samflow.lightning_cli import SaveConfig

    tree = {"model": {"sam": {"variant": "tiny"}}, "trainer": {"max_epochs": 1}}
    saver = SaveConfig(MagicMock(), SimpleNamespace(as_dict=lambda: tree), "config.yaml")
    saver.save_config(fake_trainer([logger]), MagicMock(), "fit")  # type: ignore[arg-type]
    logger._experiment.config.update.assert_called_once()
    assert logger._experiment.config.update.call_args.args[0] == tree  # nested, not flattened


def test_report_and_best_checkpoint_are_artifacts(tmp_path):
    folder = tmp_path / "version_0"
    facts = make_run(folder)
    paths = RunReport("quickstart").write(folder, facts)
    logger = wandb_logger(tmp_path)
    log_artifacts(logger, paths, facts["best_checkpoint"])
    calls = logger._experiment.log_artifact.call_args_list
    assert [c.args[0].type for c in calls] == ["report", "model"]
    report = calls[0].args[0]
    assert report.name == "report-abc123"
    assert set(report.manifest.entries) == {
        "report.md",
        "report.html",
        "report/loss.png",
        "report/metrics.png",
        "samples/val_best.png",
        "samples/val_worst.png",
    }
    assert set(calls[1].args[0].manifest.entries) == {"best.ckpt"} and calls[1].kwargs["aliases"] == ["best"]


@pytest.fixture
def console_put_back():
    """The Lightning loggers' levels and their handlers' line filters put back after the test, as
    ``samflow.cli.main`` puts them back after a run (``restored_console``): a test that calls
    ``_verbosity_from_argv`` or ``silence_third_party`` by itself, outside ``main``, changes them for the
    whole process. ``--quiet`` left Lightning's loggers at WARNING, so every later test of the worker
    lost Lightning's info lines (``rank_zero_info``: ``samflow embed``'s summary line, which
    ``tests/embed/test_embed_ddp.py`` read through ``caplog``)."""
    from samflow.console import restored_console

    with restored_console():
        yield


@pytest.mark.parametrize("flag", ["--quiet", "--verbose"])
def test_verbosity_flags_are_taken_out_and_inherited(monkeypatch, console_put_back, flag):
    from samflow.cli import _verbosity_from_argv
    from samflow.console import VERBOSITY_ENV, verbosity

    monkeypatch.setenv(VERBOSITY_ENV, "normal")  # restored after the test: the CLI writes os.environ
    assert _verbosity_from_argv(["fit", flag, "--experiment", "x"]) == ["fit", "--experiment", "x"]
    assert verbosity() == flag[2:]


def test_noise_filters_keep_real_warnings(monkeypatch, console_put_back):
    import logging
    import warnings

    from samflow.console import VERBOSITY_ENV, silence_third_party

    monkeypatch.setenv(VERBOSITY_ENV, "normal")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something real is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something real is deprecated"]
    handler = logging.getLogger("lightning.pytorch").handlers[0]
    tip = logging.LogRecord("lightning.pytorch.x", logging.INFO, "", 0, "💡 Tip: try litlogger", None, None)
    real = logging.LogRecord("lightning.pytorch.x", logging.WARNING, "", 0, "Your batch is small", None, None)
    assert not handler.filter(tip) and handler.filter(real)
    # under torchrun / DDP Lightning prefixes the process's rank; the line is the same noise
    seed = logging.LogRecord("lightning.fabric.x", logging.INFO, "", 0, "[rank: 1] Seed set to 0", None, None)
    other = logging.LogRecord("lightning.fabric.x", logging.INFO, "", 0, "[rank: 1] Real news", None, None)
    assert not handler.filter(seed) and handler.filter(other)


def test_quiet_prints_results_only_and_no_progress_bar(monkeypatch, capsys):
    from samflow.console import VERBOSITY_ENV, SamflowProgressBar, show
    from samflow.lightning_cli import SamflowCLI

    monkeypatch.setenv(VERBOSITY_ENV, "quiet")
    callbacks, config = SamflowCLI._console(None, {}, [])  # type: ignore[arg-type]
    assert config["enable_progress_bar"] is False and callbacks == []
    show("header line")
    show("result line", result=True)
    assert capsys.readouterr().out.splitlines() == ["result line"]
    monkeypatch.setenv(VERBOSITY_ENV, "normal")
    callbacks, config = SamflowCLI._console(None, {}, [])  # type: ignore[arg-type]
    assert [type(c) for c in callbacks] == [SamflowProgressBar] and "enable_progress_bar" not in config
