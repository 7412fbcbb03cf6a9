"""Two processes writing one embedding store, one proposals store, or one explicit predictions folder, at
the same moment.

Found here: ``samflow embed`` of one store from two processes at once did the work twice and both wrote
the store, and two ``samflow predict`` runs into one ``--predictions.output_dir`` (or ``predict
--prompts`` / ``predict-slide`` into one ``--out``) interleaved their files and records: nothing locked
the folder (nor ``samflow proposals`` its store). Now the writing process holds a lock file in it
(``.embed.lock`` in an embedding store, ``.proposals.lock`` in a proposals store,
``.predict.lock`` in a predictions folder: an ``flock``, as a fit's ``.fit.lock``, ended by the kernel
however the process ends), and a second process is refused in one line naming the folder and the
process, before SAM is built (the predict writer checks again before its first mask) and without
writing anything. A killed holder (SIGKILL) blocks nothing: the next run finishes the store / folder as
an uninterrupted run would, and its stale lock file is neither taken for an output nor left behind.

The other process is a small Python process holding the lock file with ``flock`` and writing
``pid N on HOST`` into it, as samflow's ``RunLock`` does (so these tests need nothing of samflow's lock
to run against an older samflow).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import HOLD, samflow_here
from PIL import Image

import samflow.embed.command as embed_command
import samflow.module
from samflow.callbacks.mask_writer import MaskWriter
from samflow.cli import main
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.writer import write_store

STORE_LOCK, PREDICT_LOCK = ".embed.lock", ".predict.lock"


@contextmanager
def holder(lock: Path) -> Iterator[subprocess.Popen]:
    """Another live process holding the lock file ``lock``; SIGKILLed at the end (if still alive)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def held_by(lock: Path) -> str | None:
    """``pid N on HOST`` of a live process holding ``lock`` (an ``flock``), else None."""
    try:
        file = open(lock, "rb")  # noqa: SIM115
    except OSError:
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read_text().strip()
    return None


def refused(proc: subprocess.CompletedProcess, line: str) -> None:
    """``proc`` exited 1 with ``line`` as its last line of stderr."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and err[-1] == line, proc.stderr[-3000:]


def me() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by its relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def no_sam_built(*args, **kwargs):
    """``build_sam`` failing the test: a refusal must come before SAM is built."""
    raise AssertionError("SAM was built before the refusal")


@pytest.fixture
def no_sam(monkeypatch) -> None:
    monkeypatch.setattr(samflow.module, "build_sam", no_sam_built)


# ---- samflow embed ----
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("embed_data"), n_train=5, n_val=1, seed=3)


def experiment(folder: Path, data_root: Path, store: Path | None = None) -> Path:
    """The tiny SAM on the train images of ``data_root``; ``store``: its ``model.sam.embedding_store``."""
    path = folder / "exp.yaml"
    where = f", embedding_store: {store}" if store else ""
    path.write_text(
        f"model:\n  sam: {{variant: tiny{where}}}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {data_root / 'train'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return path


def embed(exp: Path, out: Path | None, *more: str) -> list[str]:
    return [
        "embed",
        "--experiment",
        str(exp),
        *(["--out", str(out)] if out else []),
        "--batch-size",
        "2",
        *more,
    ]


@pytest.fixture(scope="module")
def whole_store(tmp_path_factory, data_root) -> Path:
    """The store of an uninterrupted ``samflow embed``."""
    folder = tmp_path_factory.mktemp("whole_store")
    store = folder / "store"
    assert main(embed(experiment(folder, data_root), store)) == 0
    return store


def partial_store(store: Path, exp: Path, monkeypatch) -> None:
    """``store`` as a ``samflow embed`` stopped after its first chunk (2 of the 5 images) leaves it."""
    with monkeypatch.context() as patch:
        patch.setattr(embed_command, "write_store", functools.partial(write_store, stop_after=1))
        assert main(embed(exp, store)) == 1


def store_busy(store: Path, who: str) -> str:
    return (
        f"samflow: error: samflow embed: the store {store} is being written by another samflow embed ({who}); "
        "wait until it ends, or choose another store with --out."
    )


@pytest.mark.parametrize("given", ["--out", "experiment"])
def test_embed_into_a_store_another_process_writes_is_refused_before_sam_is_built(
    tmp_path, data_root, monkeypatch, capsys, given
):
    """The store named by ``--out`` or by the experiment's ``model.sam.embedding_store``."""
    store = tmp_path / "store"
    partial_store(store, experiment(tmp_path, data_root), monkeypatch)
    exp = experiment(tmp_path, data_root, store if given == "experiment" else None)
    with holder(store / STORE_LOCK) as other:
        before = files(store)
        capsys.readouterr()
        with monkeypatch.context() as patch:
            patch.setattr(samflow.module, "build_sam", no_sam_built)
            status = main(embed(exp, store if given == "--out" else None))
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and err[-1] == store_busy(store, f"pid {other.pid} on {socket.gethostname()}"), err
        assert files(store) == before  # the other process's partial store and lock, byte for byte


def test_embed_after_the_holder_is_killed_finishes_the_store_as_an_uninterrupted_run(
    tmp_path, data_root, whole_store, monkeypatch
):
    """A ``samflow embed`` killed (SIGKILL) mid-store: its lock file stays, held by nobody. The next run
    holds the store while it writes, finishes it byte for byte as an uninterrupted run, and leaves no
    lock file."""
    store = tmp_path / "store"
    exp = experiment(tmp_path, data_root)
    partial_store(store, exp, monkeypatch)
    with holder(store / STORE_LOCK) as other:
        killed(other)
    assert (store / STORE_LOCK).is_file()
    seen = []

    def writing(root, *args, **kwargs):
        seen.append(held_by(Path(root) / STORE_LOCK))
        return write_store(root, *args, **kwargs)

    monkeypatch.setattr(embed_command, "write_store", writing)
    assert main(embed(exp, store)) == 0
    assert seen == [me()]  # held by this run while it wrote
    assert files(store) == files(whole_store)


def test_a_stale_lock_file_in_a_new_store_folder_is_no_file_of_the_folder(tmp_path, data_root, whole_store):
    """A ``samflow embed`` killed before it created the store's files leaves only its lock file: the
    folder is still an empty one to the next run (not 'not an embedding store')."""
    store = tmp_path / "store"
    with holder(store / STORE_LOCK) as other:
        killed(other)
    assert main(embed(experiment(tmp_path, data_root), store)) == 0
    assert files(store) == files(whole_store)


# ---- samflow predict (plain: MaskWriter) ----
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict_locks")


def predict(work: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    """``samflow predict`` of the quickstart's 3 val images (batches of 2) into ``out``."""
    data = [
        "--data.init_args.quickstart.root", str(work / "data"),
        "--data.init_args.quickstart.n_train", "2", "--data.init_args.quickstart.n_val", "3",
        "--data.init_args.eval_batch_size", "2",
        "--data.init_args.predict", str(work / "data" / "val" / "images"),
    ]  # fmt: skip
    outputs = ["--predictions.output_dir", str(out), "--predictions.save_probabilities", "true"]
    return samflow_here(["predict", "--experiment", "quickstart", *data, *outputs, *more], work)


@pytest.fixture(scope="module")
def whole_predictions(work) -> Path:
    out = work / "whole"
    proc = predict(work, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def predict_busy(out: Path, who: str) -> str:
    return (
        f"samflow: error: The predictions folder {out} (--predictions.output_dir) is being written by another "
        f"samflow process ({who}); wait until it ends, or choose another folder with --predictions.output_dir."
    )


def test_predict_into_an_output_dir_another_process_writes_is_refused_before_sam_is_built(
    work, tmp_path, no_sam
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the other run's folder\n")
    with holder(out / PREDICT_LOCK) as other:
        before = files(out)
        proc = predict(work, out)
        refused(proc, predict_busy(out, f"pid {other.pid} on {socket.gethostname()}"))
        assert files(out) == before


def test_predict_meeting_the_lock_only_at_its_writer_writes_no_mask(
    work, tmp_path, whole_predictions, monkeypatch
):
    """The other run takes the folder after this one's check before the build (two runs started at
    once): the writer takes the lock before its first file, and is refused there."""
    from samflow.callbacks import mask_writer

    monkeypatch.setattr(mask_writer, "check_output_dir_free", lambda output_dir: None, raising=False)
    out = tmp_path / "out"
    with holder(out / PREDICT_LOCK) as other:
        before = files(out)
        proc = predict(work, out)
        refused(proc, predict_busy(out, f"pid {other.pid} on {socket.gethostname()}"))
        assert files(out) == before


@pytest.mark.parametrize("resume", [False, True])
def test_predict_after_the_holder_is_killed_ends_as_an_uninterrupted_run(
    work, tmp_path, whole_predictions, monkeypatch, resume
):
    """A predict killed (SIGKILL) into the folder: a fresh folder holding its lock file, or (``resume``)
    its folder with a mask missing and its lock file. The next run holds the folder while it writes and
    ends it as an uninterrupted run's, without the lock file."""
    out = tmp_path / "out"
    if resume:
        shutil.copytree(whole_predictions, out)
        (out / "val_0002.png").unlink()
    with holder(out / PREDICT_LOCK) as other:
        killed(other)
    seen = []
    write = MaskWriter.write_on_batch_end

    def writing(self, trainer, *args, **kwargs):
        seen.append(held_by(self._folder / PREDICT_LOCK))
        return write(self, trainer, *args, **kwargs)

    monkeypatch.setattr(MaskWriter, "write_on_batch_end", writing)
    proc = predict(work, out, *(["--predictions.resume", "true"] if resume else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seen and set(seen) == {me()}
    assert files(out) == files(whole_predictions)


# ---- samflow predict --prompts, samflow predict-slide ----
def test_prompted_predict_into_an_out_another_process_writes_is_refused_before_the_model_is_loaded(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(images / "a.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [4, 6, 30, 24]}]}))
    out = tmp_path / "out"
    with holder(out / PREDICT_LOCK) as other:
        before = files(out)
        args = ["predict", "--model", str(tmp_path / "no_model"), "--images", str(images)]
        proc = samflow_here([*args, "--prompts", str(prompts), "--out", str(out)], tmp_path)
        refused(
            proc,
            (
                f"samflow: error: --out {str(out)!r} is being written by another samflow process (pid {other.pid} on "
                f"{socket.gethostname()}); wait until it ends, or choose another --out."
            ),
        )
        assert files(out) == before


def test_predict_slide_into_an_out_another_process_writes_is_refused_before_sam_is_built(tmp_path, no_sam):
    pytest.importorskip("tiffslide")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wsi"))
    try:
        from synthetic_slide import write_slide
    finally:
        sys.path.pop(0)
    slide, _ = write_slide(tmp_path)
    out = tmp_path / "out"
    with holder(out / PREDICT_LOCK) as other:
        before = files(out)
        args = [
            "predict-slide",
            str(slide),
            "--experiment",
            "wsi_sam_camelyon16",
            "--model.sam.variant",
            "tiny",
        ]
        proc = samflow_here([*args, "--model.sam.checkpoint", "null", "--out", str(out)], tmp_path)
        refused(
            proc,
            (
                f"samflow: error: predict-slide: --out {out} is being written by another samflow process (pid "
                f"{other.pid} on {socket.gethostname()}); wait until it ends, or choose another --out."
            ),
        )
        assert files(out) == before


# ---- samflow proposals ----
def test_proposals_into_a_store_another_process_writes_is_refused_then_written_once_it_is_killed(
    tmp_path, monkeypatch
):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
    try:
        from tiny_coco import make_tiny_coco
    finally:
        sys.path.pop(0)
    make_tiny_coco(tmp_path / "coco")
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "model:\n  sam:\n    variant: tiny\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {tmp_path / 'coco' / 'instances.json'}}}\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
    )
    out = tmp_path / "store"
    args = ["proposals", "--experiment", str(exp), "--out", str(out), "--shard-size", "2"]
    with holder(out / ".proposals.lock") as other:
        before = files(out)
        with monkeypatch.context() as patch:
            patch.setattr(samflow.module, "build_sam", no_sam_built)
            proc = samflow_here(args, tmp_path)
        refused(
            proc,
            (
                f"samflow: error: samflow proposals: the store {out} is being written by another samflow proposals "
                f"(pid {other.pid} on {socket.gethostname()}); wait until it ends, or choose another store with --out."
            ),
        )
        assert files(out) == before
        killed(other)
    assert main(args) == 0
    assert (out / "proposals.json").is_file() and not (out / ".proposals.lock").exists()
