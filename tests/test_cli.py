"""The samflow command as a user runs it: experiments, plugins, fit, validate, predict, errors."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import samflow_here, short_run
from PIL import Image

from samflow.cli import main

FAST = [*short_run(train=2, val=2, sanity=2), "--trainer.log_every_n_steps", "1"]


def run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = samflow_here(args, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"samflow {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def quickstart_root(workdir) -> str:
    return str(workdir / "data")


@pytest.fixture(scope="module")
def fitted(workdir, quickstart_root) -> Path:
    """One short quickstart fit shared by the tests that inspect its outputs.

    ``--trainer.max_epochs 1`` comes before ``--experiment`` (the experiment says 20), the other flags
    after it: both must override the experiment.
    """
    epochs, rest = FAST[:2], FAST[2:]
    assert epochs == ["--trainer.max_epochs", "1"]
    args = [
        "fit",
        *epochs,
        "--experiment",
        "quickstart",
        *rest,
        "--data.init_args.quickstart.root",
        quickstart_root,
    ]
    run(args, workdir)
    return workdir / "runs" / "quickstart" / "version_0"


def test_experiments_lists_quickstart_with_description(capsys):
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("quickstart"))
    assert "camouflage" in line


def test_plugins_lists_builtins_with_status(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "class", "distribution", "version", "status"]
    tokens = next(line for line in out if line.startswith("tokens "))
    assert tokens.split() == ["tokens", "samflow_plugins.tokens.ExtraTokens", "samflow", "0.1.0", "ok"]


def test_unknown_experiment_is_a_clear_error(capsys):
    assert main(["fit", "--experiment", "nope"]) == 1
    err = capsys.readouterr().err
    assert "No experiment named 'nope'" in err and "quickstart" in err


def test_an_error_line_goes_out_in_one_write(monkeypatch):
    """DDP ranks that fail together share one stderr: each line must reach it whole, newline included
    (a separate write of the newline let two ranks' lines run into one)."""
    import sys

    from samflow import cli

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            writes.append("<flush>")

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert cli._error("Training diverged:\n  at step 3") == 1
    assert writes == ["samflow: error: Training diverged: at step 3\n", "<flush>"]


def test_unknown_command(capsys):
    assert main(["train"]) == 1
    assert "unknown command 'train'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.plugins.tokens.init_args.num_tokens", "0"], "tokens"),
        (["--model.metrics", "[iou, foo]"], "Unknown metric(s) ['foo']; choose from"),
        (
            ["--model.sam.encoder_cache", "4", "--model.plugins", "{a: {class_path: SamAdapter}}"],
            "a (on_image)",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, quickstart_root, override, message):
    args = [
        "fit",
        "--experiment",
        "quickstart",
        "--data.init_args.quickstart.root",
        quickstart_root,
        *override,
    ]
    proc = run(args, tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("samflow: error:") and message in last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_fit_writes_run_outputs(fitted):
    assert (fitted / "config.yaml").is_file()
    assert list((fitted / "checkpoints").glob("*.ckpt"))
    rows = list(csv.DictReader((fitted / "metrics.csv").open()))
    assert any(row.get("val/iou") for row in rows) and any(row.get("train/loss") for row in rows)
    grid = Image.open(fitted / "samples" / "val_epoch000.png")
    assert grid.width == 4 * 128  # prompt | ground truth | prediction | errors
    report = json.loads((fitted / "val_before_after.json").read_text())
    assert set(report["before"]) == set(report["after"]) == {"val/iou", "val/dice", "val/mae"}


def test_checkpoint_omits_frozen_sam(fitted):
    import torch

    ckpt = torch.load(next((fitted / "checkpoints").glob("*.ckpt")), weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("model.plugins.tokens.") for k in keys)
    assert any(k.startswith("model.sam.mask_decoder.") for k in keys)  # trained by decoder_tuning
    assert not any(k.startswith("model.sam.image_encoder.") for k in keys)
    assert ckpt["samflow"]["sam"]["variant"] == "tiny"


def test_overrides_after_the_experiment_win(fitted):
    import yaml

    config = yaml.safe_load((fitted / "config.yaml").read_text())
    assert config["data"]["init_args"]["batch_size"] == 4
    assert config["trainer"]["limit_train_batches"] == 2
    assert config["model"]["plugins"]["tokens"]["init_args"]["lr"] == 5.0e-3


def test_flags_before_the_experiment_win_too(fitted):
    """The fixture puts --trainer.max_epochs 1 before --experiment quickstart, whose file says 20."""
    import yaml

    assert yaml.safe_load((fitted / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    with open(fitted / "metrics.csv") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("epoch")}
    assert epochs == {"0"}  # one epoch ran


def test_predict_writes_one_mask_per_image_at_original_size(fitted, workdir, quickstart_root):
    ckpt = next((fitted / "checkpoints").glob("*.ckpt"))
    out = workdir / "masks"
    images = Path(quickstart_root) / "val" / "images"
    run(
        [
            "predict",
            "--experiment",
            "quickstart",
            "--ckpt_path",
            str(ckpt),
            "--data.init_args.quickstart.root",
            quickstart_root,
            "--data.init_args.predict",
            str(images),
            "--predictions.output_dir",
            str(out),
        ],
        workdir,
    )
    sources = sorted(images.iterdir())
    written = sorted(out.glob("*.png"))
    assert [p.stem for p in written] == [p.stem for p in sources]
    for source, mask in zip(sources, written):
        assert Image.open(mask).size == Image.open(source).size
        assert set(np.unique(np.asarray(Image.open(mask)))) <= {0, 255}


def test_no_checkpointing_and_a_validation_cache_from_the_command_line(tmp_path, quickstart_root):
    run(
        [
            "fit",
            "--experiment",
            "quickstart",
            *FAST,
            "--data.init_args.quickstart.root",
            quickstart_root,
            "--trainer.enable_checkpointing",
            "false",
            "--model.sam.encoder_cache",
            "64",
            "--model.sam.encoder_cache_stages",
            "[eval]",
        ],
        tmp_path,
    )
    version = tmp_path / "runs" / "quickstart" / "version_0"
    assert not (version / "checkpoints").exists()
    with open(version / "metrics.csv") as f:
        rates = [
            row["val/encoder_cache_hit_rate"]
            for row in csv.DictReader(f)
            if row["val/encoder_cache_hit_rate"]
        ]
    assert rates == ["1.0"]  # the sanity check filled the cache; the epoch's validation only hit it


def test_extra_commands_run_and_report_user_errors_on_one_line(monkeypatch, capsys):
    import types

    import samflow.cli as cli
    from samflow.data.errors import DataError

    module = types.ModuleType("fake_command")
    seen = []

    def good(args):
        seen.append(args)
        return 0

    def bad(args):
        raise DataError("images/x.png is not an image:\nremove it")

    module.good, module.bad = good, bad
    monkeypatch.setitem(__import__("sys").modules, "fake_command", module)
    monkeypatch.setattr(
        cli, "COMMANDS", {"good": ("fake_command:good", "ARGS"), "bad": ("fake_command:bad", "")}
    )
    assert main(["good", "--x", "1"]) == 0 and seen == [["--x", "1"]]
    assert main(["bad"]) == 1
    assert capsys.readouterr().err == "samflow: error: images/x.png is not an image: remove it\n"
    main(["--help"])
    assert "samflow good ARGS" in capsys.readouterr().out


def test_extra_commands_take_the_verbosity_and_make_refused_overrides_one_line(monkeypatch, capsys):
    """``--quiet`` anywhere sets the verbosity (not passed on); an override jsonargparse refuses
    (``argparse.ArgumentError``) is one line naming it and where the options are listed."""
    import types
    from argparse import ArgumentError

    from samflow import cli

    module = types.ModuleType("fake_command")
    seen = []

    def good(args):
        seen.append((args, cli.os.environ.get("SAMFLOW_VERBOSITY")))
        return 0

    def refused(args):
        raise ArgumentError(None, "unrecognized arguments: --trainer.max_epocs 3")

    module.good, module.refused = good, refused
    monkeypatch.setitem(__import__("sys").modules, "fake_command", module)
    monkeypatch.setattr(
        cli, "COMMANDS", {"good": ("fake_command:good", ""), "refused": ("fake_command:refused", "")}
    )
    monkeypatch.setenv("SAMFLOW_VERBOSITY", "normal")
    assert main(["good", "--x", "--quiet", "1"]) == 0 and seen == [(["--x", "1"], "quiet")]
    assert main(["refused"]) == 1
    assert capsys.readouterr().err == (
        "samflow: error: samflow refused: unrecognized arguments: --trainer.max_epocs 3 (`samflow refused "
        "--help` lists its options; the other arguments override the experiment, `samflow fit --help` lists them)\n"
    )


def test_plugin_help_shows_the_flags_that_set_a_plugins_options(tmp_path):
    """jsonargparse lists a plugin's options as ``--model.plugins.OPTION``, which no run accepts; samflow
    shows the flags that set them, ``--model.plugins.<key>.init_args.OPTION``."""
    proc = samflow_here(
        ["fit", "--experiment", "quickstart", "--model.plugins.help", "DecoderTuning"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model.plugins.<key>.init_args.parts" in proc.stdout
    assert "--model.plugins.<key>.init_args.lr" in proc.stdout
    assert "--model.plugins.parts" not in proc.stdout


def test_predict_with_the_prompted_flags_but_no_prompts_says_what_they_belong_to(tmp_path, capsys):
    """``samflow predict --model RUN --images X --out Y`` without ``--prompts`` went to Lightning's predict,
    which read RUN as a model config: "Unable to load config 'RUN'"."""
    run = tmp_path / "runs" / "quickstart" / "version_0"
    run.mkdir(parents=True)
    assert (
        main(["predict", "--model", str(run), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("samflow: error: samflow predict: --images and --out belong to `samflow predict")
    assert "add --prompts" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
