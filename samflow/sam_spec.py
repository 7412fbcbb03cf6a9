"""``SamSpec``: which SAM an experiment adapts (``model.sam``), with how its encoder's outputs are reused.

``SamflowModule`` builds its SAM from it; a run's config and checkpoint keep it, so ``samflow.rebuild``
and the student (``samflow.student``) build the same SAM again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samflow.outputs import file_sha256

__all__ = ["BuiltOn", "SamSpec", "check_trained_on", "trained_on"]


@dataclass
class SamSpec:
    """Which SAM to adapt.

    Attributes:
        variant: ``vit_b``, ``vit_l``, ``vit_h``, ``tiny`` (random, for tests and the quickstart), or an
            image encoder with SAM's decoder side: ``mobile_sam``, ``efficient_sam_vitt``,
            ``efficient_sam_vits`` (README, "Other image encoders").
        checkpoint: path of the official checkpoint of that variant; None keeps random weights.
        img_size: encoder input size (default: the variant's, 1024 for the real ones).
        multimask_output: SAM's own selection: token 0 (False) or the best of tokens 1..3 by
            predicted IoU (True).
        seed: seed of the random initialisation when no checkpoint is given.
        checkpoint_blocks: activation checkpointing of the encoder blocks in training: less memory
            when gradients flow through the encoder (adapters), at the cost of recomputing it.
        encoder_cache: keep the encoder's outputs for this many images and reuse them when an image
            comes back unchanged (validation every epoch; training without augmentation). 0 turns
            it off. Refused when a plugin changes the encoder. Costs C*h*w floats per image on the
            CPU (4 MiB at 1024 px).
        encoder_cache_stages: where the cache is used: ``train`` and/or ``eval``. ``[eval]`` when
            training images are augmented (new every time), so they do not evict validation images.
        embedding_store: folder of an embedding store written by ``samflow embed`` for this
            experiment: training and evaluation read the encoder's outputs (fp16) from it instead of
            running the encoder. Checked when the run starts (``samflow.embed.open_for_run``):
            refused with one line when a plugin changes the encoder, when ``data.augment`` is set
            (augmentation changes the image), when the store was written for other encoder weights,
            input size, resize rule or blocks, when it is unfinished, or when an image is not in it.
    """

    variant: str = "vit_b"
    checkpoint: str | None = None
    img_size: int | None = None
    multimask_output: bool = False
    seed: int = 0
    checkpoint_blocks: bool = False
    encoder_cache: int = 0
    encoder_cache_stages: tuple[str, ...] = ("train", "eval")
    embedding_store: str | None = None


# A module built in Python keeps its ``SamSpec`` in its hyperparameters, so its checkpoints hold one;
# Lightning resumes (``fit(ckpt_path=...)``) and ``read_checkpoint_state`` load with ``weights_only=True``,
# which refuses any class it was not told of. SamSpec is plain data (strings, numbers, a list). Allowed
# for the whole process, here where it is defined: torch's ``safe_globals`` context would remove it again
# from the process's list when its block ends.
torch.serialization.add_safe_globals([SamSpec])


# ---- which frozen SAM a checkpoint was trained on ----
# A checkpoint leaves out the frozen SAM (``frozen_sam_keys``): it loads on top of the SAM the config builds,
# which must be the one it was trained on. ``trained_on`` is the record a checkpoint keeps
# (``checkpoint["samflow"]["trained_on"]``), ``check_trained_on`` refuses, in one line, a SAM of another
# variant, another checkpoint file (by SHA-256: a moved or copied file is the same) or random weights of
# another seed. ``img_size`` is not part of it: evaluating at another input size is allowed.
_FILE_SHA256: dict[str, tuple[int, int, str]] = {}


def _file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, remembered while its size and modification time stay the same
    (a vit_h file is 2.4 GiB: hashed once per process)."""
    key = os.path.realpath(os.path.expanduser(path))
    stat = os.stat(key)
    known = _FILE_SHA256.get(key)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    digest = file_sha256(key)
    _FILE_SHA256[key] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


def trained_on(variant: str, checkpoint: str | None, seed: int) -> dict[str, Any]:
    """The frozen SAM a model is built on: the variant, and the file's name and SHA-256, or the seed of
    its random weights (no file)."""
    if checkpoint:
        name: str | None = Path(checkpoint).name
        sha256: str | None = _file_sha256(checkpoint) if Path(checkpoint).expanduser().is_file() else None
    else:
        name = sha256 = None
    return {"variant": variant, "checkpoint": name, "sha256": sha256, "seed": None if checkpoint else seed}


def _shown(record: Mapping[str, Any]) -> str:
    if record.get("checkpoint"):
        sha = record.get("sha256")
        return f"{record['checkpoint']}" + (f" (SHA-256 {str(sha)[:12]})" if sha else "")
    return f"random weights (seed {record.get('seed')}, no file)"


@dataclass(frozen=True)
class BuiltOn:
    """The frozen SAM a model is built on, and the flags that choose it (named when a checkpoint of
    another SAM is refused). ``HookedSam.built_on``; ``check_trained_on`` compares a checkpoint's
    record with it."""

    variant: str
    checkpoint: str | None
    seed: int
    flag: str = "--model.sam.checkpoint"
    variant_flag: str = "--model.sam.variant"

    @classmethod
    def of(cls, spec: SamSpec, **flags: str) -> BuiltOn:
        return cls(spec.variant, spec.checkpoint, spec.seed, **flags)

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps as ``samflow.trained_on``."""
        return trained_on(self.variant, self.checkpoint, self.seed)


def check_trained_on(recorded: Any, built_on: BuiltOn, *, source: str) -> None:
    """Refuse, in one line naming both, a frozen SAM (``built_on``) other than the one ``source`` was
    trained on.

    ``recorded`` is the checkpoint's ``samflow`` entry: ``trained_on`` (written since this check
    exists), or for an older checkpoint only ``sam`` (its ``SamSpec``: the variant, and whether a
    file or random weights; the file's bytes were not recorded). Nothing recorded: nothing to check.
    """
    from samflow.sam.build import CheckpointError

    if not isinstance(recorded, Mapping):
        return
    record = recorded.get("trained_on")
    spec = recorded.get("sam")
    if not isinstance(record, Mapping):
        spec = spec if isinstance(spec, Mapping) else getattr(spec, "__dict__", None)
        if not isinstance(spec, Mapping):
            return
        record = {
            "variant": spec.get("variant"),
            "checkpoint": Path(spec["checkpoint"]).name if spec.get("checkpoint") else None,
            "sha256": None,
            "seed": None if spec.get("checkpoint") else spec.get("seed"),
        }
    variant, checkpoint, flag = built_on.variant, built_on.checkpoint, built_on.flag
    if record.get("variant") is not None and record["variant"] != variant:
        raise CheckpointError(
            f"{source} was trained on SAM {record['variant']!r}, this model builds {variant!r}; pass "
            f"{built_on.variant_flag} {record['variant']} and {flag} with the SAM file it was trained on."
        )
    if checkpoint and record.get("sha256") and not Path(checkpoint).expanduser().is_file():
        return  # a missing SAM file is refused by name when SAM is built
    mine = built_on.record()
    if record.get("sha256") is not None:
        same = mine["sha256"] == record["sha256"]
    elif record.get("checkpoint") is not None:
        same = mine["checkpoint"] is not None  # an older checkpoint: a file, bytes unknown
    else:
        same = mine["checkpoint"] is None and mine["seed"] == record.get("seed")
    if not same:
        todo = (
            f"pass the SAM file it was trained on ({record['checkpoint']}) with {flag}"
            if record.get("checkpoint")
            else f"build SAM as it was trained, without a SAM file and with seed {record.get('seed')} "
            "(model.sam.checkpoint null, model.sam.seed)"
        )
        raise CheckpointError(
            f"{source} was trained on the frozen SAM {_shown(record)}, but this model's SAM is {_shown(mine)}: "
            f"its weights would load on other frozen weights; {todo}."
        )
