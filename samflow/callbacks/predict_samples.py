"""The images a predict run writes masks for, as ``MaskWriter`` plans its files: the samples of samflow's
folder and COCO data sets (also inside a ``ConcatDataset`` or ``Subset``), found from the trainer's predict
loaders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from samflow.data.coco_file import makes_row


@dataclass(frozen=True)
class InstanceImage:
    """An image of instance data (COCO) as ``MaskWriter`` plans it: one output stem per instance."""

    id: str
    image: Path
    stems: tuple[str, ...]
    mask: Path | None = None


def instance_images(dataset: Any) -> list[InstanceImage]:
    """The images of a ``CocoInstances`` dataset with the stems ``<image id>_<annotation id>`` of their
    instances (the annotations it makes rows of; one with an empty mask, dropped when read, is planned
    too: a superset, which only matters for the check of earlier outputs)."""
    out = []
    for image, anns in zip(dataset.images, dataset.anns, strict=True):
        rows = [a for a in anns if makes_row(a, dataset.crowd)]
        stems = tuple(f"{image['id']}_{int(a.get('id', k))}" for k, a in enumerate(rows))
        out.append(InstanceImage(str(image["id"]), dataset.root / image["file_name"], stems))
    return out


def dataset_samples(dataset: Any) -> list[Any]:
    """The samples (``.image``, ``.mask``, ``.id``) of a ``MaskFolderDataset``, or the images of a
    ``CocoInstances`` (``InstanceImage``), also inside a ``ConcatDataset`` or ``Subset``; ``[]`` for a
    dataset of another kind."""
    if all(hasattr(dataset, name) for name in ("images", "anns", "root", "crowd")):
        return instance_images(dataset)
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):  # ImageFolder's samples are (path, class) tuples: not ours
        return [s for s in samples if hasattr(s, "id") and hasattr(s, "image") and hasattr(s, "mask")]
    parts = getattr(dataset, "datasets", None)  # ConcatDataset
    if isinstance(parts, Sequence):
        return [s for part in parts for s in dataset_samples(part)]
    base = getattr(dataset, "dataset", None)  # Subset
    if base is not None:
        found = dataset_samples(base)
        indices = getattr(dataset, "indices", None)
        return found if indices is None else [found[i] for i in indices]
    return []


def predict_samples(trainer: Trainer) -> list[Any]:
    """The samples of every predict data loader (or, without loaders, of the data module's predict sets)."""
    loaders = trainer.predict_dataloaders
    if loaders is not None:
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        return [s for loader in loaders for s in dataset_samples(getattr(loader, "dataset", None))]
    datasets = getattr(getattr(trainer, "datamodule", None), "datasets", None) or {}
    return [s for key, d in datasets.items() if key.split("/")[0] == "predict" for s in dataset_samples(d)]
