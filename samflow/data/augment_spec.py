"""``build_augment``: ``data.augment`` given in Python, built as the CLI builds it.

The CLI turns the experiment's ``data.augment`` into a ``BatchAugment`` with jsonargparse; a data
module made in Python (tests, notebooks) gets the same forms through this: a ``class_path`` spec, or
``GpuAugment``'s arguments alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from samflow.components import instantiate, is_class_path_spec
from samflow.data.augment import BatchAugment

__all__ = ["build_augment"]


def build_augment(spec: Any) -> Any:
    """``data.augment`` as the CLI builds it, for a module built in Python: a class_path spec, or
    ``GpuAugment``'s arguments alone (``{hflip: 0.5}``); a built augmentation (any callable) or None as is."""
    if isinstance(spec, Mapping):
        if not is_class_path_spec(spec):
            spec = {"class_path": "samflow.data.GpuAugment", "init_args": dict(spec)}
        return instantiate(spec, BatchAugment, "data.augment")
    if spec is not None and not callable(spec):
        raise TypeError(
            f"data.augment must be a BatchAugment (e.g. GpuAugment), a class_path spec or GpuAugment's "
            f"arguments as a dict; got {type(spec).__name__} {spec!r}."
        )
    return spec
