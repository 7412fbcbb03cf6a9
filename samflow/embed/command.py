"""``samflow embed --experiment NAME [--out DIR] [options] [experiment overrides ...]``.

Writes the frozen image encoder's outputs (the final embedding and the block features the experiment's
plugins declare) for every image of the experiment's datasets (train, val / val_sets, test /
test_sets, predict: whichever are set) to an embedding store (``samflow.embed.store``). The data is
samflow's ``SegmentationDataModule`` or ``CocoDataModule`` (one row per image file, framed as the data
frames it; a COCO experiment's ``data.proposals`` is not read, ``samflow proposals`` can read this store). Launched by
``torchrun --nproc_per_node N -m samflow embed ...`` (or ``srun --ntasks-per-node N samflow embed ...``:
``samflow.commands.ranks_from_slurm``) the images are split across the N ranks (DDP
process group, NCCL on GPUs, Gloo on the CPU); a rank waits for the others however long their shares
take (those of a resumed run can differ by hours; ``samflow.commands.barrier``) and stops, in one line,
as soon as another rank has stopped. Run again after an interruption, it finishes what is missing.

The first process holds the store's lock file (``.embed.lock``, an ``flock``: ``samflow.embed.store.LOCK``)
from before the model is built until every rank has written its share, so a second ``samflow embed`` of
the same store at the same moment stops in one line naming the process, before it builds or writes
anything; a killed one holds nothing, and the next run finishes its store.

In a SLURM job, SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) is held from the command's start
(``samflow.requeue_hold``): each rank stops before its next chunk of images, the chunks written are
kept, process 0 requeues the job (``scontrol requeue``) and the command exits 1 in one line; the same
command in the restarted job finishes the store. A signal once the store is complete is only noted.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from samflow.callbacks.run_folder import RunLock, hold_folder
from samflow.commands import (
    any_rank,
    build_experiment,
    init_process_group,
    rank_and_world,
    ranks_from_slurm,
    wait_for_ranks,
)
from samflow.data.coco import CocoDataModule
from samflow.embed.check import require_file_images
from samflow.embed.store import LOCK, EmbeddingStoreError
from samflow.embed.writer import completed_rows, write_store
from samflow.requeue_hold import requeue_requested, store_requeued, work_done
from samflow.usage import CommandParser, PositiveInt


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow embed",
        description="Store the frozen encoder's outputs of every image of an experiment's datasets (fp16, "
        "sharded .npy files, memory-mapped), for decoder-side training with model.sam.embedding_store. "
        "Other arguments override the experiment, as for `samflow fit`.",
    )
    p.add_argument("--experiment", required=True, help="experiment name or YAML path")
    p.add_argument(
        "--out",
        default=None,
        help="store folder (default: the experiment's model.sam.embedding_store)",
    )
    p.add_argument(
        "--batch-size",
        type=PositiveInt,
        default=None,
        help="images per encoder pass (default: the data's evaluation batch size: eval_batch_size, else batch_size)",
    )
    p.add_argument("--shard-size", type=PositiveInt, default=256, help="images per shard file")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK when a GPU is there)")
    p.add_argument("--overwrite", action="store_true", help="replace a store written for other inputs")
    return p


__all__ = ["init_process_group", "main"]


# every wait for the other ranks (``samflow.commands.wait_for_ranks``): as long as their shares take,
# one line when another rank has stopped
_barrier = partial(
    wait_for_ranks,
    EmbeddingStoreError,
    "samflow embed",
    "the images written so far are kept: run the same command again to finish the store.",
)


def eval_batch_size(datamodule: object) -> int:
    """``--batch-size``'s default: the data's evaluation batch size (``eval_batch_size``, else the
    ``batch_size`` that COCO data evaluates with too)."""
    return getattr(datamodule, "eval_batch_size", None) or getattr(datamodule, "batch_size", None) or 1


def _one_machine() -> None:
    """Refuse processes on several machines: the ranks write the store's files (rows side by side in a
    shard, the ``done`` flags) through memory maps, which only the processes of one machine share."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > local:
        raise EmbeddingStoreError(
            f"samflow embed: {world} processes on {world // max(local, 1)} machines; the ranks write the "
            "store through memory maps, which only one machine's processes share. Run it on one machine "
            "(torchrun --nnodes 1 --nproc_per_node N ...) and copy the store where the training runs."
        )


def store_busy(root: Path, holder: str) -> str:
    """The one line refusing a store that another live ``samflow embed`` writes now."""
    return (
        f"samflow embed: the store {root} is being written by another samflow embed ({holder}); wait until "
        "it ends, or choose another store with --out."
    )


def main(argv: list[str]) -> int:
    opts, overrides = _parser().parse_known_args(argv)
    ranks_from_slurm()  # srun's tasks, as torchrun's ranks: _one_machine counts them too
    _one_machine()
    rank, world = rank_and_world()
    held: list[RunLock] = []  # the store's lock, on rank 0: it waits for every rank's share before letting go

    def hold(out: str | None) -> None:
        if rank == 0 and out and not held:
            root = Path(out).expanduser()
            held.append(hold_folder(root, LOCK, lambda holder: EmbeddingStoreError(store_busy(root, holder))))

    try:
        return _embed(opts, overrides, rank, world, hold)
    finally:
        for lock in held:
            lock.release()


def _embed(
    opts: argparse.Namespace, overrides: list[str], rank: int, world: int, hold: Callable[[str | None], None]
) -> int:
    # the store is known from --out or the parsed experiment: held before SAM is built
    model, datamodule = build_experiment(
        opts.experiment, overrides, lambda config: hold(opts.out or config.get("model.sam.embedding_store"))
    )
    require_file_images(datamodule, "samflow embed")
    out = opts.out or model.sam_spec.embedding_store
    if not out:
        raise EmbeddingStoreError(
            "samflow embed: where to? Pass --out DIR or set model.sam.embedding_store in the experiment."
        )
    hold(out)  # held already, unless the experiment set the store as it was built
    device = torch.device(
        opts.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    )
    model.model.to(device).eval()
    if isinstance(datamodule, CocoDataModule):
        # the images alone: the proposal store (data.proposals) may not exist yet, and
        # `samflow proposals --embedding-store` reads this store to make it
        datamodule.proposals = None
    if rank == 0:
        datamodule.setup(None)  # rank 0 first: it may generate the quickstart data
    _barrier()
    if rank != 0:
        datamodule.setup(None)
    model.check_input_size(datamodule)  # the encoder takes the data's frames as they are
    columns = [TextColumn("samflow embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    # on rank 0, the whole store's finished images (every rank's, from the shared done flags)
    with Progress(*columns, disable=rank != 0) as bar:
        task = None

        def progress(total: int) -> Callable[[int], object]:
            nonlocal task
            task = made = bar.add_task("embed", total=total)
            return lambda n: bar.update(made, completed=n)

        manifest, written = write_store(
            out,
            model,
            datamodule,
            batch_size=opts.batch_size or eval_batch_size(datamodule),
            shard_size=opts.shard_size,
            rank=rank,
            world=world,
            overwrite=opts.overwrite,
            progress=progress,
            barrier=_barrier,
            stop=requeue_requested,  # SLURM's requeue signal: stop before the next chunk
        )
        root = Path(out).expanduser()

        def count() -> int:
            complete = completed_rows(root)
            if task is not None:
                bar.update(task, completed=complete)  # the other ranks' chunks, as they finish
            return complete

        _barrier(count if rank == 0 else None)  # as long as the slowest rank's share takes
        complete = count()
    signalled = any_rank(requeue_requested())  # on some rank: every rank has stopped by now
    if dist.is_initialized():
        dist.destroy_process_group()
    if complete < manifest.rows and signalled:  # process 0 requeues; the restarted job finishes the store
        raise EmbeddingStoreError(
            store_requeued("embed", f"{complete} of {manifest.rows} images written", first=rank == 0)
        )
    if complete < manifest.rows:
        raise EmbeddingStoreError(
            f"samflow embed: {root} is incomplete: {complete} of {manifest.rows} images written "
            f"({written} encoded now by rank {rank}); run the same command again to finish it."
        )
    work_done("store")  # a requeue signal from now on is noted only
    rank_zero_info(
        f"samflow embed: {complete} images in {root} ({written} encoded now by rank {rank}, {world} "
        f"rank(s)); train with --model.sam.embedding_store {root}"
    )
    return 0
