"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from segment_anything.modeling import Sam

from samflow.batch import SamBatch
from samflow.testing import random_batch  # noqa: F401  (re-exported for the tests)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    ),
]
"""``pytest.mark.parametrize("device", DEVICES)``: a case on the CPU, and on a CUDA device where there is
one (``benchmarks/gpu_check.sh`` section 7 runs those on a lent GPU)."""


def samflow_in_process(args: list[str]) -> int:
    """``samflow ARGS`` in this process, as the console script runs it: the exit status. ``main`` rewrites
    ``sys.argv`` (put back after), and each command's W&B run ends with it, as in a process of its own."""
    import wandb

    from samflow.cli import main

    argv = sys.argv
    try:
        return main(args)
    finally:
        sys.argv = argv
        wandb.finish()


def prompted_predict_args(prompts: Path, run: Path, images: Path, out: Path, *more: str) -> list[str]:
    """The arguments of ``samflow predict --prompts PROMPTS --model RUN --images IMAGES --out OUT``."""
    return [
        "predict",
        "--prompts",
        str(prompts),
        "--model",
        str(run),
        "--images",
        str(images),
        "--out",
        str(out),
        *more,
    ]


def sam_reference(sam: Sam, batch: SamBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's own modules, one row at a time -> (masks (N, 4, h, w), iou (N, 4)).

    Every row must carry each prompt field the batch has (no padding: SAM has no notion of it).
    """
    masks, ious = [], []
    with torch.no_grad():
        embeddings = sam.image_encoder(sam.preprocess(batch.image * 255))[batch.image_index]
        for b in range(batch.num_rows):
            points = None
            if batch.points is not None and batch.point_labels is not None:
                points = (batch.points[b : b + 1], batch.point_labels[b : b + 1])
            boxes = batch.box[b : b + 1] if batch.box is not None else None
            mask_in = batch.mask_prompt[b : b + 1] if batch.mask_prompt is not None else None
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
            m, i = sam.mask_decoder.predict_masks(
                embeddings[b : b + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense
            )
            masks.append(m)
            ious.append(i)
    return torch.cat(masks), torch.cat(ious)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised tables (position embeddings, rel-pos) random values so comparisons bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std * 10)
    return module


def new_storage_at_the_same_address(param: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``param`` new storage holding ``values`` at the address of its current storage, its version
    counter unmoved: what ``module.half().float()`` does when the allocator hands the freed float32
    block back (it does, now and then). The memory is shared through DLPack, so the address is the
    same every time."""
    alias = torch.from_dlpack(param.detach())  # another storage over the same memory
    assert alias.data_ptr() == param.data_ptr() and alias.untyped_storage() is not param.untyped_storage()
    version = param._version
    alias.copy_(values)  # counted on the alias only
    param.data = alias
    assert param._version == version and param.data_ptr() == alias.data_ptr()


def short_run(
    *, epochs: int = 1, train: int = 1, val: int = 1, sanity: int = 0, batch_size: int = 4
) -> list[str]:
    """Command-line flags of a short run: ``epochs`` epochs of ``train`` batches, ``val`` validation
    batches, ``sanity`` sanity-check batches, ``batch_size`` images a batch (max_epochs comes first)."""
    return [
        "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", str(train),
        "--trainer.limit_val_batches", str(val), "--trainer.num_sanity_val_steps", str(sanity),
        "--data.init_args.batch_size", str(batch_size),
    ]  # fmt: skip


def user_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment as the tests give it to a user's ``samflow`` command: W&B disabled,
    warnings off, no SAMFLOW_DEBUG tracebacks, the default verbosity whatever the test process holds
    (unless ``env`` sets one), ``env`` added."""
    full = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    full.pop("SAMFLOW_DEBUG", None)
    if "SAMFLOW_VERBOSITY" not in (env or {}):
        full.pop("SAMFLOW_VERBOSITY", None)
    return full


def run_samflow(
    args: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    pythonpath: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m samflow ARGS`` in ``cwd`` as a user runs it (``user_environment``), captured; after
    ``timeout`` s it is killed with every process under it (``run_reaped``: a ``ddp`` command's rank 1,
    which Lightning starts as its child, too) and ``subprocess.TimeoutExpired`` raised."""
    full = user_environment(env)
    if pythonpath is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full.get("PYTHONPATH", "")])
    return run_reaped([sys.executable, "-m", "samflow", *args], cwd, full, timeout)


@contextmanager
def _output_to(out: Any, err: Any) -> Iterator[None]:
    """File descriptors 1 and 2, ``sys.stdout`` / ``sys.stderr`` and the log handlers that write to
    either (Lightning's, bound at import) into the files ``out`` and ``err``, then put back."""
    streams = {id(s): out for s in (sys.stdout, sys.__stdout__)} | {
        id(s): err for s in (sys.stderr, sys.__stderr__)
    }
    handlers = [
        h
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for h in getattr(logger, "handlers", [])
        if type(h) is logging.StreamHandler and id(h.stream) in streams
    ]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    old = [h.setStream(streams[id(h.stream)]) for h in handlers]
    # as Lightning sets up its loggers in a process whose root logger has no handlers (pytest's has)
    fresh = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    fresh = [
        (logger, logger.propagate, logging.StreamHandler(err)) for logger in fresh if not logger.handlers
    ]
    for logger, _, handler in fresh:
        logger.addHandler(handler)
        logger.propagate = False
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for handler, stream in zip(handlers, old):
            handler.setStream(stream)
        for logger, propagate, handler in fresh:
            logger.removeHandler(handler)
            logger.propagate = propagate


def samflow_here(
    args: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    pythonpath: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``run_samflow`` without the process: ``samflow ARGS`` run by ``samflow_in_process`` in ``cwd``, with
    the environment ``run_samflow`` gives (``user_environment``; ``pythonpath`` first on ``sys.path``, its
    modules and the plugin registry forgotten after), its output taken at the file descriptors (Lightning's log lines too). An
    exception that escapes ``main`` is printed as the interpreter prints it, exit status 1. Not for
    ``ddp``: Lightning's launcher would start this test process again, so a command with ``ddp`` in its
    arguments goes to ``run_samflow``, in a process of its own."""
    import tempfile
    import traceback
    import warnings

    from samflow.plugins import registry

    if any("ddp" in a for a in args):
        return run_samflow(args, cwd, env=env, pythonpath=pythonpath, timeout=timeout)
    full = user_environment(env)
    if full["PYTHONWARNINGS"] not in ("", "ignore", "default", "always", "error"):
        raise ValueError(f"samflow_here takes PYTHONWARNINGS as one action, not {full['PYTHONWARNINGS']!r}")
    environ, where, path, modules = dict(os.environ), os.getcwd(), list(sys.path), set(sys.modules)
    os.environ.clear()
    os.environ.update(full)
    if pythonpath is not None:
        sys.path.insert(0, str(pythonpath))
        registry.discover.cache_clear()
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in (env or {}):  # read once at start by a process of its own
        torch.set_num_threads(int(full["OMP_NUM_THREADS"]))
    code = 1
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            os.chdir(cwd)
            with warnings.catch_warnings(), _output_to(out, err):
                warnings.simplefilter(full["PYTHONWARNINGS"] or "default")
                try:
                    code = samflow_in_process(list(args))
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                except Exception:  # noqa: BLE001 - as the interpreter: the traceback, exit status 1
                    traceback.print_exc()
        finally:
            os.chdir(where)
            torch.set_num_threads(threads)
            os.environ.clear()
            os.environ.update(environ)
            sys.path[:] = path
            if pythonpath is not None:
                for name in set(sys.modules) - modules:
                    if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(pythonpath)):
                        del sys.modules[name]
                registry.discover.cache_clear()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["samflow", *args], code, out.read(), err.read())


def run_epoch(loader, epoch: int, key, stop: int | None = None) -> list:
    """As Lightning runs an epoch of a training loader: ``sampler.set_epoch``, then the batches, each as
    ``key(batch)`` (``stop``: killed after that many)."""
    loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(key(batch))
        if stop is not None and len(out) == stop:
            break
    return out


@contextmanager
def rank_of_two(rank: int) -> Iterator[None]:
    """This process as rank ``rank`` of a 2-process group, as ``torch.distributed`` reports it (for code
    that reads the world when it runs, as ``ResumableSampler`` does when iterated)."""
    import pytest
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "is_available", lambda: True)
        patch.setattr(dist, "is_initialized", lambda: True)
        patch.setattr(dist, "get_world_size", lambda group=None: 2)
        patch.setattr(dist, "get_rank", lambda group=None: rank)
        yield


def resumed_epochs(make_loader, key, stop: int = 1) -> tuple[list, list, list]:
    """A training loader's epochs as Lightning runs them (``sampler.set_epoch``, then the batches):
    epochs 0 and 1 of one loader, and epoch 1 of a run killed after ``stop`` batches of it and resumed
    from the loader's state in a fresh loader (a new process). Each batch as ``key(batch)``;
    ``make_loader()`` builds a fresh data module's training loader."""
    loader = make_loader()
    first, second = run_epoch(loader, 0, key), run_epoch(loader, 1, key)
    killed = make_loader()
    run_epoch(killed, 0, key)
    part = run_epoch(killed, 1, key, stop)
    resumed = make_loader()
    resumed.load_state_dict(killed.state_dict())
    return first, second, part + run_epoch(resumed, 1, key)


class Interrupted(Exception):
    """Raised by ``Interrupt`` to stop a fit as a kill would."""


def interrupt_after(batches: int):
    """A Lightning callback that stops the fit after ``batches`` training batches, before the next one
    starts (Lightning runs checkpoint callbacks last, so a batch's end is too early: ``last.ckpt`` is
    written after it)."""
    import lightning as L

    class Interrupt(L.Callback):
        def __init__(self) -> None:
            self.seen = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.seen == batches:
                raise Interrupted
            self.seen += 1

    return Interrupt()


def fit_or_interrupt(
    folder: Path,
    module: Any,
    data: Any,
    *,
    stop: int | None = None,
    ckpt_path: Path | None = None,
    callbacks: tuple[Any, ...] = (),
    **trainer: Any,
) -> Any:
    """``trainer.fit`` as ``samflow fit`` runs it (seed 0, ``RandomState``, ``last.ckpt`` every step),
    stopped after ``stop`` training batches or resumed from ``ckpt_path``; the process's generators are moved on
    first, so that a state the resume fails to restore shows. ``trainer``: other ``Trainer`` arguments
    (default 2 epochs, one validation batch, no sanity check)."""
    import lightning as L
    import pytest

    from samflow.callbacks.resume import LastCheckpoint, RandomState

    L.seed_everything(0, verbose=False)
    if ckpt_path is not None:
        torch.rand(5)
    every: list[L.Callback] = [
        *callbacks,
        RandomState(),
        LastCheckpoint(every_n_train_steps=1, dirpath=str(folder)),
    ]
    if stop is not None:
        every.append(interrupt_after(stop))
    settings = {
        "max_epochs": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0, **trainer,
    }  # fmt: skip
    run = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder, deterministic=True, callbacks=every, **settings,
    )  # fmt: skip
    if stop is None:
        run.fit(module, datamodule=data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Interrupted):
            run.fit(module, datamodule=data)
        saved = torch.load(folder / LastCheckpoint.FILE, map_location="cpu", weights_only=False)
        assert saved["global_step"] == run.global_step > 0  # the last optimizer step before the stop
    return run


def tiny_linear_module():
    """A Lightning module of one Linear(2, 1) trained by SGD on 5 random rows, batch 1: 5 steps an epoch."""
    import lightning as L

    class TinyLinear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(5, 2), batch_size=1)

    return TinyLinear()


def crashing_png_saves(monkeypatch) -> Any:
    """``arm(n)``: the n-th PNG save after it (from 1) writes half of its bytes, then raises, as a full
    disk or a kill mid-write would leave it; the other saves are real (0: none crashes)."""
    import io

    from PIL import Image

    real_save = Image.Image.save

    def arm(n: int) -> None:
        calls: list[Any] = []

        def save(self, fp, format=None, **params):
            calls.append(fp)
            if len(calls) != n:
                return real_save(self, fp, format=format, **params)
            buffer = io.BytesIO()
            real_save(self, buffer, format="PNG")
            Path(fp).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(28, "No space left on device (simulated)")

        monkeypatch.setattr(Image.Image, "save", save)

    return arm


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TORCHRUN_ENV = {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL every process under the process ``pid`` (found with psutil first, whatever their session:
    torchrun starts its workers in sessions of their own, out of reach of a ``killpg`` of torchrun), then
    ``pid`` itself; wait until those under it are gone (the caller waits for ``pid``, its child). Each
    one found is stopped (SIGSTOP) before the next look, so that none starts another unseen."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    tree: list[psutil.Process] = []
    found = [root]
    while found:
        for process in found:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
        tree += found
        try:
            found = [p for p in root.children(recursive=True) if p not in tree]
        except psutil.NoSuchProcess:  # the command ended meanwhile: those it had started are in the tree
            found = []
    for process in reversed(tree):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(tree[1:], timeout=30)


def run_reaped(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    *,
    stderr: int = subprocess.PIPE,
    start_new_session: bool = False,
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``, but
    a command still running at ``timeout`` (or interrupted) is killed with every process under it
    (``kill_tree``): ``subprocess.run`` kills the command alone, and a hung torchrun test left its
    workers waiting idle until their own timeout. On the timeout, ``subprocess.TimeoutExpired`` carries
    the output so far. ``stderr=subprocess.STDOUT``: both in ``stdout`` (``stderr`` None);
    ``start_new_session`` as ``Popen``'s."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=start_new_session,
    )
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a pipe kept open by a process outside the tree
                out = err = None
            raise subprocess.TimeoutExpired(command, timeout, out, err) from None
        except BaseException:  # Ctrl-C, pytest-timeout
            kill_tree(proc.pid)
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_torchrun(
    args: list[str], cwd: Path, *, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` in ``cwd`` (a module or a script), one thread per
    process, with the variables ``env`` added, captured; after ``timeout`` s torchrun and its workers are
    killed (``run_reaped``) and ``subprocess.TimeoutExpired`` raised."""
    return run_reaped([*TORCHRUN, *args], cwd, {**os.environ, **TORCHRUN_ENV, **env}, timeout)


def run_at_once(
    commands: list[list[str]], cwd: Path, envs: list[dict[str, str]], timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Each of ``commands`` started together in ``cwd`` with its environment of ``envs`` (the whole
    environment, not additions), as the processes of one job on several nodes or tasks: each one's
    result, its stdout and stderr together. Those still running after ``timeout`` s (or when interrupted)
    are killed with every process under them (``kill_tree``: a ``ddp`` task's rank 1, which Lightning
    starts as its child, too) and ``subprocess.TimeoutExpired`` raised."""
    procs = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command, env in zip(commands, envs, strict=True)
    ]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outputs)]


# the start of a torchrun script: every process group's timeout 1 s once made (torchrun's rendezvous
# keeps its own), as if the ranks' work took longer than gloo's 30 min; a wait for the other ranks that
# keeps a group's timeout then fails when they are 1 s apart
SHORT_GROUP_TIMEOUTS = """
import datetime
import torch.distributed as dist
made, made_group = dist.init_process_group, dist.new_group
def init_process_group(*args, **kwargs):
    made(*args, **kwargs)
    dist.set_timeout(datetime.timedelta(seconds=1))
def new_group(*args, **kwargs):
    group = made_group(*args, **kwargs)
    dist.set_timeout(datetime.timedelta(seconds=1), group)
    return group
dist.init_process_group, dist.new_group = init_process_group, new_group
"""


# the script of ``run_samflow_commands``: each command of a plan in its own directory, in one process
COMMAND_START = "### samflow command: "
COMMANDS_SCRIPT = """
import json, os, sys
from samflow.cli import main

if "LOCAL_RANK" in os.environ:  # rank 1 of a ddp command, started by Lightning with its arguments
    raise SystemExit(main(sys.argv[1:]))

if __name__ == "__main__":
    codes = {}
    for name, args in json.loads(open(sys.argv[1]).read()).items():
        for stream in (sys.stdout, sys.stderr):  # where the command's output starts
            print("\\n" + START + name, file=stream, flush=True)
        os.makedirs(name)
        os.chdir(name)  # the command's run folder under its own directory (rank 1 starts here too)
        codes[name] = main(args)
        os.chdir("..")
        if codes[name]:
            break
    print("CODES " + json.dumps(codes))
""".replace("START", repr(COMMAND_START))
# set by a cluster or an outer launcher: not in the commands' process (a command would take itself for
# a launched rank)
LAUNCHED = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "OMP_NUM_THREADS")


def run_samflow_commands(work: Path, plan: dict[str, list[str]], *, timeout: float = 600) -> dict[str, str]:
    """The ``samflow`` commands of ``plan`` (name -> arguments), in order, each as ``samflow ARGS`` run in
    ``work/<name>`` (made here: the run folder goes under it), all in one Python process: the imports
    are paid once, not once a command (``main`` puts the process back as it found it after each run,
    ``ddp`` included: ``tests/reliability/test_process_state_ddp.py``). Lightning's ``ddp`` launcher
    starts rank 1 of a command by running the script again with that command's arguments. W&B disabled,
    warnings off, default verbosity, no ``SAMFLOW_DEBUG``; asserts that every command exits 0 (it
    stops at the first that does not). Returns each command's output (its stdout, then its stderr: its
    ranks' lines). After ``timeout`` s the process is killed with every process under it (``run_reaped``)
    and ``subprocess.TimeoutExpired`` raised."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "samflow_commands.py").write_text(COMMANDS_SCRIPT)
    (work / "samflow_commands.json").write_text(json.dumps(plan))
    env = {k: v for k, v in user_environment().items() if k not in LAUNCHED}
    script = [sys.executable, str(work / "samflow_commands.py"), str(work / "samflow_commands.json")]
    proc = run_reaped(script, work, env, timeout)  # on a timeout, a ddp command's rank 1 killed too
    codes = [line for line in proc.stdout.splitlines() if line.startswith("CODES ")]
    output = proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.returncode == 0 and codes, output
    assert json.loads(codes[-1][6:]) == dict.fromkeys(plan, 0), output
    outputs = dict.fromkeys(plan, "")
    for stream in (proc.stdout, proc.stderr):
        for part in stream.split(f"\n{COMMAND_START}")[1:]:
            name, _, text = part.partition("\n")
            outputs[name] += text
    return outputs


# another process holding the lock file argv[1] as samflow's locks do (an flock, "pid N on HOST" written
# in it); it prints "held" once it holds it
HOLD = """
import fcntl, os, socket, sys, time
from pathlib import Path
path = Path(sys.argv[1])
path.parent.mkdir(parents=True, exist_ok=True)
file = open(path, "a+")
fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
file.truncate(0)
file.write(f"pid {os.getpid()} on {socket.gethostname()}\\n")
file.flush()
print("held", flush=True)
time.sleep(600)
"""
