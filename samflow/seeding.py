"""Seeds: ``derived_seed`` makes independent seeds from integers, ``stable_seed`` from names and
integers (a sample's id, a stream's name), ``image_keys`` gives each image of a batch the key its draws
are seeded from, ``cpu_seeded`` draws on the CPU from one.

``cpu_seeded`` leaves every other generator as it was.

``torch.manual_seed`` seeds the CUDA generators too, and ``fork_rng(devices=[])`` restores only the
CPU's: a block that seeds a sample's or a model's draws that way reseeds the process's CUDA generator
with that seed (every dropout and every draw a plugin makes on the GPU afterwards follow the last sample
read, or the SAM build's seed instead of the run's). These blocks draw on the CPU, so they seed the CPU
generator alone.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["cpu_seeded", "derived_seed", "image_keys", "stable_seed"]


def derived_seed(*words: int) -> int:
    """A 63-bit seed of the non-negative integers ``words`` (numpy's ``SeedSequence``): distinct words,
    independent seeds. A sample's seed from (run seed, epoch, index), a stream of a sample's own from
    (its seed, a tag)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed of ``parts`` (a run's seed, a sample's id, a stream's name, ...): the same in every
    process and every run (Python's ``hash`` of a string is salted per process), and unrelated for
    different parts. SHA-256 of the parts, each written with its kind and length (``s3:a,b``, ``i1:5``),
    so that no two different sequences of parts are written alike (``("a,b",)`` and ``("a", "b")``,
    ``5`` and ``"5"``)."""
    words = (("s", p) if isinstance(p, str) else ("i", str(operator.index(p))) for p in parts)
    written = "".join(f"{kind}{len(text)}:{text}" for kind, text in words)
    digest = hashlib.sha256(written.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_keys(
    sample_seed: Sequence[int], ids: Sequence[str], count: int, *, training: bool, epoch: int
) -> list[tuple[int | str, ...]] | None:
    """The key of each of a batch's ``count`` images, from which its random draws are seeded, so that an
    image draws alike alone or in any batch, at any place in it, on any DDP rank:

    - ``(sample_seed,)`` when every image has one (``ResumableLoader`` derives it from run seed, epoch
      and index);
    - else ``("id", id)`` in evaluation (every epoch, run and batching alike) and
      ``("id", id, torch.initial_seed(), epoch)`` in training (the run's seed and the epoch: every epoch
      draws afresh; two images with one id draw alike);
    - else (neither a seed nor an id per image) None: the caller draws from the global generator.

    ``ForwardContext.rand`` and ``GpuAugment`` take their keys from here; ``stable_seed(*key, stream)``
    turns a key into a generator seed.
    """
    if len(sample_seed) == count:
        return [(int(seed),) for seed in sample_seed]
    if len(ids) != count:
        return None
    if not training:
        return [("id", image_id) for image_id in ids]
    run = torch.initial_seed()
    return [("id", image_id, run, epoch) for image_id in ids]


@contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Within the block, torch's CPU generator starts from ``seed``; after it, it is back where it was.
    The CUDA generators are neither seeded nor saved (a fork of their state would sync the device)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield
