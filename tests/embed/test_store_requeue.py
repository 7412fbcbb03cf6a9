"""`samflow embed` and `samflow proposals` in a SLURM job with ``#SBATCH --signal=SIGUSR1@90``: each stops
before its next chunk of images, keeps what it wrote, requeues the job and exits 1 in one line; the
restarted job's same command finishes the store, which equals the store of an uninterrupted run. A
signal once the store is complete is only noted (exit 0).

Before, nothing held the signal for these commands: its default action killed the process (here a
stand-in handler keeps the test's process alive and must never be called) and the job ended without
being requeued, its store unfinished. SLURM is faked as in ``tests/reliability/test_signals.py`` (a
stand-in ``scontrol`` on PATH records its calls); the signal is sent in this process, while the
command reads an image (embed) or computes a shard (proposals).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import samflow.embed.writer as writer
import samflow.proposals as proposals
from samflow.cli import main
from samflow.data.quickstart import make_quickstart_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from test_signals import _slurm_job  # noqa: E402
from tiny_coco import make_tiny_coco  # noqa: E402

REQUEUED = (
    "samflow: error: samflow {command}: SLURM's requeue signal: stopped with {written} (kept); SLURM job "
    "4242 requeued: the same command finishes the store when the job starts again.\n"
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """The tiny SAM with HQ-SAM (the store holds its early block too) on 5 training images at 128 px."""
    base = tmp_path_factory.mktemp("store_requeue")
    root = make_quickstart_data(base / "data", n_train=5, n_val=1, seed=3)
    path = base / "exp.yaml"
    path.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins: {hq: {class_path: HQSam}}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {root / 'train'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


@pytest.fixture(scope="module")
def coco_experiment(tmp_path_factory) -> Path:
    """The tiny SAM on the tiny COCO set (3 images with instances) at 128 px."""
    base = tmp_path_factory.mktemp("proposals_requeue")
    annotations, _ = make_tiny_coco(base / "coco")
    path = base / "exp.yaml"
    path.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


@contextmanager
def never_delivered() -> Iterator[list[int]]:
    """A stand-in for SIGUSR1's default action (which kills the process): the list of its calls."""
    delivered: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: delivered.append(signum))
    try:
        yield delivered
    finally:
        signal.signal(signal.SIGUSR1, previous)


def signal_at(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int) -> None:
    """SLURM's requeue signal in the ``call``-th call (from 0) of ``owner.name``, before it runs."""
    original: Callable = getattr(owner, name)
    calls = []

    def wrapped(*args, **kwargs):
        if len(calls) == call:
            signal.raise_signal(signal.SIGUSR1)
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def same_files(ours: Path, reference: Path) -> None:
    names = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == names
    for name in names:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def requeued_then_finished(
    args: list[str],
    signalled: tuple[object, str],
    written: str,
    stopped: Callable[[Path], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """``samflow ARGS --out whole`` outside SLURM (uninterrupted), then ``--out store`` in SLURM job 4242
    with the requeue signal in the first call of ``signalled`` (owner, name): exit 1, the one line saying
    ``written`` and the requeue, ``scontrol requeue 4242`` once, ``stopped(store)`` true of what is kept;
    then the restarted job's same command: exit 0, the files of ``whole`` byte for byte, no other requeue."""
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls = _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "store"
    capsys.readouterr()
    with never_delivered() as delivered, monkeypatch.context() as patch:
        signal_at(patch, *signalled, 0)
        assert main([*args, "--out", str(out)]) == 1  # was 0, the process killed by the signal
    assert delivered == []
    err = capsys.readouterr().err
    assert err == REQUEUED.format(command=args[0], written=written), err
    assert calls.read_text() == "requeue 4242\n"
    stopped(out)

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job started again: the same command
    assert main([*args, "--out", str(out)]) == 0
    same_files(out, tmp_path / "whole")
    assert calls.read_text() == "requeue 4242\n"


def test_embed_stops_before_its_next_chunk_requeues_and_the_restart_finishes_the_store(
    experiment, tmp_path, monkeypatch, capsys
):
    """The signal while the first chunk's images are read (2 of 5 at ``--batch-size 2``): that chunk is
    written, the command stops before the next, ``scontrol requeue 4242``, exit 1 in one line; the same
    command in the restarted job encodes the other 3 images and the store is byte for byte the
    uninterrupted one's."""

    def two_rows(out: Path) -> None:
        assert writer.completed_rows(out) == 2

    args = ["embed", "--experiment", str(experiment), "--batch-size", "2", "--shard-size", "3"]
    requeued_then_finished(
        args, (writer, "_input"), "2 of 5 images written", two_rows, tmp_path, monkeypatch, capsys
    )


def test_embed_noting_a_signal_in_its_last_chunk_ends_with_the_store_complete(
    experiment, tmp_path, monkeypatch, capsys
):
    """The signal while the last image is read: nothing is left to stop before, the store is complete,
    exit 0 with one line saying the command is not requeued; ``scontrol`` is never run."""
    calls = _slurm_job(tmp_path, monkeypatch)
    out = tmp_path / "store"
    capsys.readouterr()
    with never_delivered() as delivered, monkeypatch.context() as patch:
        signal_at(patch, writer, "_input", 4)
        assert main(["embed", "--experiment", str(experiment), "--out", str(out), "--batch-size", "2"]) == 0
    assert delivered == []
    err = capsys.readouterr().err
    assert (
        "samflow: SLURM's requeue signal: `samflow embed` is not requeued (its store is done); it goes on "
        "until it ends or the job's time limit.\n"
    ) in err, err
    assert err.count("SLURM's requeue signal") == 1
    assert writer.completed_rows(out) == 5
    assert not calls.exists()


def test_proposals_stop_before_the_next_shard_requeue_and_the_restart_writes_the_same_file(
    coco_experiment, tmp_path, monkeypatch, capsys
):
    """The signal while the first of 3 shards (one image each) is computed: it is written, the command
    stops, requeues the job, exit 1 in one line; the restarted job's same command writes the other two,
    and ``proposals.json`` is byte for byte the uninterrupted run's."""

    def first_shard(out: Path) -> None:
        assert [p.name for p in (out / "shards").iterdir()] == ["000000.json"]
        assert not (out / "proposals.json").exists()

    args = ["proposals", "--experiment", str(coco_experiment), "--shard-size", "1"]
    requeued_then_finished(
        args,
        (proposals, "shard_records"),
        "1 of 3 shards written",
        first_shard,
        tmp_path,
        monkeypatch,
        capsys,
    )


def test_a_failed_requeue_says_to_run_the_command_again(experiment, tmp_path, monkeypatch, capsys):
    """``scontrol requeue`` failing with nothing on stderr (exit 1): the line says so and what to do.
    Before, a failure without stderr was taken for a requeue (``SlurmRequeue`` read only stderr)."""
    _slurm_job(tmp_path, monkeypatch)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    out = tmp_path / "store"
    capsys.readouterr()
    with never_delivered(), monkeypatch.context() as patch:
        signal_at(patch, writer, "_input", 0)
        args = ["embed", "--experiment", str(experiment), "--out", str(out), "--batch-size", "2"]
        assert main(args) == 1
    assert capsys.readouterr().err == (
        "samflow: error: samflow embed: SLURM's requeue signal: stopped with 2 of 5 images written (kept); "
        "`scontrol requeue 4242` failed (exit status 1): run the same command again to finish it.\n"
    )
