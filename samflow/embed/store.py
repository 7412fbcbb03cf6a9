"""A persistent store of the frozen image encoder's outputs, on disk, memory-mapped.

Layout of a store folder (format 1)::

    manifest.json            the key (what the outputs depend on), the row of every image, the shapes
    done.npy                 uint8 (N,): 1 once row n is written (resuming skips those rows)
    embedding-00000.npy      float16 (n, C, h, w): the final image embedding of rows 0 .. n-1
    block02-00000.npy        float16 (n, h, w, C_vit): the output of encoder block 2 (declared by plugins)
    embedding-00001.npy ...  the next shard (``shard_size`` rows each)
    .embed.lock              held by the ``samflow embed`` writing the store, gone when it ends (``LOCK``)

Every array is a plain ``.npy`` file (numpy's own format, readable without samflow), opened with
``numpy.load(mmap_mode="r")``: reading a row touches only its pages.

**Key.** A row is the encoder's output for one image file, found by the SHA-256 of the file's bytes
(identical files share a row); for a file with an EXIF orientation, which is read upright, the
orientation is hashed too, so a store written before images were read upright has no row for it and
``samflow embed`` adds one. The store as a whole is valid for one ``StoreKey``: the SHA-256 of the
image encoder's weights and SAM's pixel statistics (so another checkpoint, another seed or another
``img_size`` never matches), the input size S, the resize rule (``resize_mode``, ``image_resize``)
and the blocks whose outputs it holds. A store is read only when its key equals the run's and every
image of the run's datasets has a finished row; anything else is refused with one line
(``EmbeddingStoreError``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor

from samflow.data.reading import file_orientation
from samflow.outputs import write_whole
from samflow.sam.cache import EncoderCacheError

FORMAT = 1
MANIFEST = "manifest.json"
DONE = "done.npy"
#: the lock file ``samflow embed`` holds in the store while it writes (a second one at the same moment is
#: refused; a killed one's holds nothing); never one of the store's files (``samflow.embed.writer.prepare``)
LOCK = ".embed.lock"
MAX_MAPPED = 64  # shard files a reader keeps mapped; each map holds a file descriptor (mmap dups it)


class EmbeddingStoreError(EncoderCacheError):
    """An embedding store that cannot be used (or written) for this run, and why."""


@dataclass(frozen=True)
class StoreKey:
    """What the stored outputs depend on; two runs may share a store only when their keys are equal."""

    encoder_sha256: str
    img_size: int
    resize_mode: str
    image_resize: str
    blocks: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "blocks": list(self.blocks)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoreKey:
        return cls(**{**data, "blocks": tuple(data["blocks"])})

    def differences(self, other: StoreKey, blocks_subset: bool = False) -> list[str]:
        """``name: stored -> wanted`` for every field that differs (``blocks`` may be a superset)."""
        out = []
        for name in ("encoder_sha256", "img_size", "resize_mode", "image_resize"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                label = "image encoder weights (checkpoint)" if name == "encoder_sha256" else name
                shown = (str(mine)[:12], str(theirs)[:12]) if name == "encoder_sha256" else (mine, theirs)
                out.append(f"{label}: {shown[0]} in the store, {shown[1]} in this run")
        missing = set(other.blocks) - set(self.blocks)
        if missing if blocks_subset else set(self.blocks) != set(other.blocks):
            out.append(f"encoder blocks: {list(self.blocks)} in the store, {list(other.blocks)} wanted")
        return out


def encoder_checksum(sam: Sam) -> str:
    """SHA-256 of the image encoder's weights and buffers and SAM's pixel mean and std (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    tensors = {f"image_encoder.{n}": t for n, t in sam.image_encoder.state_dict().items()}
    tensors.update(pixel_mean=sam.pixel_mean, pixel_std=sam.pixel_std)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class ContentHasher:
    """SHA-256 of image files, remembered per path while its size and modification time stay the same."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, str]] = {}

    def __call__(self, path: str | Path) -> str:
        key = os.fspath(path)
        stat = os.stat(key)
        known = self._known.get(key)
        if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        digest = hashlib.sha256()
        with open(key, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        turn = file_orientation(key)
        if turn != 1:  # read upright (samflow.data.reading): not the row of these bytes read as stored
            digest.update(f"|upright, EXIF orientation {turn}".encode())
        value = digest.hexdigest()
        self._known[key] = (stat.st_size, stat.st_mtime_ns, value)
        return value


@dataclass
class Manifest:
    key: StoreKey
    hashes: list[str]  # row -> image content hash
    paths: list[str]  # row -> the first file seen with that content (for messages)
    embedding_shape: tuple[int, ...]  # (C, h, w)
    feature_shapes: dict[int, tuple[int, ...]]  # block -> (h, w, C_vit)
    shard_size: int
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.hashes)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_size)

    def shard_rows(self, shard: int) -> int:
        return min(self.shard_size, self.rows - shard * self.shard_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "key": self.key.to_json(),
            "shard_size": self.shard_size,
            "embedding_shape": list(self.embedding_shape),
            "feature_shapes": {str(i): list(s) for i, s in self.feature_shapes.items()},
            "hashes": self.hashes,
            "paths": self.paths,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            key=StoreKey.from_json(data["key"]),
            hashes=list(data["hashes"]),
            paths=list(data["paths"]),
            embedding_shape=tuple(data["embedding_shape"]),
            feature_shapes={int(i): tuple(s) for i, s in data["feature_shapes"].items()},
            shard_size=int(data["shard_size"]),
            format=int(data["format"]),
            extra=dict(data.get("extra", {})),
        )


def array_name(part: str | int, shard: int) -> str:
    """File of ``part`` (``"embedding"`` or a block index) in ``shard``."""
    stem = part if isinstance(part, str) else f"block{part:02d}"
    return f"{stem}-{shard:05d}.npy"


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise EmbeddingStoreError(
            f"{root} is not an embedding store (no {MANIFEST}); write it with `samflow embed --experiment ...`."
        )
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise EmbeddingStoreError(
            f"{path}: unreadable store manifest ({err}); write the store again."
        ) from err
    if manifest.format != FORMAT:
        raise EmbeddingStoreError(f"{path}: store format {manifest.format}, this samflow reads {FORMAT}.")
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    """``manifest.json`` in ``root``, whole or not at all (``write_whole``)."""
    text = json.dumps(manifest.to_json())
    write_whole(root / MANIFEST, lambda tmp: tmp.write_text(text))


class EmbeddingStore:
    """Read a finished store: encoder outputs of image files, by content, for one ``StoreKey``.

    Args:
        root: the store folder (``samflow embed`` writes it).
        key: the run's key; a store written for another key is refused, naming what differs. The
            store may hold more blocks than ``key.blocks`` asks for.
    """

    def __init__(self, root: str | Path, key: StoreKey) -> None:
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        diffs = self.manifest.key.differences(key, blocks_subset=True)
        if diffs:
            raise EmbeddingStoreError(
                f"Embedding store {self.root} does not match this run ({'; '.join(diffs)}); "
                "write a store for it with `samflow embed`."
            )
        done = np.load(self.root / DONE, mmap_mode="r")
        finished = int(done.sum())
        if finished != self.manifest.rows:
            raise EmbeddingStoreError(
                f"Embedding store {self.root} is incomplete ({finished} of {self.manifest.rows} images); "
                "run `samflow embed` again with the same experiment to finish it."
            )
        self.key = key
        self.row_of = {h: r for r, h in enumerate(self.manifest.hashes)}
        self.hasher = ContentHasher()
        self._arrays: dict[tuple[str | int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.manifest.rows

    def _array(self, part: str | int, shard: int) -> np.ndarray:
        """The memory map of one shard file, the ``MAX_MAPPED`` most recently read kept open: each map
        holds a file descriptor, and a store of a large data set has thousands of shard files (one per
        part and ``shard_size`` images), more than a process may open (``ulimit -n``, often 1024)."""
        found = self._arrays.pop((part, shard), None)
        if found is None:
            found = np.load(self.root / array_name(part, shard), mmap_mode="r")
        self._arrays[(part, shard)] = found  # last: the most recently read
        while len(self._arrays) > MAX_MAPPED:
            del self._arrays[next(iter(self._arrays))]  # its map (and descriptor) go with the last reference
        return found

    def missing(self, paths: Iterable[str | Path]) -> list[str]:
        """The files among ``paths`` whose content has no row (new or changed since the store was written)."""
        return [os.fspath(p) for p in paths if self.hasher(p) not in self.row_of]

    def rows(self, paths: Sequence[str | Path]) -> list[int]:
        rows = []
        for path in paths:
            row = self.row_of.get(self.hasher(path)) if path else None
            if row is None:
                raise EmbeddingStoreError(
                    f"{path or 'an image without a file path'} is not in the embedding store {self.root} "
                    "(new or changed since it was written); run `samflow embed` again."
                )
            rows.append(row)
        return rows

    def read(self, part: str | int, rows: Sequence[int]) -> np.ndarray:
        """float16 values of ``part`` (``"embedding"`` or a block) for ``rows``, stacked."""
        size = self.manifest.shard_size
        return np.stack([self._array(part, r // size)[r % size] for r in rows])

    def encoded(
        self, paths: Sequence[str | Path], blocks: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """(embeddings (B, C, h, w), {block: (B, h, w, C_vit)}) of the image files ``paths``, in ``dtype``."""
        rows = self.rows(paths)

        def load(part: str | int) -> Tensor:
            return torch.from_numpy(self.read(part, rows)).to(device=device, dtype=dtype)

        return load("embedding"), {i: load(i) for i in blocks}
