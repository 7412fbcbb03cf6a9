"""Every bad input of the command line is one line, ``samflow: error: ...``, and exit status 1.

Unknown or broken plugins (in the experiment, a second ``--config`` or a flag), wrong-typed options, a
garbage SAM checkpoint, a ``--ckpt_path`` of another plugin set, an unknown experiment or command.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import run_samflow

from samflow.cli import main


def samflow(args: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    return run_samflow(args, cwd, pythonpath=pythonpath)


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
