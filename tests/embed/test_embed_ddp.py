"""`torchrun --nproc_per_node 2 -m samflow embed` on the CPU (gloo), real processes: the ranks split the
images and write the store one process writes (rank 0's bar counting every rank's images); a run
killed part way (SIGTERM to torchrun) is finished by a run on 2 processes or on 1 (another world
size), giving that store again; a rank that fails stops the run with exit status 1 and one line per
rank (before: the rank left waiting printed gloo's "Connection closed by peer" traceback); ranks whose
work is unbalanced wait for each other past the process group's timeout; a store another process
holds is refused by rank 0 in one line, torchrun ending rank 1, the store untouched.

Why the arrays are compared for exact equality: rank r takes rows r, r + 2, ... in chunks of
``--batch-size``, so the ranks' batches hold other images than one process's. An image's encoder
output does not depend on its batch-mates' values, but its rounding may depend on the batch *size*:
the tiny encoder's float32 output of an image encoded alone differs from the same image encoded in a
batch of 2, 3 or 6 by up to 2.7e-6 (measured, 1 thread; batches of 2, 3 and 6 agree exactly), enough
to move a float16 value to its neighbour (1 fp16 ulp, 9.8e-4 near 1). With 8 images at
``--batch-size 2`` every batch of every run here holds 2 images, so each image goes through the same
arithmetic (same shapes, 1 thread per process) and the files must be equal byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import HOLD, SHORT_GROUP_TIMEOUTS, TORCHRUN, TORCHRUN_ENV, kill_tree, run_torchrun

import samflow.embed.command as embed_command
from samflow.cli import main
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed import EmbeddingStoreError, open_for_run
from samflow.embed.store import DONE, LOCK
from samflow.embed.writer import write_store
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.hq_sam import HQSam

BATCH = ["--batch-size", "2", "--shard-size", "3"]  # 8 images: shards of 3, 3, 2 rows, each rank's
# share (rows r, r + 2, ...) crosses every shard

# `samflow embed` whose ranks, past their first chunk (2 images), do {then} when {when}: the test's
# way to stop a rank at a known point (the product has no such switch)
WRAPPED = """
import os, sys, time
import samflow.embed.writer as writer
from samflow.cli import main
read, calls = writer._input, []
def _input(path, key):
    calls.append(path)
    if len(calls) > 2 and {when}:
        {then}
    return read(path, key)
writer._input = _input
raise SystemExit(main(sys.argv[1:]))
"""
# each rank waits (as if its encoder were slow) until the test kills the run
WAITING = WRAPPED.format(when="True", then="time.sleep(600)")
# rank 1 fails as if an image of its share had gone
FAILING = WRAPPED.format(
    when='os.environ["RANK"] == "1"', then='raise FileNotFoundError(2, "No such file or directory", path)'
)
# every process group's timeout 1 s (SHORT_GROUP_TIMEOUTS), and the ranks' work unbalanced: rank 0 sets the data up for 3 s (the others wait before theirs), and
# rank 1 takes 3 s more for its second chunk (rank 0 waits for it once its own share is written)
UNBALANCED = (
    SHORT_GROUP_TIMEOUTS
    + """
import os, time
from samflow.data import SegmentationDataModule
setup = SegmentationDataModule.setup
def slow_setup(self, stage=None):
    if os.environ["RANK"] == "0":
        time.sleep(3)
    return setup(self, stage)
SegmentationDataModule.setup = slow_setup
"""
    + WRAPPED.format(when='os.environ["RANK"] == "1" and len(calls) == 3', then="time.sleep(3)")
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """The tiny SAM with HQ-SAM (the store holds its early block too) on 5 train + 3 val images."""
    base = tmp_path_factory.mktemp("embed_ddp")
    root = make_quickstart_data(base / "data", n_train=5, n_val=3, seed=3)
    path = base / "exp.yaml"
    path.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins: {hq: {class_path: HQSam}}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {root / 'train'}, val: {root / 'val'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


def embed_here(experiment: Path, out: Path) -> None:
    """`samflow embed` in this process, on one thread as the torchrun workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["embed", "--experiment", str(experiment), "--out", str(out), *BATCH]) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(experiment, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "store"
    embed_here(experiment, out)
    return out


def assert_same_store(ours: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == names
    assert "block01-00002.npy" in names and "embedding-00002.npy" in names  # 3 shards of both parts
    for name in names:
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(ours / name), np.load(reference / name), err_msg=name)
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    assert np.load(ours / DONE).tolist() == [1] * 8


def bar(stdout: str) -> str:
    """The count (done/total) of the one progress bar (rank 0's) in a run's output."""
    lines = [line for line in stdout.splitlines() if line.startswith("samflow embed ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[-2]


def data_of(experiment: Path) -> SegmentationDataModule:
    root = experiment.parent / "data"
    dm = SegmentationDataModule(train=str(root / "train"), val=str(root / "val"), img_size=128)
    dm.setup("fit")
    return dm


def test_two_processes_write_the_store_of_one(experiment, one_process, tmp_path):
    two = run_torchrun(
        ["-m", "samflow", "embed", "--experiment", str(experiment), "--out", "two", *BATCH], tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 reports once, its own share: rows 0, 2, 4, 6
    lines = [line for line in two.stderr.splitlines() if "samflow embed:" in line]
    assert len(lines) == 1 and "8 images in two (4 encoded now by rank 0, 2 rank(s))" in lines[0], two.stderr
    assert bar(two.stdout) == "8/8"  # rank 0's bar counts every rank's images, not its 4
    assert_same_store(tmp_path / "two", one_process)
    module = SamflowModule(
        sam=SamSpec(variant="tiny", embedding_store=str(tmp_path / "two")), plugins={"hq": HQSam()}
    )
    store = open_for_run(module, data_of(experiment), "fit")
    assert len(store) == 8


def _rank_zero_lines(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lines Lightning's ``rank_zero_info`` logs from now on in this process, on a handler of the
    logger it writes to: whatever earlier tests of this worker did to logging (a ``fileConfig`` that
    disabled the existing loggers, a rank left set, Lightning's loggers not propagating to pytest's)."""
    import logging

    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core import rank_zero as rank_zero_module

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = rank_zero_module.log
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])  # the list as it was afterwards
    return lines


def test_a_killed_two_process_run_is_finished_on_two_or_one(experiment, one_process, tmp_path, monkeypatch):
    script = tmp_path / "stopping.py"
    script.write_text(WAITING)
    store = tmp_path / "store"
    args = ["embed", "--experiment", str(experiment), "--out", str(store), *BATCH]
    run = subprocess.Popen(
        [*TORCHRUN, str(script), *args],
        cwd=tmp_path,
        env={**os.environ, **TORCHRUN_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ((store / DONE).is_file() and np.load(store / DONE).sum() == 4):
            assert run.poll() is None, run.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the ranks never wrote their first chunks"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun stops its workers
        assert run.wait(timeout=120) != 0
    finally:
        if run.poll() is None:
            kill_tree(run.pid)  # torchrun and its workers (in sessions of their own)
            run.wait()
    # each rank's first chunk (rank 0: rows 0, 2; rank 1: rows 1, 3), and nothing after it
    assert np.load(store / DONE).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    module = SamflowModule(sam=SamSpec(variant="tiny", embedding_store=str(store)), plugins={"hq": HQSam()})
    with pytest.raises(EmbeddingStoreError, match=r"incomplete \(4 of 8 images\)"):
        open_for_run(module, data_of(experiment), "fit")
    on_one = tmp_path / "on_one"
    shutil.copytree(store, on_one)

    again = run_torchrun(["-m", "samflow", *args], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(2 encoded now by rank 0, 2 rank(s))" in again.stderr, again.stderr
    assert bar(again.stdout) == "8/8"
    assert_same_store(store, one_process)

    logged = _rank_zero_lines(monkeypatch)
    embed_here(experiment, on_one)
    assert any("(4 encoded now by rank 0, 1 rank(s))" in line for line in logged), logged
    assert_same_store(on_one, one_process)


def test_a_failing_rank_stops_the_run_with_one_line_per_rank(experiment, one_process, tmp_path):
    """Rank 1 fails at its second chunk: the run exits 1, rank 1's error is one line, and rank 0 (whose
    wait for rank 1 then fails) says so in one line too, not with gloo's traceback; the rows written
    are kept, and a run in one process finishes the store."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    store = tmp_path / "store"
    args = ["embed", "--experiment", str(experiment), "--out", str(store), *BATCH]
    failed = run_torchrun([str(script), *args], tmp_path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    out = failed.stdout + failed.stderr
    assert "samflow: error: [Errno 2] No such file or directory" in out, out[-3000:]
    # rank 0 either says so or torchrun stops it first; either way no traceback but torchrun's own
    assert "RuntimeError" not in out and out.count("Traceback (most recent call last)") <= 1, out[-3000:]
    lines = [line for line in out.splitlines() if "another rank stopped" in line]
    assert all(line.startswith("samflow: error: samflow embed: another rank stopped") for line in lines)
    done = np.load(store / DONE)
    assert done[[0, 2, 1, 3]].all() and not done[[5, 7]].any()  # rank 1: its first chunk alone
    embed_here(experiment, store)
    assert_same_store(store, one_process)


def test_unbalanced_ranks_wait_for_each_other_past_the_groups_timeout(experiment, one_process, tmp_path):
    """Each rank waits for the others as long as their work takes, not the process group's timeout
    (gloo 30 min, NCCL 10 min; 1 s here, the ranks 3 s apart twice): a resumed run whose rank 0 had
    nothing left used to stop with "Timed out waiting" while rank 1 was still encoding."""
    script = tmp_path / "unbalanced.py"
    script.write_text(UNBALANCED)
    run = run_torchrun(
        [str(script), "embed", "--experiment", str(experiment), "--out", "store", *BATCH], tmp_path
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert bar(run.stdout) == "8/8"
    assert_same_store(tmp_path / "store", one_process)


def test_the_requeue_signal_on_one_rank_stops_both_and_rank_0_requeues_the_job(experiment, tmp_path):
    """A SLURM job (``SLURM_JOB_ID``, a stand-in ``scontrol`` on PATH) whose rank 1 alone gets SLURM's
    requeue signal while it reads its third image (``--batch-size 1``: rows 1, 3, 5, 7): rank 1 writes
    that image and stops before row 7, rank 0 writes its share, and once both have stopped rank 0
    requeues the job (one ``scontrol requeue``, its line saying so; rank 1's saying process 0 does),
    exit 1, 7 of 8 images kept. The restarted job's same command encodes row 7 and the store is byte for
    byte one process's. Before, the signal killed rank 1 and the job was not requeued."""
    script = tmp_path / "signalled.py"
    script.write_text(
        WRAPPED.format(
            when='os.environ["RANK"] == "1" and len(calls) == 3',
            then="import signal; signal.raise_signal(signal.SIGUSR1)",
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    sizes = ["--batch-size", "1", "--shard-size", "3"]  # each image alone, in shards of 3
    args = ["embed", "--experiment", str(experiment), "--out", "store", *sizes]
    stopped = run_torchrun([str(script), *args], tmp_path, **job)
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 1, out[-3000:]
    stop = (
        "samflow: error: samflow embed: SLURM's requeue signal: stopped with 7 of 8 images written (kept); "
    )
    assert (
        f"{stop}SLURM job 4242 requeued: the same command finishes the store when the job starts again."
        in out
    )
    assert f"{stop}process 0 requeues SLURM job 4242." in out, out[-3000:]
    assert calls.read_text() == "requeue 4242\n"
    assert np.load(tmp_path / "store" / DONE).tolist() == [1, 1, 1, 1, 1, 1, 1, 0]

    again = run_torchrun(["-m", "samflow", *args], tmp_path, **job, SLURM_RESTART_COUNT="1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 encoded now by rank 0, 2 rank(s))" in again.stderr, again.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: each image alone, on one thread
    try:
        assert main(["embed", "--experiment", str(experiment), "--out", str(tmp_path / "one"), *sizes]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "store" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert calls.read_text() == "requeue 4242\n"


def hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``folder`` (hidden ones too), by its relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_store_another_process_writes_is_refused_by_rank_0_and_torchrun_ends_rank_1(
    experiment, tmp_path, monkeypatch
):
    """``torchrun ... -m samflow embed --out STORE`` while another process holds ``STORE/.embed.lock``:
    rank 0, which takes the lock once both ranks have joined the process group, is refused in the one
    line one process prints (naming the store and the process holding it) and exits 1; torchrun then
    ends rank 1 (SIGTERM), or rank 1, waiting for rank 0 at its first barrier, stops in its own line.
    Exit 1, no traceback but torchrun's report of the failed ranks, the store byte for byte as it was,
    no rank left running. A rank 1 left hanging fails it: past the timeout (``run_torchrun`` then kills
    every process of the run), or ended by torchrun's SIGKILL (30 s after a SIGTERM it ignored).

    ``samflow proposals`` and ``predict-slide`` refuse a held folder the same way (every rank joins the
    process group, then rank 0 alone takes the lock; rank 1 writes nothing before its first wait for
    rank 0): their refusals are tested in one process (tests/reliability/test_output_locks.py)."""
    store = tmp_path / "store"
    args = ["embed", "--experiment", str(experiment), "--out", str(store), *BATCH]
    with monkeypatch.context() as patch:  # a store stopped after its first chunk: 6 of 8 rows to write
        patch.setattr(embed_command, "write_store", functools.partial(write_store, stop_after=1))
        assert main(args) == 1
    assert np.load(store / DONE).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store / LOCK)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = hashes(store)
        run = run_torchrun(["-m", "samflow", *args], tmp_path, timeout=240)
        # torchrun and its ranks: "--out STORE" in their command lines (the holder's names STORE/.embed.lock)
        left = [
            p.info
            for p in psutil.process_iter(["pid", "cmdline", "status"])
            if str(store) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE
        ]
        after = hashes(store)
    finally:
        holder.kill()
        holder.wait()
    err = run.stderr
    assert run.returncode == 1, err[-3000:]
    assert not left, left
    assert after == before
    busy = (
        f"samflow: error: samflow embed: the store {store} is being written by another samflow embed (pid "
        f"{holder.pid} on {socket.gethostname()}); wait until it ends, or choose another store with --out."
    )
    # what the ranks print comes before torchrun's report (a traceback of its ChildFailedError, torch's
    # frames alone, and each rank's exit)
    ranks, _, report = err.partition("Traceback (most recent call last):")
    frames = [line for line in report.splitlines() if line.startswith('  File "')]
    assert "Traceback" not in report and "ChildFailedError" in report, err[-3000:]
    assert all("torch/distributed/" in line or "<frozen runpy>" in line for line in frames), err[-3000:]
    lines = [line for line in ranks.splitlines() if line.strip() and not re.match(r"[IWE]\d{4} ", line)]
    assert lines[0] == busy and len(lines) <= 2, err[-3000:]  # torchrun's own log lines left out
    assert all(line.startswith("samflow: error: samflow embed: another rank stopped") for line in lines[1:])
    assert run.stdout.strip() == ""
    exits = dict(re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", report))
    # rank 1: torchrun's SIGTERM (-15), or its own line (1); not torchrun's SIGKILL (-9)
    assert exits["0"] == "1" and exits["1"] in ("-15", "1"), err[-3000:]
    assert exits["1"] == "-15" or len(lines) == 2, err[-3000:]


def test_processes_on_several_machines_are_refused_before_joining(experiment, tmp_path, monkeypatch, capsys):
    """torchrun --nnodes 2: one line saying why (memory maps), before any process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("samflow.commands.init_process_group", lambda: pytest.fail("joined a process group"))
    assert main(["embed", "--experiment", str(experiment), "--out", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4 processes on 2 machines" in err[0] and "--nnodes 1" in err[0], err
    assert not (tmp_path / "store").exists()
