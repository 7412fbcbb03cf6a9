"""Exact resume under DDP: a 2-rank fit killed mid-epoch (every process, SIGKILL) and resumed ends as
the uninterrupted 2-rank fit, bit for bit (CPU, gloo): each rank's loader position and per-sample
draws, the optimizer and loop state, and the reduced gradients (``test_resume.py`` proves the same on
one process, piece by piece).

What this does not cover: the checkpoint holds rank 0's global random generators, restored on every
rank. The ranks start from one seed and the built-in training steps draw the same amounts on every
rank, so those are every rank's states; a plugin whose draws in the step depended on its rank's data
would not resume exactly under DDP (README, "Resume").
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from test_resume import _best_line, _fit, _same_files_and_rows, _val_rows, _weights, kill_mid_second_epoch

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
BATCHES = 2  # per rank and epoch: 16 training images, batch 4, 2 ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quickstart_ddp") / "data"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("uninterrupted_ddp")
    proc = _fit(cwd, data, *DDP)
    return cwd / "runs" / "quickstart" / "version_0", proc


def test_a_ddp_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, data, uninterrupted):
    run = tmp_path / "runs" / "quickstart" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    expected_run, expected_proc = uninterrupted
    kill_mid_second_epoch(tmp_path, data, BATCHES, *DDP)

    resumed = _fit(tmp_path, data, *DDP, "--resume", str(run))

    expected, got = _val_rows(expected_run)[-1], _val_rows(run)[-1]
    assert got["epoch"] == expected["epoch"] == "1"
    for key in ("val/iou", "val/dice", "val/mae", "val/loss"):
        assert got[key] == expected[key], key
    reference, weights = _weights(expected_run / "checkpoints" / "last.ckpt"), _weights(last)
    assert reference.keys() == weights.keys()
    changed = [k for k in reference if not torch.equal(reference[k], weights[k])]
    assert not changed, changed
    _same_files_and_rows(run, expected_run)  # metrics.csv appended to, the best checkpoint kept
    assert _best_line(resumed) == _best_line(expected_proc)
