"""``BatchAugment``: the base class of a third party's batch augmentation (``data.init_args.augment``).

samflow's own augmentation is ``samflow.data.GpuAugment`` (kornia). Another one is any subclass of
``BatchAugment``, chosen by ``class_path`` like every component::

    augment:
      class_path: my_pkg.augment.CopyPaste
      init_args: {p: 0.5}

It runs on the model's device, on training batches only, after the batch reaches the device
(the data modules' ``on_after_batch_transfer``, through ``augment_training_batch``, which first tells
an augmentation with ``set_epoch`` the trainer's epoch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import nn

from samflow.batch import SamBatch


class BatchAugment(nn.Module, ABC):
    """Augment a collated training batch on its device; subclass it and give it as ``class_path``.

    ``forward(batch)`` returns the augmented batch (a new ``SamBatch``; do not change the input in
    place) and keeps every spatial field consistent with the image: mask, prompts and the sizes
    that map predictions back to the original image. The constructor's arguments are the
    ``init_args`` a config can set.
    """

    @abstractmethod
    def forward(self, batch: SamBatch) -> SamBatch:
        """Return the augmented batch."""


def augment_training_batch(augment: Any, trainer: Any, batch: SamBatch) -> SamBatch:
    """``augment(batch)`` for a training batch (``trainer.training``), else the batch as it is: what a
    data module's ``on_after_batch_transfer`` does with ``data.augment``. An augmentation with
    ``set_epoch`` (``GpuAugment``: the epoch is part of the key of an image without a sample seed)
    learns the trainer's epoch first."""
    if augment is None or trainer is None or not trainer.training:
        return batch
    set_epoch = getattr(augment, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(trainer.current_epoch)
    return augment(batch)
