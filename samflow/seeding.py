"""Seeds: ``derived_seed`` makes independent seeds from integers, ``stable_seed`` from names and
integers (a sample's id, a stream's name), ``cpu_seeded`` draws on the CPU from one.

``cpu_seeded`` leaves every other generator as it was.

``torch.manual_seed`` seeds the CUDA generators too, and ``fork_rng(devices=[])`` restores only the
CPU's: a block that seeds a sample's or a model's draws that way reseeds the process's CUDA generator
with that seed (every dropout and every draw a plugin makes on the GPU afterwards follow the last sample
read, or the SAM build's seed instead of the run's). These blocks draw on the CPU, so they seed the CPU
generator alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["cpu_seeded", "derived_seed", "stable_seed"]


def derived_seed(*words: int) -> int:
    """A 63-bit seed of the non-negative integers ``words`` (numpy's ``SeedSequence``): distinct words,
    independent seeds. A sample's seed from (run seed, epoch, index), a stream of a sample's own from
    (its seed, a tag)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed of ``parts`` (a run's seed, a sample's id, a stream's name, ...): the same in every
    process and every run (Python's ``hash`` of a string is salted per process), and unrelated for
    different parts. SHA-256 of the parts written out, joined by commas."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextmanager
def cpu_seeded(seed: int) -> Iterator[None]:
    """Within the block, torch's CPU generator starts from ``seed``; after it, it is back where it was.
    The CUDA generators are neither seeded nor saved (a fork of their state would sync the device)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        yield
