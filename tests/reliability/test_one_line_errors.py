"""Every bad input of the command line is one line, ``samflow: error: ...``, and exit status 1.

Unknown or broken plugins (in the experiment, a second ``--config`` or a flag), wrong-typed options, a
garbage SAM checkpoint, a ``--ckpt_path`` of another plugin set, an unknown experiment or command; the
usage errors of samflow's own commands (``export``, ``embed``, ...), an experiment without trainable
plugins, a checkpoint monitor that is not logged, data framed at another size than SAM's input.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import samflow_here

from samflow.cli import main


def samflow(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    return samflow_here(args, cwd, pythonpath=pythonpath)


def error_line(proc: subprocess.CompletedProcess, quiet: bool = True) -> str:
    """The one error line; ``quiet``: nothing else on stderr (else Lightning's info lines may precede it)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("samflow: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    if quiet:
        assert lines == errors, proc.stderr[-3000:]
    return errors[0]


FIT = ["fit", "--experiment", "quickstart", "--trainer.max_epochs", "0"]


def test_unknown_plugin_on_the_command_line_names_the_closest(tmp_path):
    line = error_line(samflow([*FIT, "--model.plugins.x.class_path", "ExtraTokenz"], tmp_path))
    assert "--model.plugins.x.class_path" in line and "'ExtraTokenz'" in line
    assert "Did you mean ExtraTokens?" in line and "samflow plugins" in line


def test_unknown_plugin_in_an_experiment_names_the_file(tmp_path):
    experiment = tmp_path / "mine.yaml"
    experiment.write_text("model:\n  sam: {variant: tiny}\n  plugins:\n    a: {class_path: SamAdaptr}\n")
    line = error_line(samflow(["fit", "--experiment", str(experiment)], tmp_path))
    assert (
        str(experiment) in line
        and "model.plugins.a.class_path" in line
        and "Did you mean SamAdapter?" in line
    )


def test_wrong_typed_plugin_option(tmp_path):
    line = error_line(samflow([*FIT, "--model.plugins.tokens.init_args.num_tokens", "abc"], tmp_path))
    assert "--model.plugins.tokens.init_args.num_tokens 'abc'" in line and "expected int" in line
    assert "samflow fit --help" in line


@pytest.fixture
def broken_distribution(tmp_path) -> Path:
    """A distribution 'acme-sam' 1.2 whose plugin fails to import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_broken.py").write_text("raise ImportError('acme needs libfoo')\n")
    info = site / "acme_sam-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sam\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[samflow.plugins]\nacme_broken = acme_broken:Broken\n")
    return site


@pytest.mark.parametrize("where", ["config", "flag"])
def test_broken_plugin_in_a_second_config_or_a_flag_names_its_distribution(
    tmp_path, broken_distribution, where
):
    if where == "config":
        extra = tmp_path / "extra.yaml"
        extra.write_text("model:\n  plugins:\n    acme:\n      class_path: acme_broken.Broken\n")
        args = [*FIT, "--config", str(extra)]
    else:
        args = [*FIT, "--model.plugins.acme.class_path", "acme_broken.Broken"]
    line = error_line(samflow(args, tmp_path, pythonpath=broken_distribution))
    assert "'acme-sam' 1.2" in line and "acme needs libfoo" in line and "model.plugins.acme" in line


def _garbage(kind: str, folder: Path) -> Path:
    if kind == "text":
        path = folder / "notes.txt"
        path.write_text("my notes\n")
    elif kind == "zip":
        path = folder / "weights.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "not torch")
    else:
        path = folder / "sam_truncated.pth"
        torch.save({"image_encoder.pos_embed": torch.zeros(1, 8, 8, 64)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind", ["text", "zip", "truncated"])
def test_garbage_sam_checkpoint_names_the_file(tmp_path, kind):
    path = _garbage(kind, tmp_path)
    line = error_line(samflow([*FIT, "--model.sam.checkpoint", str(path)], tmp_path), quiet=False)
    assert f"SAM checkpoint {str(path)!r}: it is not a PyTorch checkpoint" in line
    assert "--model.sam.checkpoint" in line and "weights_only=False" not in line


def test_ckpt_path_of_another_plugin_set_names_both(tmp_path):
    ckpt = tmp_path / "other.ckpt"
    state = {"model.plugins.hq.token.weight": torch.zeros(1, 64), "model.plugins.lora.a": torch.zeros(2)}
    torch.save(
        {"state_dict": state, "pytorch-lightning_version": "2.6.6", "epoch": 0, "global_step": 0}, ckpt
    )
    line = error_line(samflow([*FIT[:-2], "--ckpt_path", str(ckpt)], tmp_path), quiet=False)
    assert "plugins ['hq', 'lora']" in line and "weights are ['tokens']" in line and "trained with" in line


def test_unknown_experiment_exits_1_with_the_known_ones(capsys):
    assert main(["fit", "--experiment", "nope"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("samflow: error: No experiment named 'nope'")
        and "quickstart" in err[0]
    )


def test_unknown_command_exits_1_without_usage(capsys):
    assert main(["train"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("samflow: error: unknown command 'train'") and "fit" in err[0]


def test_help_still_exits_0(tmp_path):
    proc = samflow(["fit", "--help"], tmp_path)
    assert proc.returncode == 0 and "--trainer.max_epochs" in proc.stdout


def test_checkpoint_save_last_is_refused_with_what_writes_last_ckpt(tmp_path):
    """Lightning's save_last would write checkpoints/last.ckpt beside samflow's LastCheckpoint."""
    line = error_line(samflow([*FIT, "--checkpoint.save_last", "true"], tmp_path))
    assert "--checkpoint.save_last" in line and "LastCheckpoint already writes checkpoints/last.ckpt" in line
    assert not list(tmp_path.rglob("*.ckpt"))


# ---- samflow's own commands: usage errors are one line too, no usage dump, exit 1 ----
def main_error(args: list[str], capsys) -> str:
    """``samflow ARGS`` in this process: exit status 1 and one line on stderr, which is returned."""
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("samflow: error:") and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["export", "runs/x/version_0"], "samflow export: the following arguments are required: --out"),
        (["embed"], "samflow embed: the following arguments are required: --experiment"),
        (["student", "--experiment", "x"], "samflow student: the following arguments are required: --pseudo, --out"),
        (["predict-slide"], "the following arguments are required: slides, --experiment, --out"),
        (["proposals", "--experiment", "quickstart"], "samflow proposals: the following arguments are required: --out"),
        (["pseudo-masks"], "samflow pseudo-masks: the following arguments are required: --experiment, --ckpt, --out"),
        (["predict", "--prompts", "p.json"], "samflow predict: the following arguments are required: --model, --images, --out"),
        (["export", "r", "--out", "o", "--bogus"], "samflow export: unrecognized arguments: --bogus"),
        (["export", "r", "--out", "o", "--single-mask"], "samflow export: --single-mask applies to --onnx only"),
        (["embed", "--experiment", "quickstart", "--shard-size", "ten"], "--shard-size: invalid int value: 'ten'"),
    ],
)  # fmt: skip
def test_a_command_usage_error_is_one_line_naming_the_option(capsys, args, expected):
    line = main_error(args, capsys)
    command = "samflow predict --prompts FILE" if "--prompts" in args else f"samflow {args[0]}"
    assert expected in line and f"(`{command} --help` lists the options)" in line


def test_a_command_help_still_exits_0(capsys):
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.parametrize("quiet", [[], ["--quiet"]])
def test_an_unknown_experiment_override_of_embed_is_one_line(tmp_path, quiet):
    """``--quiet`` is the command line's, not an override; ``--bogus`` is refused by the experiment's parser."""
    proc = samflow(["embed", "--experiment", "quickstart", "--bogus", *quiet, "--out", "store"], tmp_path)
    line = error_line(proc)
    assert line.startswith("samflow: error: samflow embed: unrecognized arguments: --bogus (")
    assert "--quiet" not in line and "`samflow fit --help`" in line and "`samflow embed --help`" in line
    assert not (tmp_path / "store").exists()


TINY = [
    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--data.init_args.batch_size", "4", "--data.init_args.quickstart.n_train", "4",
    "--data.init_args.quickstart.n_val", "4", "--quiet",
]  # fmt: skip


def test_an_experiment_without_trainable_plugins_is_one_line_before_training(tmp_path):
    line = error_line(samflow([*FIT[:-1], "1", *TINY, "--model.plugins", "{}"], tmp_path))
    assert "model.plugins: nothing to train" in line and "(plugins: none)" in line
    assert "--model.plugins.decoder.class_path DecoderTuning" in line and "samflow validate" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_no_loss_terms_is_one_line(tmp_path):
    line = error_line(samflow([*FIT[:-1], "1", *TINY, "--model.losses", "{}"], tmp_path))
    assert "model.losses: no loss terms" in line and "plugins: decoder, tokens)" in line
    assert "--model.losses '{bce: 1.0, dice: 1.0}'" in line


@pytest.mark.parametrize("sanity", [1, 0])
def test_a_monitor_that_is_not_logged_is_one_line_at_the_first_validation(tmp_path, sanity):
    """With a sanity check the fit stops there, before a step; without, at the first validation (not
    after Lightning's first checkpoint attempt); the line lists the metrics that were logged."""
    monitor = ["--checkpoint.monitor", "val/nonexistent", "--trainer.num_sanity_val_steps", str(sanity)]
    line = error_line(samflow([*FIT[:-1], "2", *TINY, *monitor], tmp_path))
    assert "--checkpoint.monitor 'val/nonexistent': the run logs no such metric" in line
    assert "val/iou, val/loss, val/mae" in line and "leave --checkpoint.monitor unset" in line
    assert ("train/loss" in line) == (sanity == 0)  # no training step before the sanity check
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("command", ["fit", "embed"])
def test_data_img_size_other_than_sam_img_size_is_one_line_naming_both(tmp_path, command):
    """The tiny SAM takes 128 x 128 inputs; data framed at 64 fails before the encoder runs."""
    size = ["--data.init_args.img_size", "64"]
    args = [*FIT[:-1], "1", *TINY, *size] if command == "fit" else ["embed", *FIT[1:3], *TINY[4:], *size]
    line = error_line(samflow([*args, "--out", "store"] if command == "embed" else args, tmp_path))
    assert "data.init_args.img_size is 64 but model.sam.img_size is 128, the tiny variant's default" in line
    assert "--model.sam.img_size 64 --data.init_args.img_size 64" in line
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "store").exists()


def test_check_input_size_reads_the_data_module_or_its_datasets():
    from types import SimpleNamespace

    from samflow.module import ModelConfigError, SamflowModule, SamSpec

    module = SamflowModule(sam=SamSpec(variant="tiny", img_size=64))
    module.check_input_size(SimpleNamespace(img_size=64))
    module.check_input_size(SimpleNamespace(datasets={"train": SimpleNamespace(img_size=64)}))
    module.check_input_size(None)  # nothing to read: the first batch is checked
    with pytest.raises(ModelConfigError, match=r"img_size is 128 but model.sam.img_size is 64: "):
        module.check_input_size(SimpleNamespace(datasets={"val": SimpleNamespace(img_size=128)}))


def test_embed_prints_no_litlogger_tip(tmp_path):
    """The argparse commands silence Lightning's noise as fit does (default verbosity)."""
    proc = samflow(["embed", *FIT[1:3], *TINY[4:-1], "--out", "store"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "litlogger" not in proc.stdout + proc.stderr and "Tip:" not in proc.stdout + proc.stderr
    assert "samflow embed: 8 images in store" in proc.stdout + proc.stderr  # 4 train, 4 val
