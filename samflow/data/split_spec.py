"""Split specs of ``SegmentationDataModule`` and their early checks, made when the config is read.

A split spec (``SplitSpec``) is a dataset root, a dict ``{"root": ..., "images": ..., "masks": ...}``
or a list of those; ``val_sets`` / ``test_sets`` map dataset names to split specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What a split may be: a root, a dict {"root": ..., "images": ..., "masks": ..., ...}, or a list of those.
SplitSpec = str | dict[str, Any] | list[str | dict[str, Any]] | None


def check_split_spec(split: str, spec: SplitSpec) -> None:
    """Reject a dict without ``root`` early: it is most likely a mapping of named sets."""
    if isinstance(spec, Mapping) and "root" not in spec:
        hint = (
            f" To evaluate on several named datasets, use data.{split}_sets: {{NAME: spec, ...}}."
            if split in ("val", "test")
            else ""
        )
        raise ValueError(
            f"data.{split} is a mapping without a 'root' key ({dict(spec)}). A split spec is a folder, a "
            f"dict {{root: ..., images: ..., masks: ...}}, or a list of those.{hint}"
        )


def check_named_sets(
    split: str, spec: SplitSpec, named: Mapping[str, SplitSpec] | None
) -> dict[str, SplitSpec] | None:
    """Check ``val_sets`` / ``test_sets``: a non-empty name -> split spec mapping, without the plain split."""
    if named is None:
        return None
    key = f"data.{split}_sets"
    if spec is not None:
        raise ValueError(
            f"Give data.{split} or {key}, not both (got {split}={spec!r} and {key}={dict(named)!r})."
        )
    if not isinstance(named, Mapping) or not named:
        raise ValueError(f"{key} must be a non-empty mapping of dataset name -> split spec, got {named!r}.")
    for name, value in named.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{key}: dataset names must be non-empty strings, got {name!r}.")
        if value is None:
            raise ValueError(
                f"{key}.{name} has no split spec; give a folder root, a dict with 'root', or a list."
            )
        check_split_spec(f"{split}_sets.{name}", value)
    return dict(named)
