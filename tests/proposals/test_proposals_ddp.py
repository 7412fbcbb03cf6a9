"""`torchrun --nproc_per_node 2 -m samflow proposals` on the CPU (gloo), real processes: the ranks split the
shards and write the store one process writes, byte for byte, also when their work is unbalanced past the
process group's timeout; a rank's wait that fails because another rank stopped is one line.

Byte equality holds because a shard is a fixed range of images computed in fixed batches whichever rank
computes it, on one thread per process (torchrun's workers and the reference alike).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from helpers import SHORT_GROUP_TIMEOUTS, run_torchrun
from tiny_coco import make_tiny_coco

from samflow.cli import main

SHARDS = [
    "--shard-size",
    "1",
]  # 3 images with instances, 3 shards: rank 0 computes 0 and 2, rank 1 computes 1

# the ranks' work unbalanced: rank 1 takes 3 s more for its shard (rank 0 waits for it), and rank 0
# 3 s more to merge (rank 1 waits for it); every group's timeout is 1 s (SHORT_GROUP_TIMEOUTS)
UNBALANCED = (
    SHORT_GROUP_TIMEOUTS
    + """
import os, sys, time
import samflow.proposals as proposals
from samflow.cli import main
records, write = proposals.shard_records, proposals._write_json
def shard_records(model, dataset, indices, *args):
    if os.environ["RANK"] == "1":
        time.sleep(3)
    return records(model, dataset, indices, *args)
def _write_json(path, value):
    if path.name == "proposals.json":
        time.sleep(3)
    return write(path, value)
proposals.shard_records, proposals._write_json = shard_records, _write_json
raise SystemExit(main(sys.argv[1:]))
"""
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """The tiny SAM on the tiny COCO set (3 images with instances, one without, which is left out)."""
    base = tmp_path_factory.mktemp("proposals_ddp")
    make_tiny_coco(base / "coco")
    path = base / "exp.yaml"
    path.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, train: {{annotations: {base / 'coco' / 'instances.json'}}}}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


@pytest.fixture(scope="module")
def one_process(experiment, tmp_path_factory) -> Path:
    """The store `samflow proposals` writes in one process, on one thread as the torchrun workers run."""
    out = tmp_path_factory.mktemp("one") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["proposals", "--experiment", str(experiment), "--out", str(out), *SHARDS]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_store(ours: Path, reference: Path) -> None:
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == files
    assert Path("proposals.json") in files and Path("shards/000002.json") in files
    for name in files:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def bar(stdout: str) -> str:
    """The count (done/total) of the one progress bar (rank 0's) in a run's output."""
    lines = [line for line in stdout.splitlines() if line.startswith("samflow proposals ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[-2]


def test_two_processes_write_the_proposals_of_one(experiment, one_process, tmp_path):
    run = run_torchrun(
        ["-m", "samflow", "proposals", "--experiment", str(experiment), "--out", "two", *SHARDS], tmp_path
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert bar(run.stdout) == "3/3"  # rank 0's bar counts rank 1's shards too
    assert_same_store(tmp_path / "two", one_process)


def test_unbalanced_ranks_wait_for_each_other_past_the_groups_timeout(experiment, one_process, tmp_path):
    """Each rank waits for the others as long as their work takes, not the process group's timeout
    (gloo 30 min, NCCL 10 min; 1 s here, the ranks 3 s apart twice): rank 0 waiting for rank 1's
    shard, then rank 1 for rank 0's merge, used to stop with "Timed out waiting"."""
    script = tmp_path / "unbalanced.py"
    script.write_text(UNBALANCED)
    run = run_torchrun(
        [str(script), "proposals", "--experiment", str(experiment), "--out", "two", *SHARDS], tmp_path
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert bar(run.stdout) == "3/3"
    assert_same_store(tmp_path / "two", one_process)


def test_a_wait_ended_by_a_stopped_rank_is_one_line(experiment, tmp_path, monkeypatch, capsys):
    """The wait's error when another rank stopped (gloo: "Connection closed by peer") is one line naming
    the command and what to do, not a traceback that reads as the cause (that rank prints its own)."""

    def closed(while_waiting=None):
        raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:4242.\nCheck the remote logs")

    monkeypatch.setattr("samflow.commands.barrier", closed)
    assert main(["proposals", "--experiment", str(experiment), "--out", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("samflow: error: samflow proposals: another rank stopped, its error is above")
    assert "Connection closed by peer" in err[0] and "run the same command again" in err[0]
