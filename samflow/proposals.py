"""``samflow proposals --experiment NAME``: SAM's mask proposals for every point of a COCO training set.

SAPNet (Wei et al., CVPR 2024) selects, for each annotated point, one of six SAM masks; the reference
never released the script that makes them. This command runs the frozen SAM (no plugins) once over
the experiment's training set (``data: samflow.data.coco.CocoDataModule``) and stores, for every
instance and every point of it, **six proposals**:

=====  ==========================================================================================
k      proposal
=====  ==========================================================================================
0-2    SAM's three multimask outputs (mask tokens 1..3) for the point alone: SAM's whole / part /
       sub-part hypotheses, as the reference ("top3")
3      SAM's single-mask output (token 0) for the point alone: SAM's own answer to an unambiguous
       prompt, often between the multimask scales
4      the point plus the box of the multimask proposal SAM scores highest, re-prompted, token 0:
       a box-refined version of SAM's preferred hypothesis (boxes make SAM's masks tighter)
5      the point plus the box of the largest multimask proposal, re-prompted, token 0: the
       whole-object hypothesis, which SAPNet's box mining (BMS) grows part boxes toward
=====  ==========================================================================================

Variants 4-5 add no new hyper-parameter and use only SAM; they differ from 0-3 where a box changes
SAM's answer. The image encoder runs once per image: the re-prompting pass reads its embedding
from an ``EncoderCache``; with an embedding store it does not run at all (below). A proposal whose
source mask is empty is re-prompted with the point alone (its box is left out). Masks are SAM's logits upsampled to the original image (SAM's ``postprocess_masks``) and
thresholded at 0; stored as compressed RLE; boxes ``[x, y, w, h]`` of the mask (zeros when empty);
scores SAM's predicted IoU of the token used.

**Store.** ``OUT/manifest.json`` (the key, shard size, image count) and ``OUT/shards/NNNNNN.json``,
one per ``shard_size`` images, each written atomically when complete; at the end the shards are
merged into ``OUT/proposals.json``, COCO-style: ``images``, ``categories``, and ``annotations`` with
per point ``point`` [x, y], ``bbox`` (6 boxes), ``segmentation`` (6 RLEs), ``scores`` (6),
``true_bbox`` (the annotation's box), ``category_id``, ``ann_id``, ``point_index``.

**Lock.** Process 0 holds ``OUT/.proposals.lock`` (``LOCK``, an ``flock`` as a fit's ``.fit.lock``) from
before SAM is built until every rank has written: a second ``samflow proposals`` into the same store at
the same moment stops in one line naming the process (pid N on HOST); a killed run holds nothing.

**Resume.** A run that stops keeps its complete shards; the next run with the same key computes only
the missing ones. Shards are fixed image ranges computed in fixed batches, so the merged file is
byte-identical to that of an uninterrupted run (on the same device and software).

**Key.** The SHA-256 of SAM's whole state dict (the checkpoint's weights) and the data's fingerprint
(annotation file bytes and point settings) and the image size. A store with another key is refused
(delete it or pass ``--overwrite``).

**Embedding store.** ``--embedding-store DIR`` (default: the experiment's ``model.sam.embedding_store``;
``--model.sam.embedding_store null`` turns that off) reads the image embeddings from a store that
``samflow embed --experiment NAME --out DIR`` wrote for the same experiment, and never calls the image
encoder. The store must have been written with the same image encoder weights, ``img_size``,
``resize_mode`` and ``image_resize`` and hold every image of the split (found by file content);
otherwise it is refused with one line naming the store and the command to run. The store holds fp16
values, so the proposals equal those of a live run whose embeddings are rounded to fp16 (computed in
the same batches), not bit-for-bit those of the fp32 encoder: scores move slightly and a mask pixel
can flip where a logit is near 0 (``tests/proposals/test_proposals_store.py`` measures both). The key
records ``embeddings: fp16 store``, so the two kinds never mix in one proposal store.

**SLURM.** In a SLURM job the requeue signal (``#SBATCH --signal=SIGUSR1@90``) is held from the command's
start (``samflow.requeue_hold``): each rank stops before its next shard, the shards written are kept,
process 0 requeues the job (``scontrol requeue``) and the command exits 1 in one line; the same command
in the restarted job finishes the store. A signal once the store is complete is only noted.

**DDP.** Launched with ``torchrun --nproc_per_node N -m samflow proposals ...``, shard i goes to rank
i mod N; rank 0 merges after a barrier, and the merged file is the one a single process writes
(``tests/proposals/test_proposals_ddp.py``). Every rank checks the key before the first barrier, so a
stale store stops them all. A rank waits for the others however long their shards take (those of a
resumed run can differ by hours; ``samflow.commands.barrier``), and stops, in one line, as soon as
another rank has stopped.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from samflow.batch import SamBatch
from samflow.data.coco import CocoInstances
from samflow.data.coco_batch import collate_coco
from samflow.data.coco_masks import encode_mask
from samflow.data.coco_proposals import sam_checksum
from samflow.data.errors import DataError
from samflow.embed.check import dataset_images, input_frame
from samflow.embed.check import store_key as embed_store_key
from samflow.embed.store import EmbeddingStore, EmbeddingStoreError
from samflow.outputs import write_whole
from samflow.usage import CommandParser, PositiveInt

PROPOSALS_PER_POINT = 6
LOCK = ".proposals.lock"  # held in the store by the samflow proposals writing it (module docstring)
KINDS = ("multimask1", "multimask2", "multimask3", "single", "box_of_best", "box_of_largest")


class ProposalStoreError(DataError):
    """A proposal store that does not belong to this SAM and data, or is unreadable."""


#: ``key["embeddings"]`` of proposals computed from an embedding store (absent: the live encoder)
FROM_STORE = "fp16 store"


def store_key(sam: torch.nn.Module, dataset: CocoInstances, from_store: bool = False) -> dict[str, str]:
    key = {
        "sam": sam_checksum(sam),
        "data": dataset.fingerprint,
        "img_size": str(dataset.img_size),
        "resize_mode": dataset.resize_mode,
    }
    if from_store:
        key["embeddings"] = FROM_STORE
    return key


def open_embedding_store(path: str | Path, sam: torch.nn.Module, dataset: CocoInstances) -> EmbeddingStore:
    """The embedding store at ``path`` once it holds SAM's encoder outputs of every image of ``dataset``,
    framed as ``dataset`` frames them; else one ``EmbeddingStoreError`` naming the store and what to run."""
    store = EmbeddingStore(path, embed_store_key(sam, input_frame(dataset)))
    missing = store.missing(dataset_images(dataset))
    if missing:
        raise EmbeddingStoreError(
            f"samflow proposals: embedding store {store.root} lacks {len(missing)} image(s) of the data "
            f"(new, or changed since it was written), e.g. {missing[0]}; run `samflow embed --experiment "
            f"NAME --out {store.root}` for this experiment again."
        )
    return store


def _to_original(logits: Tensor, input_size: Tensor, original_size: Tensor, s: int) -> Tensor:
    """Low-resolution logits (M, h, w) of one image -> bool (M, H, W), as SAM's ``postprocess_masks``."""
    up = F.interpolate(logits[:, None].float(), (s, s), mode="bilinear", align_corners=False)
    h, w = input_size.tolist()
    up = up[..., :h, :w]
    big = F.interpolate(up, tuple(original_size.tolist()), mode="bilinear", align_corners=False)
    return big[:, 0] > 0


def _box_s(mask_s: Tensor) -> tuple[Tensor, Tensor]:
    """bool (N, S, S) -> xyxy boxes (N, 4) in the S frame and (N,) non-empty flags."""
    n = mask_s.shape[0]
    rows, cols = mask_s.any(2), mask_s.any(1)  # (N, S)
    idx = torch.arange(mask_s.shape[-1], device=mask_s.device)
    big = mask_s.shape[-1]
    x0 = torch.where(cols, idx, big).min(1).values
    x1 = torch.where(cols, idx, -1).max(1).values
    y0 = torch.where(rows, idx, big).min(1).values
    y1 = torch.where(rows, idx, -1).max(1).values
    valid = cols.any(1)
    box = torch.stack([x0, y0, x1, y1], 1).float().reshape(n, 4)
    return torch.where(valid[:, None], box, torch.zeros_like(box)), valid


@torch.no_grad()
def propose_batch(model: Any, batch: SamBatch) -> tuple[Tensor, Tensor]:
    """Six proposals per row: logits (N, 6, h, w) and scores (N, 6) (module docstring's order).

    ``model`` is a ``HookedSam`` without plugins; ``batch`` has one point per row.
    """
    first = model(batch.replace(box=None, has_box=None))
    logits, iou = first.masks["sam"], first.iou_pred  # (N, 4, h, w), (N, 4)
    s = batch.size
    multi = logits[:, 1:4]
    up = F.interpolate(multi.float(), (s, s), mode="bilinear", align_corners=False) > 0  # (N, 3, S, S)
    inside = torch.zeros_like(up)
    for i in range(batch.num_images):  # the unpadded part of each row's image
        h, w = batch.input_size[i].tolist()
        rows = batch.image_index == i
        inside[rows, :, :h, :w] = True
    up &= inside
    best = iou[:, 1:4].argmax(1)
    largest = up.flatten(2).sum(2).argmax(1)
    n = batch.num_rows
    ar = torch.arange(n, device=up.device)
    boxes, valid = _box_s(torch.cat([up[ar, best], up[ar, largest]]))
    second = batch.select_rows(torch.cat([ar, ar])).replace(box=boxes, has_box=valid)
    out2 = model(second)
    single = out2.masks["sam"][:, 0]  # (2N, h, w)
    props = torch.cat([multi, logits[:, :1], single[:n, None], single[n:, None]], 1)
    scores = torch.cat([iou[:, 1:4], iou[:, :1], out2.iou_pred[:n, :1], out2.iou_pred[n:, :1]], 1)
    return props, scores


def _xywh(mask: Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0, x1, y1 = xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _rows_of(batch: Any) -> Any:
    """The batch with one row per (instance, point): points (N*P, 1, 2)."""
    p = batch.points.shape[1]
    n = batch.num_rows
    rows = torch.arange(n).repeat_interleave(p)
    out = batch.select_rows(rows)
    pts = batch.points.reshape(n * p, 1, 2)
    return out.replace(points=pts, point_labels=torch.ones(n * p, 1, dtype=torch.long)), p


def shard_records(model: Any, dataset: CocoInstances, indices: range, batch_size: int, device: Any) -> list:
    """The annotation records of the images ``indices`` (in order), computed in batches of ``batch_size``."""
    records: list[dict[str, Any]] = []
    for start in range(indices.start, indices.stop, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, indices.stop))]
        batch = collate_coco(items)
        if batch.num_rows == 0:
            continue
        assert batch.boxes_original is not None and batch.ann_ids is not None
        assert batch.category_ids is not None and batch.points_original is not None
        rows, p = _rows_of(batch)
        logits, scores = propose_batch(model, rows.to(device))
        logits, scores = logits.cpu(), scores.cpu()
        for r in range(rows.num_rows):
            b = int(rows.image_index[r])
            masks = _to_original(logits[r], batch.input_size[b], batch.original_size[b], batch.size)
            inst, j = divmod(r, p)
            x0, y0, x1, y1 = batch.boxes_original[inst].tolist()
            records.append(
                {
                    "image_id": batch.image_ids[b],
                    "ann_id": int(batch.ann_ids[inst]),
                    "point_index": j,
                    "category_id": int(batch.category_ids[inst]),
                    "point": [round(v, 4) for v in batch.points_original[inst, j].tolist()],
                    "true_bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "bbox": [_xywh(m) for m in masks],
                    "segmentation": [encode_mask(m.numpy()) for m in masks],
                    "scores": [round(v, 6) for v in scores[r].tolist()],
                }
            )
    return records


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    write_whole(path, lambda tmp: tmp.write_text(text))


def _stale(manifest_path: Path, manifest: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``manifest_path`` holds another manifest (to replace: ``overwrite``); else a ProposalStoreError."""
    if not manifest_path.exists():
        return False
    try:
        old = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ProposalStoreError(f"{manifest_path}: unreadable ({err}); delete the folder.") from None
    if old != manifest and not overwrite:
        key = manifest["key"]
        diff = [
            k
            for k in ("sam", "data", "img_size", "resize_mode", "embeddings")
            if old.get("key", {}).get(k) != key.get(k)
        ]
        diff += [k for k in ("images", "shard_size") if old.get(k) != manifest[k]]
        raise ProposalStoreError(
            f"{manifest_path.parent} holds proposals made with other settings (differs in: "
            f"{', '.join(diff)}); a stale store is not reused. Delete it, choose another --out, or pass --overwrite."
        )
    return old != manifest


def shards_written(root: Path) -> int:
    """The store's finished shards, every rank's (the shard files, each written whole)."""
    return sum(1 for _ in (root / "shards").glob("[0-9]*.json"))


def write_proposals(
    out: str | Path,
    sam: torch.nn.Module,
    dataset: CocoInstances,
    *,
    batch_size: int = 1,
    shard_size: int = 16,
    device: Any = "cpu",
    rank: int = 0,
    world: int = 1,
    overwrite: bool = False,
    max_shards: int | None = None,
    progress: Callable[[int], Callable[[int], object]] | None = None,
    barrier: Callable[..., None] = lambda while_waiting=None: None,
    embedding_store: str | Path | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Path | None:
    """Write the store (module docstring); return ``OUT/proposals.json`` once complete, else None.

    ``max_shards`` stops after computing that many shards (what an interruption leaves). ``stop()``, asked
    before each shard, ends the writing early (SLURM's requeue signal:
    ``samflow.requeue_hold.requeue_requested``): every rank then returns None after the barrier.
    ``progress(total)`` (``total``: the store's shards) returns a callback given the number of finished
    shards, every rank's, after each of this rank's and, while this rank waits for the others' last
    shards, as ``barrier(while_waiting)`` calls it (``samflow.commands.barrier``).
    ``embedding_store``: read the image embeddings from this ``samflow embed`` store (module docstring).
    """
    from samflow.sam.cache import EncoderCache
    from samflow.sam.hooked import HookedSam

    if batch_size < 1 or shard_size < 1:
        raise DataError(
            f"samflow proposals: batch_size {batch_size} and shard_size {shard_size} must both be >= 1."
        )
    root = Path(out).expanduser()
    if root.exists() and not root.is_dir():
        raise ProposalStoreError(f"samflow proposals: --out {root} is a file, not a folder; choose a folder.")
    stored = open_embedding_store(embedding_store, sam, dataset) if embedding_store else None
    key = store_key(sam, dataset, from_store=stored is not None)
    manifest = {"key": key, "images": len(dataset), "shard_size": shard_size, "kinds": list(KINDS)}
    manifest_path = root / "manifest.json"
    stale = _stale(manifest_path, manifest, overwrite)  # every rank: none waits at the barrier for nothing
    if rank == 0:
        if stale:
            for f in sorted((root / "shards").glob("*.json")):
                f.unlink()
            (root / "proposals.json").unlink(missing_ok=True)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        _write_json(manifest_path, manifest)
    barrier()
    if stored is not None:  # both passes read the store, the encoder never runs
        model = HookedSam(sam, embedding_store=stored).to(device).eval()
    else:  # the second pass (re-prompted boxes) reads the first pass's image embeddings from this cache
        cache = EncoderCache(max(batch_size, 1), device=device, stages=("eval",))
        model = HookedSam(sam, encoder_cache=cache).to(device).eval()
    n_shards = -(-len(dataset) // shard_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (root / "shards" / f"{i:06d}.json").exists()]
    # called with the store's finished shards, every rank's (the shard files): rank 0's bar shows the whole
    finished = progress(n_shards) if progress else (lambda n: None)

    count = partial(shards_written, root)
    finished(count())
    for done, i in enumerate(todo):
        if max_shards is not None and done >= max_shards:
            return None
        if stop():
            break
        span = range(i * shard_size, min((i + 1) * shard_size, len(dataset)))
        _write_json(
            root / "shards" / f"{i:06d}.json", shard_records(model, dataset, span, batch_size, device)
        )
        finished(count())
    barrier(lambda: finished(count()))  # as long as the slowest rank's shards take, its shards counted
    finished(count())  # the other ranks' last shards too
    if count() < n_shards:  # a rank stopped early (every rank sees the same files after the barrier)
        return None
    final = root / "proposals.json"
    if rank == 0:
        annotations = []
        for i in range(n_shards):
            annotations.extend(json.loads((root / "shards" / f"{i:06d}.json").read_text()))
        for k, ann in enumerate(annotations, 1):
            ann["id"] = k
        cats = [{"id": c, "name": name} for c, name in sorted(dataset.categories.items())]
        images = [{k: img[k] for k in ("id", "file_name", "height", "width")} for img in dataset.images]
        info = {"samflow_key": key, "proposal_kinds": list(KINDS), "proposals_per_point": PROPOSALS_PER_POINT}
        _write_json(final, {"info": info, "images": images, "categories": cats, "annotations": annotations})
    barrier()
    return final


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow proposals",
        description="Store six SAM mask proposals per annotated point of the experiment's COCO training set "
        "(SAPNet's proposals; see samflow.proposals). Other arguments override the experiment.",
    )
    p.add_argument("--experiment", required=True, help="experiment name or YAML path (data: CocoDataModule)")
    p.add_argument("--out", required=True, help="store folder (manifest.json, shards/, proposals.json)")
    p.add_argument("--split", default="train", help="which split of the data module (default: train)")
    p.add_argument("--batch-size", type=PositiveInt, default=1, help="images per SAM pass")
    p.add_argument(
        "--shard-size", type=PositiveInt, default=16, help="images per shard (the unit of resuming)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda:LOCAL_RANK when a GPU is there)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with another SAM or data")
    p.add_argument(
        "--embedding-store",
        default=None,
        help="read the image embeddings from this `samflow embed` store instead of running the encoder "
        "(default: the experiment's model.sam.embedding_store)",
    )
    return p


def main(argv: list[str]) -> int:
    from samflow.callbacks.run_folder import hold_folder
    from samflow.commands import rank_and_world, ranks_from_slurm

    opts, overrides = _parser().parse_known_args(argv)
    ranks_from_slurm()  # srun's tasks, as torchrun's ranks
    rank, _ = rank_and_world()
    # process 0 holds the store's lock file from before SAM is built until every rank has written
    root = Path(opts.out).expanduser()
    lock = (
        hold_folder(root, LOCK, lambda holder: ProposalStoreError(_busy(root, holder))) if rank == 0 else None
    )
    try:
        return _propose(opts, overrides)
    finally:
        if lock is not None:
            lock.release()


def _busy(root: Path, holder: str) -> str:
    """The one line refusing a store that another live ``samflow proposals`` writes now."""
    return (
        f"samflow proposals: the store {root} is being written by another samflow proposals ({holder}); wait "
        "until it ends, or choose another store with --out."
    )


def _propose(opts: argparse.Namespace, overrides: list[str]) -> int:
    """``main`` once the store's lock is held (on process 0): build, propose, write."""
    from lightning.pytorch.utilities import rank_zero_info
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from samflow.commands import any_rank, build_experiment, rank_and_world, wait_for_ranks
    from samflow.data.coco import CocoDataModule
    from samflow.requeue_hold import requeue_requested, store_requeued, work_done

    rank, world = rank_and_world()
    model, datamodule = build_experiment(opts.experiment, overrides)
    if not isinstance(datamodule, CocoDataModule):
        raise DataError(
            f"samflow proposals: the experiment's data is {type(datamodule).__name__}; it needs "
            "data: {class_path: samflow.data.coco.CocoDataModule, ...}."
        )
    dataset = datamodule.dataset(opts.split, proposals=False)  # the store is what this makes
    device = torch.device(
        opts.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    )
    columns = [TextColumn("samflow proposals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=rank != 0) as bar:

        def progress(total: int) -> Callable[[int], object]:
            task = bar.add_task("shards", total=total)
            return lambda n: bar.update(task, completed=n)

        final = write_proposals(
            opts.out,
            model.model.sam,
            dataset,
            batch_size=opts.batch_size,
            shard_size=opts.shard_size,
            device=device,
            rank=rank,
            world=world,
            overwrite=opts.overwrite,
            progress=progress,
            # every wait as long as the other ranks' shards take, one line when one has stopped
            barrier=partial(
                wait_for_ranks,
                ProposalStoreError,
                "samflow proposals",
                "the shards written so far are kept: run the same command again to finish the store.",
            ),
            embedding_store=opts.embedding_store or model.sam_spec.embedding_store,
            stop=requeue_requested,  # SLURM's requeue signal: stop before the next shard
        )
    stopped = final is None and any_rank(requeue_requested())  # None on every rank alike
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if final is None:
        total = -(-len(dataset) // opts.shard_size)
        written = f"{shards_written(Path(opts.out).expanduser())} of {total} shards written"
        if stopped:  # process 0 requeues; the restarted job finishes the store
            raise ProposalStoreError(store_requeued("proposals", written, first=rank == 0))
        raise ProposalStoreError(
            f"samflow proposals: {written}; run the same command again to finish the store."
        )
    work_done("store")  # a requeue signal from now on is noted only
    rank_zero_info(f"samflow proposals: {len(dataset)} images -> {final}")
    return 0
