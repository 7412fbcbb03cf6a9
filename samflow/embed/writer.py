"""Write an embedding store: the frozen encoder on every image of some datasets, resumable, split over ranks.

Rows are written in fixed chunks of ``batch_size`` rows of each rank's share (rank r takes rows
r, r + world, ...); a chunk's ``done`` flags are set only after its values are flushed, so an
interrupted run resumes at the first unfinished chunk and computes exactly the batches an
uninterrupted run would: the files come out identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samflow.batch import SamBatch
from samflow.data import read_image, to_input_frame
from samflow.embed.check import image_paths, store_key_of
from samflow.embed.store import (
    DONE,
    LOCK,
    MANIFEST,
    ContentHasher,
    EmbeddingStoreError,
    Manifest,
    StoreKey,
    array_name,
    read_manifest,
    write_manifest,
)
from samflow.outputs import partial_path
from samflow.sam import HookedSam

# called after each of this rank's chunks with the store's finished rows, every rank's: the ranks of
# one machine share the ``done`` flags' memory map, so rank 0's bar counts the whole store
Progress = Callable[[int], object]


def unique_images(paths: Sequence[str | Path], threads: int = 8) -> tuple[list[str], list[str]]:
    """(hashes, paths) of the distinct file contents among ``paths``, first occurrence first."""
    hasher = ContentHasher()
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(hasher, paths))
    seen: dict[str, str] = {}
    for digest, path in zip(digests, paths, strict=True):
        seen.setdefault(digest, str(path))
    return list(seen), list(seen.values())


def _input(path: str, key: StoreKey) -> tuple[Tensor, list[int]]:
    image = read_image(Path(path))
    framed, size = to_input_frame(image, key.img_size, key.resize_mode, key.image_resize)  # type: ignore[arg-type]
    return framed, list(size)


def prepare(
    root: Path,
    key: StoreKey,
    hashes: list[str],
    paths: list[str],
    shapes: tuple[tuple[int, ...], dict[int, tuple[int, ...]]],
    shard_size: int,
    overwrite: bool,
) -> Manifest:
    """Create the store's files (rank 0), or check that the existing ones are for the same key and images.

    ``overwrite`` removes the store's own files only (``store_files``), never anything else in ``root``;
    a ``root`` that is a file or holds an image of the data is refused either way.
    """
    wanted = Manifest(key, hashes, paths, shapes[0], shapes[1], shard_size)
    _refuse_an_input_folder(root, paths)
    if (root / MANIFEST).is_file():
        found = read_manifest(root)
        diffs = found.key.differences(key)
        if found.hashes != hashes:
            diffs.append(f"images: {found.rows} in the store, {len(hashes)} now, or their contents changed")
        if not diffs:
            return found
        if not overwrite:
            raise EmbeddingStoreError(
                f"{root} holds a store for other inputs ({'; '.join(diffs)}); pass --overwrite to replace "
                "it, or --out for another folder."
            )
    elif _held_files(root) and not overwrite:
        if store_files(root) and len(store_files(root)) == len(_held_files(root)):
            raise EmbeddingStoreError(
                f"{root} holds an unfinished store (no {MANIFEST}: stopped while it was being created); pass "
                "--overwrite to start it again."
            )
        raise EmbeddingStoreError(
            f"{root} exists and is not an embedding store; choose an empty --out folder."
        )
    for path in store_files(root):
        path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(wanted.shards):
        n = wanted.shard_rows(shard)
        parts: list[tuple[str | int, tuple[int, ...]]] = [("embedding", wanted.embedding_shape)]
        parts += list(wanted.feature_shapes.items())
        for part, shape in parts:
            array = np.lib.format.open_memmap(
                root / array_name(part, shard), mode="w+", dtype=np.float16, shape=(n, *shape)
            )
            del array
    np.save(root / DONE, np.zeros(wanted.rows, dtype=np.uint8))
    write_manifest(root, wanted)
    return wanted


def store_files(root: Path) -> list[Path]:
    """The files of a store (or of one stopped while being created) in ``root``: its manifest, ``done``
    flags and shard arrays (``embedding-NNNNN.npy``, ``blockNN-NNNNN.npy``)."""
    if not root.is_dir():
        return []
    # the manifest's temporary name, and ``manifest.json.tmp`` of stores stopped by an earlier samflow
    names = {MANIFEST, partial_path(root / MANIFEST).name, MANIFEST + ".tmp", DONE}
    return sorted(p for p in root.iterdir() if p.name in names or _SHARD.fullmatch(p.name))


def _held_files(root: Path) -> list[Path]:
    """What ``root`` holds but the lock file of the ``samflow embed`` writing it (``LOCK``)."""
    return [p for p in root.iterdir() if p.name != LOCK] if root.is_dir() else []


_SHARD = re.compile(r"(embedding|block\d{2,})-\d{5,}\.npy")


def _refuse_an_input_folder(root: Path, paths: Sequence[str]) -> None:
    """A store folder is not a file, and neither is nor holds an image it stores (``--overwrite`` would
    otherwise mix the store into the dataset)."""
    if root.exists() and not root.is_dir():
        raise EmbeddingStoreError(f"samflow embed: --out {root} is a file, not a folder; choose a folder.")
    target = root.resolve()
    for path in paths:
        if target in Path(path).resolve().parents:
            raise EmbeddingStoreError(
                f"samflow embed: --out {root} holds the image {path} of the data; choose a folder outside "
                "the data's folders."
            )


def output_shapes(model: HookedSam, key: StoreKey) -> tuple[tuple[int, ...], dict[int, tuple[int, ...]]]:
    """Per-image shapes of the embedding (C, h, w) and of each block's output (h, w, C_vit)."""
    enc = model.sam.image_encoder
    grid = key.img_size // enc.patch_embed.proj.kernel_size[0]
    dim = enc.patch_embed.proj.out_channels
    channels = model.sam.prompt_encoder.embed_dim
    return (channels, grid, grid), {i: (grid, grid, dim) for i in key.blocks}


@torch.no_grad()
def write_rows(
    root: Path,
    manifest: Manifest,
    model: HookedSam,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    progress: Progress | None = None,
    stop_after: int | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Encode this rank's unfinished rows and write them; returns the number of images encoded.

    ``stop_after`` (chunks) stops early, as an interruption would (for tests); so does ``stop()`` once it
    is true, asked before each chunk (SLURM's requeue signal: ``samflow.requeue_hold.requeue_requested``).
    """
    key = manifest.key
    device = next(model.sam.parameters()).device
    done = np.load(root / DONE, mmap_mode="r+")
    mine = list(range(rank, manifest.rows, world))
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    arrays: dict[tuple[str | int, int], np.memmap] = {}

    def array(part: str | int, shard: int) -> np.memmap:
        if (part, shard) not in arrays:
            arrays[(part, shard)] = np.load(root / array_name(part, shard), mmap_mode="r+")
        return arrays[(part, shard)]

    written = 0
    for count, chunk in enumerate(chunks):
        if (stop_after is not None and count >= stop_after) or stop():
            break
        if all(done[r] for r in chunk):
            continue
        inputs = [_input(manifest.paths[r], key) for r in chunk]
        batch = SamBatch(
            image=torch.stack([x for x, _ in inputs]).to(device),
            input_size=torch.tensor([s for _, s in inputs], device=device),
        )
        encoded = model.encode(model.context(batch))
        parts: dict[str | int, Tensor] = {"embedding": encoded.embeddings}
        parts.update({i: encoded.features[i] for i in key.blocks})
        touched = set()
        for part, values in parts.items():
            values16 = values.to(torch.float16).cpu().numpy()
            _refuse_non_finite(part, values, values16, [manifest.paths[r] for r in chunk])
            for j, r in enumerate(chunk):
                shard = r // manifest.shard_size
                array(part, shard)[r % manifest.shard_size] = values16[j]
                touched.add((part, shard))
        for name in touched:
            arrays[name].flush()
        for name in set(arrays) - touched:  # shards behind: each map holds a descriptor (store.MAX_MAPPED)
            del arrays[name]
        done[chunk] = 1
        done.flush()
        written += len(chunk)
        if progress is not None:
            progress(int(np.count_nonzero(done)))
    return written


def _refuse_non_finite(part: str | int, values: Tensor, values16: np.ndarray, paths: list[str]) -> None:
    """Refuse encoder outputs that float16 cannot hold (|x| > 65504 becomes inf) or that are not finite:
    stored, they would reach training as inf or NaN."""
    bad = ~np.isfinite(values16.reshape(len(paths), -1)).all(axis=1)
    if bad.any():
        name = part if isinstance(part, str) else f"block {part}"
        largest = float(values[torch.from_numpy(bad).to(values.device)].abs().max())
        raise EmbeddingStoreError(
            f"samflow embed: the encoder's {name} output of {paths[int(bad.argmax())]} is not finite in float16 "
            f"(largest |value| {largest:.4g}; float16 holds up to 65504), so the store cannot keep it. Train "
            "with the live encoder (no model.sam.embedding_store), or check the image and the SAM checkpoint."
        )


def completed_rows(root: str | Path) -> int:
    """The number of the store's rows whose values are written (its ``done`` flags)."""
    return int(np.load(Path(root).expanduser() / DONE).astype(bool).sum())


def write_store(
    root: str | Path,
    model: Any,
    datamodule: Any,
    *,
    batch_size: int = 4,
    shard_size: int = 256,
    rank: int = 0,
    world: int = 1,
    overwrite: bool = False,
    progress: Callable[[int], Progress | None] | None = None,
    barrier: Callable[[], None] = lambda: None,
    stop_after: int | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[Manifest, int]:
    """Write (or finish) the store of a ``SamflowModule`` and its data module at ``root``.

    The data module's datasets must be set up. ``progress(total)`` (``total``: the store's images)
    returns the ``Progress`` callback (``None``: no bar), called first with the rows finished before.
    Rank 0 creates the files; ``barrier`` separates that from the writing of every rank. ``stop()``, asked
    before each chunk, ends the writing early (``write_rows``). Returns (manifest, images encoded by this
    rank now).
    """
    if batch_size < 1 or shard_size < 1:
        raise EmbeddingStoreError(
            f"samflow embed: batch_size {batch_size} and shard_size {shard_size} must both be >= 1."
        )
    hooked = model.model
    hooked.check_encoder_cache("model.sam.embedding_store")
    key = store_key_of(model, datamodule)
    folder = Path(root).expanduser()
    hashes, paths = unique_images(image_paths(datamodule))
    if not hashes:
        raise EmbeddingStoreError("samflow embed: the experiment's datasets hold no images.")
    shapes = output_shapes(hooked, key)
    if rank == 0:
        manifest = prepare(folder, key, hashes, paths, shapes, shard_size, overwrite)
    barrier()
    if rank != 0:
        manifest = prepare(folder, key, hashes, paths, shapes, shard_size, False)
    advance = progress(manifest.rows) if progress is not None else None
    if advance is not None:
        advance(completed_rows(folder))
    store, cache = hooked.embedding_store, hooked.encoder_cache
    hooked.embedding_store = hooked.encoder_cache = None  # the live encoder, whatever the run reads
    try:
        written = write_rows(folder, manifest, hooked, batch_size, rank, world, advance, stop_after, stop)
    finally:
        hooked.embedding_store, hooked.encoder_cache = store, cache
    return manifest, written
