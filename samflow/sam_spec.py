"""``SamSpec``: which SAM an experiment adapts (``model.sam``), with how its encoder's outputs are reused.

``SamflowModule`` builds its SAM from it; a run's config and checkpoint keep it, so ``samflow.rebuild``
and the student (``samflow.student``) build the same SAM again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamSpec"]


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
