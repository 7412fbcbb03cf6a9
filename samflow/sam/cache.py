"""Cache of image-encoder outputs, keyed by the content of the encoder's input.

When no plugin changes the image encoder and none of its parameters is trained, the encoder's
outputs (the image embedding and the block features plugins read) are a pure function of the
normalised image. An image seen before, bit for bit, then needs no encoder pass: the cache returns
what the encoder gave the first time. This pays when the same images come back unchanged, as
validation images do every epoch, or training images without augmentation; an augmented image is
new every time and only costs a hash.

The key is a SHA-1 digest of the image's bytes with its dtype and shape, the autocast dtype and the
feature blocks asked for, so an image under bf16 autocast and the same image in float32 are
different entries. The outputs are a function of the encoder's weights too: given them
(``encode(..., weights=)``), the cache empties itself when any of them is replaced, put on new
storage (``.to(device)``, ``.half()``) or changed in place (``load_state_dict`` of another
checkpoint, ``copy_``: each bumps the tensor's version counter), by the rule ``samflow.sam.casts``
follows for its cast copies (``unchanged``). Entries live on the CPU (``device``) and are evicted
least recently used first; each costs ``C * h * w`` values for the embedding (4 MiB for SAM at 1024 in float32) plus the
captured block features.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from samflow.sam.casts import autocast_dtype, stamp, unchanged

Encoded = tuple[Tensor, dict[int, Tensor]]


class EncoderCacheError(ValueError):
    """The encoder cache is asked for where the encoder's output is not a function of the image alone."""


class StoredEncoder(Protocol):
    """Encoder outputs kept outside the process (``samflow.embed.EmbeddingStore``), found by image file."""

    def encoded(
        self, paths: Sequence[str | Path], blocks: Sequence[int], device: torch.device, dtype: torch.dtype
    ) -> Encoded:
        """(embeddings (B, C, h, w), {block: (B, h, w, C_vit)}) of the images stored from ``paths``."""
        ...


class EncoderCache:
    """Least-recently-used store of encoder outputs per image.

    Args:
        capacity: most images kept; the oldest unused entry goes first.
        device: where entries are stored (``"cpu"`` keeps accelerator memory free).
        stages: the tallies (``"train"``, ``"eval"``) that use the cache; the others bypass it. Use
            ``("eval",)`` when training images are augmented: they would only evict the validation
            images, which repeat every epoch.
    """

    def __init__(
        self, capacity: int, device: str | torch.device = "cpu", stages: tuple[str, ...] = ("train", "eval")
    ) -> None:
        if capacity < 1:
            raise ValueError(f"EncoderCache capacity must be at least 1 image, got {capacity}.")
        unknown = set(stages) - {"train", "eval"}
        if unknown:
            raise ValueError(
                f"model.sam.encoder_cache_stages (EncoderCache stages) must be 'train' and/or 'eval', got "
                f"{sorted(unknown)}; e.g. --model.sam.encoder_cache_stages '[train, eval]'."
            )
        self.capacity = capacity
        self.stages = tuple(stages)
        self.device = torch.device(device)
        self.counts: dict[str, list[int]] = {}  # tally -> [hits, misses]
        self._entries: OrderedDict[tuple, tuple[Tensor, dict[int, Tensor]]] = OrderedDict()
        self._weights: tuple = ()  # the entries' weights' stamp (samflow.sam.casts.stamp)

    def __len__(self) -> int:
        return len(self._entries)

    def hit_rate(self, tally: str) -> float | None:
        """Share of images of ``tally`` found in the cache since its last reset; None if none came."""
        hits, misses = self.counts.get(tally, (0, 0))
        return hits / (hits + misses) if hits + misses else None

    def reset_counts(self, tally: str | None = None) -> None:
        """Forget the counts of ``tally`` (all tallies when None)."""
        if tally is None:
            self.counts.clear()
        else:
            self.counts.pop(tally, None)

    def clear(self) -> None:
        self._entries.clear()
        self.reset_counts()

    def keys_of(self, x: Tensor, blocks: tuple[int, ...]) -> list[tuple]:
        """One key per image of ``x`` (B, 3, S, S)."""
        autocast = autocast_dtype(x.device)
        host = x.detach().contiguous().cpu()
        keys = []
        for image in host:
            digest = hashlib.sha1(image.view(torch.uint8).numpy(), usedforsecurity=False).hexdigest()
            keys.append((digest, str(x.dtype), tuple(image.shape), str(autocast), blocks))
        return keys

    def follow(self, weights: Iterable[Tensor]) -> bool:
        """Empty the cache when ``weights`` (the encoder's parameters and buffers) are not the very
        tensors, unchanged, its entries were computed with -> whether it was emptied.

        A tensor counts as changed when it is another object, on another storage (``.to(device)``,
        ``.half()``) or its version counter moved (any in-place write: ``load_state_dict``, ``copy_``);
        an in-place write through ``.data`` is not seen: the rule of ``samflow.sam.casts.unchanged``."""
        tensors = list(weights)
        if unchanged(self._weights, tensors):
            return False
        self._weights = stamp(tensors)
        emptied = bool(self._entries)
        self._entries.clear()
        return emptied

    def encode(
        self,
        x: Tensor,
        blocks: tuple[int, ...],
        compute: Callable[[Tensor], Encoded],
        tally: str = "all",
        weights: Iterable[Tensor] | None = None,
    ) -> Encoded:
        """Encoder outputs for ``x``: cached images from the cache, the rest through ``compute``.

        ``compute`` maps a sub-batch of ``x`` to its embedding (b, C, h, w) and block features
        ``{i: (b, h, w, C)}`` for ``blocks``; it runs once, on the images missing from the cache.
        Hits and misses are counted under ``tally`` (the model counts training and evaluation apart);
        a tally outside ``stages`` goes straight to ``compute``, uncounted. ``weights``: the encoder's
        parameters and buffers; when they changed since the entries were made, the entries go
        (``follow``). None: the caller vouches that they never change.
        """
        if tally not in self.stages and tally != "all":
            return compute(x)
        if weights is not None:
            self.follow(weights)
        keys = self.keys_of(x, blocks)
        found = {key: self._entries[key] for key in keys if key in self._entries}
        for key in found:
            self._entries.move_to_end(key)
        todo: dict[tuple, int] = {}  # missing key -> first row with it (a repeated image runs once)
        for j, key in enumerate(keys):
            if key not in found:
                todo.setdefault(key, j)
        count = self.counts.setdefault(tally, [0, 0])
        count[0] += sum(key in found for key in keys)
        count[1] += sum(key not in found for key in keys)
        if todo:
            rows = list(todo.values())
            embeddings, features = compute(x[rows])
            for row, (key, _) in enumerate(todo.items()):
                fresh = (embeddings[row].detach(), {i: f[row].detach() for i, f in features.items()})
                found[key] = fresh
                self._store(
                    key,
                    (
                        fresh[0].to(self.device, copy=True),
                        {i: f.to(self.device, copy=True) for i, f in fresh[1].items()},
                    ),
                )
        embeddings = torch.stack([found[key][0].to(x.device) for key in keys])
        features = {i: torch.stack([found[key][1][i].to(x.device) for key in keys]) for i in blocks}
        return embeddings, features

    def _store(self, key: tuple, entry: tuple[Tensor, dict[int, Tensor]]) -> None:
        if not self._entries:
            # Lightning here, not at module level: `samflow plugins` imports samflow.sam without it.
            from lightning.pytorch.utilities import rank_zero_info

            size = entry[0].nbytes + sum(f.nbytes for f in entry[1].values())
            rank_zero_info(
                f"Encoder cache: {size / 2**20:.2f} MiB per image on {self.device}, up to "
                f"{self.capacity} images ({self.capacity * size / 2**30:.2f} GiB)."
            )
        self._entries[key] = entry
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
