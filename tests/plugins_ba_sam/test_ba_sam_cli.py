"""The resolution experiment's two commands, on the tiny SAM: fine-tune at 128 px, then evaluate the
same checkpoint at 256 px with ``--model.sam.img_size`` and ``--data.init_args.img_size``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from helpers import samflow_here, short_run

PLUGIN = "{ba: {class_path: BASam, init_args: {train_decoder: true}}}"
COMMON = ["--experiment", "quickstart", "--model.plugins", PLUGIN, "--data.init_args.batch_size", "2"]


def samflow(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return samflow_here(args, cwd, env={"XDG_CACHE_HOME": str(cwd)})


def test_fine_tune_at_one_size_and_evaluate_the_checkpoint_at_another(tmp_path):
    fit = ["fit", *COMMON, *short_run(batch_size=2)]
    proc = samflow(fit, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    # the checkpoint's saved hyper-parameters (img_size: null) must not override the flags
    validate = [
        "validate",
        *COMMON,
        "--model.sam.img_size",
        "256",
        "--data.init_args.img_size",
        "256",
        "--trainer.limit_val_batches",
        "1",
        "--ckpt_path",
        str(ckpt),
    ]
    proc = samflow(validate, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/iou" in proc.stdout
    # validate of a run's checkpoint writes into that run's folder
    config = yaml.safe_load((ckpt.parent.parent / "validate" / "config.yaml").read_text())
    assert config["model"]["sam"]["img_size"] == 256 and config["data"]["init_args"]["img_size"] == 256
