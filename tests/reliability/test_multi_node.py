"""Two nodes sharing a disk, simulated on one machine: two ``torchrun --nnodes 2 --nproc_per_node 1``
launches at once (``--node_rank 0`` and ``1``, gloo on the CPU, ``--trainer.num_nodes 2``).

Each node's process has ``LOCAL_RANK`` 0, which single-node runs never show: code that took local rank
0 for "the" main process would act twice, on the one shared disk. Checked here: ``samflow fit`` writes
one run folder (``version_0``, not also ``version_1``), one set of checkpoints, reports and
``run.json``, with the validation numbers of one process; ``samflow predict`` writes each image once,
the masks of one process, and one record; ``samflow embed`` refuses processes on several machines
(its ranks share the store through memory maps), both nodes in one line, before writing anything.

Found here: Lightning runs ``prepare_data`` on local rank 0 of every node, so both nodes generated the
quickstart data into one folder at once, and the second rename failed (``OSError: Directory not
empty``: a fit on 2 nodes of the quickstart, as the README starts it, crashed before training).
``make_quickstart_data`` now writes under a lock file of the root: the first process writes, the
others wait and find its marker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import LAUNCHED, kill_tree, run_at_once, run_samflow_commands
from test_ddp_exact_metrics import KEYS, data_args, last_metrics

NODES = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
    "--trainer.strategy", "ddp",
]  # fmt: skip
ONE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
RUN = Path("runs", "quickstart", "version_0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(args: list[str], cwd: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc_per_node 1 --node_rank R ARGS`` for R = 0 and 1, started together
    in ``cwd`` (one port on 127.0.0.1), one thread a process, W&B disabled: each node's result, its
    stdout and stderr together."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHED, "SAMFLOW_DEBUG", "SAMFLOW_VERBOSITY")}
    env.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    where = ["--master_addr", "127.0.0.1", "--master_port", port]
    commands = [[*launch, "--node_rank", str(node), *where, *args] for node in (0, 1)]
    return run_at_once(commands, cwd, [env, env], timeout)


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stdout[-5000:]}"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A fit of the quickstart on 2 nodes from a data root that does not exist yet (both nodes prepare
    it): 4 training images at batch 2 a node (one step), 3 validation images (2 + 1, eval batch 2)."""
    work = tmp_path_factory.mktemp("nodes")
    fit = [
        "-m", "samflow", "fit", "--experiment", "quickstart", *data_args(work / "data", 3), *NODES,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",
    ]  # fmt: skip
    (work / "fit").mkdir()
    assert_ok(two_nodes(fit, work / "fit"))
    return work


def test_fit_on_two_nodes_writes_one_run_with_the_numbers_of_one_process(fitted):
    run = fitted / "fit" / RUN
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # not version_1 too
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints, checkpoints  # last and best, once each
    for name in ("config.yaml", "metrics.csv", "run.json", "report.md", "val_before_after.json"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*-v1*")), list(run.rglob("*-v1*"))  # no file written twice under 2 names
    data = data_args(fitted / "data", 3)
    validate = [
        "validate",
        "--experiment",
        "quickstart",
        *data,
        *ONE,
        "--data.init_args.eval_batch_size",
        "2",
    ]
    plan = {"one": [*validate, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")], "start": validate}
    run_samflow_commands(fitted, plan)
    two, one = last_metrics(fitted, run), last_metrics(fitted, run / "validate")
    for key in KEYS:  # the epoch's validation on 2 nodes == one process's validate of its checkpoint
        assert two[key] == pytest.approx(one[key], abs=1e-6), (key, two[key], one[key])
    before = json.loads((run / "val_before_after.json").read_text())["before"]
    start = last_metrics(fitted / "start")  # the untrained model (the same seed builds the same one)
    for key in ("val/iou", "val/dice", "val/mae"):
        assert before[key] == pytest.approx(start[key], abs=1e-6), (key, before[key], start[key])


def test_predict_on_two_nodes_writes_each_image_once(fitted):
    """3 images on 2 nodes into the run's ``predict/`` folder: the masks a one-process predict writes
    (byte for byte), each once, and one record."""
    ckpt = str(fitted / "fit" / RUN / "checkpoints" / "last.ckpt")
    predict = [
        "predict", "--experiment", "quickstart", "--data.init_args.quickstart", "false",
        "--data.init_args.predict", str(fitted / "data" / "val"), "--ckpt_path", ckpt,
    ]  # fmt: skip
    assert_ok(two_nodes(["-m", "samflow", *predict, *NODES], fitted))
    run = fitted / "fit" / RUN
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("predict")) == ["predict"]
    # (this one writes the run's predict_1/, its masks in masks/)
    run_samflow_commands(fitted / "one", {"predict": [*predict, *ONE, "--predictions.output_dir", "masks"]})
    two, one = run / "predict" / "predictions", fitted / "one" / "predict" / "masks"
    names = sorted(p.name for p in two.iterdir())
    assert names == sorted(p.name for p in one.iterdir())
    assert names == ["samflow_predict.json", "val_0000.png", "val_0001.png", "val_0002.png"]
    for name in names[1:]:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_embed_on_two_nodes_is_refused_before_writing(fitted, tmp_path):
    embed = [
        "-m", "samflow", "embed", "--experiment", "quickstart", *data_args(fitted / "data", 3),
        "--data.init_args.augment", "null", "--out", "store",
    ]  # fmt: skip
    for node, result in enumerate(two_nodes(embed, tmp_path)):
        assert result.returncode != 0, f"node {node}:\n{result.stdout[-3000:]}"
        lines = [line for line in result.stdout.splitlines() if line.startswith("samflow: error: ")]
        assert len(lines) == 1 and "2 processes on 2 machines" in lines[0], result.stdout[-3000:]
    assert not (tmp_path / "store").exists()


def write_at_once(root: Path, both: Any, failures: Any) -> None:
    """Write the quickstart data under ``root`` once ``both`` processes are ready, each split slowly (as
    many images would take), so that neither finds the other's marker first; an error into ``failures``."""
    from samflow.data import DataError, quickstart

    write = quickstart._write_split

    def slow(*args: Any, **kwargs: Any) -> None:
        time.sleep(1.0)
        write(*args, **kwargs)

    quickstart._write_split = slow
    both.wait()
    try:
        quickstart.make_quickstart_data(root, n_train=2, n_val=1)
    except (OSError, DataError) as err:  # what the data's folders made it raise
        failures.put(f"{type(err).__name__}: {err}")


def test_quickstart_data_written_by_two_processes_at_once(tmp_path):
    """Both processes finish, and the data are those one process writes (before: the second rename
    failed with 'Directory not empty', or a process found the first's folders without their marker).
    The processes are forked from this one: no imports to wait for."""
    from samflow.data.quickstart import make_quickstart_data

    context = multiprocessing.get_context("fork")
    both, failures = context.Barrier(2), context.Queue()
    procs = [
        context.Process(target=write_at_once, args=(tmp_path / "data", both, failures)) for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=120)
        errors = []
        while not failures.empty():
            errors.append(failures.get())
        assert not errors and [proc.exitcode for proc in procs] == [0, 0], errors
    finally:  # a process still waiting (at the barrier): killed, not joined for good at pytest's exit
        for proc in procs:
            if proc.is_alive():
                kill_tree(proc.pid)
                proc.join()
    make_quickstart_data(tmp_path / "one", n_train=2, n_val=1)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    assert files(tmp_path / "data") == files(tmp_path / "one") != {}
    assert (tmp_path / "data" / "quickstart.json").read_text() == (
        tmp_path / "one" / "quickstart.json"
    ).read_text()
