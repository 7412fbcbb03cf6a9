"""samflow's own multi-process commands (``embed``, ``proposals``, ``predict-slide``) launched by SLURM's
``srun --ntasks-per-node 2 samflow ...`` (no torchrun), simulated on one machine: two real processes
with the variables ``srun`` gives its tasks (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NODELIST`` 127.0.0.1, a port from ``SLURM_JOB_ID`` as Lightning's ``SLURMEnvironment`` takes it),
gloo on the CPU.

Found here: the commands read torchrun's variables only, so each task took itself for the only
process and both wrote the whole store / proposals / slide files into one folder at once (two progress
bars, two summary lines, a store written twice over). They now join as torchrun's ranks
(``samflow.commands.ranks_from_slurm``) and write what one process writes, byte for byte. Tasks
without ``--ntasks-per-node`` are refused as Lightning refuses them (one line, nothing written); a
one-task job (an ``sbatch`` script's), an interactive job and torchrun under ``srun`` are left as they
were.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAUNCHED, run_at_once

from samflow.commands import ranks_from_slurm
from samflow.data.quickstart import make_quickstart_data
from samflow.usage import UsageError

SLURM = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
         "SLURM_NNODES", "SLURM_NODELIST", "SLURM_JOB_ID", "SLURM_JOB_NAME")  # fmt: skip
TORCHRUN = (*LAUNCHED, "LOCAL_WORLD_SIZE")


def job_id_of_a_free_port() -> str:
    """A SLURM job id whose port (``SLURMEnvironment``: its last 4 digits + 15000) is free here."""
    for _ in range(200):
        port = random.randint(15000, 24999)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return f"77{port - 15000:04d}"
    raise RuntimeError("no free port in 15000-24999")


def slurm_tasks(
    args: list[str], cwd: Path, tasks: int = 2, **extra: str
) -> list[subprocess.CompletedProcess]:
    """``samflow ARGS`` as the ``tasks`` tasks of ``srun --ntasks-per-node TASKS`` on one node (no
    torchrun variables), started together in ``cwd``, one thread each: each task's result, stdout and
    stderr together."""
    base = {k: v for k, v in os.environ.items() if k not in (*TORCHRUN, *SLURM, "SAMFLOW_DEBUG")}
    base.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    base.update(SLURM_NTASKS=str(tasks), SLURM_NTASKS_PER_NODE=str(tasks), SLURM_NNODES="1", SLURM_NODEID="0")
    base.update(SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID=job_id_of_a_free_port(), SLURM_JOB_NAME="samflow")
    base.update(extra)
    base = {k: v for k, v in base.items() if v != ""}  # "": the variable unset
    envs = [{**base, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)} for task in range(tasks)]
    return run_at_once([[sys.executable, "-m", "samflow", *args]] * tasks, cwd, envs, timeout=300)


def ok(results: list[subprocess.CompletedProcess]) -> str:
    for task, result in enumerate(results):
        assert result.returncode == 0, f"task {task}:\n{result.stdout[-4000:]}"
    return "".join(result.stdout for result in results)


def same_files(ours: Path, reference: Path) -> list[Path]:
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == files
    for name in files:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    return files


def lines(stdout: str, start: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(start)]


# ---- two srun tasks write what one task writes ----
def test_embed_on_two_srun_tasks_writes_the_store_of_one_task(tmp_path):
    root = make_quickstart_data(tmp_path / "data", n_train=5, n_val=3, seed=3)
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n"
        f"  init_args: {{train: {root / 'train'}, val: {root / 'val'}, img_size: 128}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    # 8 images at batch 2: every batch of both runs holds 2 images (equal arithmetic, see test_embed_ddp)
    embed = ["embed", "--experiment", str(experiment), "--batch-size", "2", "--shard-size", "3", "--out"]
    one = ok(slurm_tasks([*embed, "one"], tmp_path, tasks=1))  # an sbatch script's one task
    two = ok(slurm_tasks([*embed, "two"], tmp_path))
    assert len(lines(one, "samflow embed ")) == 1 and len(lines(two, "samflow embed ")) == 1, two[-3000:]
    assert lines(two, "samflow embed ")[0].split()[-2] == "8/8"  # task 0's bar counts task 1's images
    assert "embedding-00002.npy" in {p.name for p in same_files(tmp_path / "two", tmp_path / "one")}


def test_proposals_on_two_srun_tasks_write_the_store_of_one_task(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "coco"))
    try:
        from tiny_coco import make_tiny_coco
    finally:
        sys.path.pop(0)
    make_tiny_coco(tmp_path / "coco")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        "model:\n  sam: {variant: tiny}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, train: {{annotations: {tmp_path / 'coco' / 'instances.json'}}}}}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    proposals = ["proposals", "--experiment", str(experiment), "--shard-size", "1", "--out"]
    one = ok(slurm_tasks([*proposals, "one"], tmp_path, tasks=1))
    two = ok(slurm_tasks([*proposals, "two"], tmp_path))
    assert len(lines(one, "samflow proposals ")) == 1 and len(lines(two, "samflow proposals ")) == 1, two
    assert lines(two, "samflow proposals ")[0].split()[-2] == "3/3"  # 3 shards, task 1 wrote one
    assert Path("shards/000002.json") in same_files(tmp_path / "two", tmp_path / "one")


def slide_args(tmp_path: Path) -> list[str]:
    pytest.importorskip("tiffslide")
    sys.path.insert(0, str(Path(__file__).parents[1] / "wsi"))
    try:
        from synthetic_slide import write_geojson, write_slide
    finally:
        sys.path.pop(0)
    slide, _ = write_slide(tmp_path)
    return [
        "predict-slide", str(slide), "--experiment", "wsi_sam_camelyon16", "--model.sam.variant", "tiny",
        "--model.sam.checkpoint", "null", "--tile", "128", "--overlap", "32", "--batch-size", "2",
        "--annotations", str(write_geojson(tmp_path)),
    ]  # fmt: skip


def test_predict_slide_on_two_srun_tasks_writes_the_files_of_one_task(tmp_path):
    args = slide_args(tmp_path)
    one = ok(slurm_tasks([*args, "--out", "one"], tmp_path, tasks=1))
    two = ok(slurm_tasks([*args, "--out", "two"], tmp_path))
    summary = [line for line in two.splitlines() if "tiles ->" in line]
    assert len(summary) == 1 and "(2 processes)" in summary[0], two[-3000:]
    assert "(2 processes)" not in one
    same_files(tmp_path / "two", tmp_path / "one")


# ---- refused, or left as it was ----
def test_tasks_without_ntasks_per_node_are_refused_in_one_line_before_writing(tmp_path):
    """``srun --ntasks 2`` without ``--ntasks-per-node`` (Lightning's rule): each command, one line, exit 1,
    no output folder (each task refuses before joining: one task shows it)."""
    commands = {
        "embed": ["embed", "--experiment", "quickstart", "--out", "out"],
        "proposals": ["proposals", "--experiment", "quickstart", "--out", "out"],
        "predict-slide": [*slide_args(tmp_path), "--out", "out"],
    }
    for name, args in commands.items():
        (result,) = slurm_tasks(args, tmp_path, tasks=1, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="")
        assert result.returncode == 1, (name, result.stdout[-3000:])
        errors = lines(result.stdout, "samflow: error: ")
        assert len(errors) == 1 and "--ntasks-per-node" in errors[0], (name, result.stdout[-3000:])
        assert "Traceback" not in result.stdout, name
        assert not (tmp_path / "out").exists(), name


@pytest.fixture
def slurm_env(monkeypatch):
    """SLURM's variables of task 1 of 4 (2 a node), none of torchrun's; all put back after the test."""
    for name in (*TORCHRUN, *SLURM):  # set first: monkeypatch then removes what the test sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    values = {
        "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234567",
        "SLURM_JOB_NAME": "train.sh",
    }  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_srun_tasks_become_torchrun_ranks(slurm_env):
    ranks_from_slurm()
    got = {name: os.environ.get(name) for name in TORCHRUN if name in os.environ}
    assert got == {
        "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(4567 + 15000),
    }  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},  # an sbatch script's one task
        {"SLURM_JOB_NAME": "bash"},  # an interactive job: the command is one process
        {"SLURM_JOB_NAME": "interactive"},
        {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},  # srun --ntasks-per-node 1 torchrun ...
    ],
)
def test_one_task_interactive_jobs_and_torchrun_are_left_alone(slurm_env, change):
    for name, value in change.items():
        slurm_env.setenv(name, value)
    before = dict(os.environ)
    ranks_from_slurm()
    assert dict(os.environ) == before


def test_no_ntasks_per_node_is_a_usage_error(slurm_env):
    slurm_env.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(UsageError, match="--ntasks-per-node"):
        ranks_from_slurm()
    assert "WORLD_SIZE" not in os.environ
