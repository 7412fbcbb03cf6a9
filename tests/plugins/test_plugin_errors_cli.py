"""A third-party plugin's errors on the command line: one line naming ``model.plugins.<key>``, its class
and distribution; ``SAMFLOW_DEBUG=1`` still shows the traceback. Also the keys of bad loss and
encoder-cache options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import samflow_here, short_run

PLUGIN = """
import torch
from torch import nn
from samflow import SamPlugin


class BadInit(SamPlugin):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        if width > 2:
            raise ValueError(f"width must be at most 2, got {width}")


class BadSetup(SamPlugin):
    def setup(self, sam):
        sam.image_encoder.patch_embed.projection  # SAM names it proj


class Permute(SamPlugin):
    def setup(self, sam):
        self.scale = nn.Parameter(torch.ones(()))

    def block_output(self, i, x, ctx):
        return (x * self.scale).permute(0, 3, 1, 2)
"""

FIT = ["fit", "--experiment", "quickstart", "--trainer.max_epochs", "0"]


@pytest.fixture(scope="module")
def acme(tmp_path_factory) -> Path:
    """A distribution 'acme-sam' 1.2 with the module ``acme_plugins``."""
    site = tmp_path_factory.mktemp("site")
    (site / "acme_plugins.py").write_text(PLUGIN)
    info = site / "acme_sam-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sam\nVersion: 1.2\n")
    (info / "top_level.txt").write_text("acme_plugins\n")
    return site


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("samflow: error:"), proc.stderr[-3000:]
    assert sum(line.startswith("samflow: error:") for line in lines) == 1
    return lines[-1]


def test_an_error_in_a_plugin_constructor_names_its_key_class_and_distribution(tmp_path, acme):
    args = [*FIT, "--model.plugins.wide.class_path", "acme_plugins.BadInit"]
    line = error_line(samflow_here(args, tmp_path, pythonpath=acme))
    assert line == (
        "samflow: error: model.plugins.wide (BadInit from acme-sam 1.2): ValueError: width must be at most 2, got 4"
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "SAMFLOW_DEBUG": "1", "PYTHONPATH": str(acme)}
    debug = subprocess.run(
        [sys.executable, "-m", "samflow", *args],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert 'raise ValueError(f"width must be at most 2' in debug.stderr  # the plugin's own frame


def test_an_error_in_a_plugin_setup_is_one_line(tmp_path, acme):
    line = error_line(
        samflow_here(
            [*FIT, "--model.plugins.bad.class_path", "acme_plugins.BadSetup"], tmp_path, pythonpath=acme
        )
    )
    assert "samflow: error: model.plugins.bad (BadSetup from acme-sam 1.2): setup: AttributeError:" in line
    assert "projection" in line


def test_a_hook_returning_a_wrong_shape_is_one_line_in_a_run(tmp_path, acme):
    args = [
        "fit",
        "--experiment",
        "quickstart",
        *short_run(train=1, val=0),
        "--trainer.limit_val_batches",
        "0",
    ]
    args += ["--model.plugins", "{p: {class_path: acme_plugins.Permute}}"]
    line = error_line(samflow_here(args, tmp_path, pythonpath=acme))
    assert "Plugin 'p' (Permute): block_output(i=0) returned a tensor of shape (4, 64, 8, 8)" in line
    assert "expected a tensor of shape (4, 8, 8, 64)" in line


def test_a_misspelt_loss_argument_names_the_key_and_the_arguments(tmp_path):
    line = error_line(samflow_here([*FIT, "--model.losses", "{dice: {weight: 1, smoth: 2}}"], tmp_path))
    assert "model.losses.dice" in line and "'smoth'" in line and "it takes smooth" in line


def test_a_bad_encoder_cache_stage_names_the_key(tmp_path):
    args = [*FIT, "--model.sam.encoder_cache", "8", "--model.sam.encoder_cache_stages", "[training]"]
    line = error_line(samflow_here(args, tmp_path))
    assert "model.sam.encoder_cache_stages" in line and "['training']" in line
