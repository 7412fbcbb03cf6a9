"""Pre-extracted HR / LR patch pairs in folders, as the WSI-SAM reference stores them.

``hr_images`` and ``lr_images`` hold the patches (the LR patch concentric, at ``factor`` times the
HR mpp); ``hr_masks`` / ``lr_masks`` their masks. Files pair by their path relative to the folder
without suffix (``<slide>/<n>_...png``); with ``match: prefix`` by the slide folder and the part of
the name before the first ``_`` (the reference's ``<count>`` prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from samflow.data.prompts import PromptSampler
from samflow.data.reading import read_image, read_mask
from samflow.data.wsi.patches import pair_item, wsi_sam_prompts
from samflow.seeding import stable_seed

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _files(folder: Path, match: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"PatchPairFolder: {folder} is not a folder.")
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in SUFFIXES:
            rel = path.relative_to(folder).with_suffix("")
            key = str(rel.parent / rel.name.split("_")[0]) if match == "prefix" else str(rel)
            out[key] = path
    return out


class PatchPairFolder(Dataset):
    """HR / LR patch pairs (and masks) from four folders; see the module docstring.

    Args:
        hr_images, lr_images: the patch folders.
        hr_masks, lr_masks: their mask folders (None: no ground truth, e.g. for prediction).
        factor: LR mpp / HR mpp (2 in the reference).
        img_size: the model's input side.
        match: ``"stem"`` (same relative path) or ``"prefix"`` (the reference's ``<count>_`` prefix).
        prompt: the prompt sampler on the HR mask (default: WSI-SAM's).
        seed: seed of the prompts (a pair draws from (seed, its key), so the same pair gets the same prompt
            whatever else is in the folders).
    """

    def __init__(
        self,
        hr_images: str | Path,
        lr_images: str | Path,
        hr_masks: str | Path | None = None,
        lr_masks: str | Path | None = None,
        *,
        factor: float = 2.0,
        img_size: int = 1024,
        match: str = "stem",
        prompt: PromptSampler | None = None,
        seed: int = 0,
    ) -> None:
        if match not in ("stem", "prefix"):
            raise ValueError(f"PatchPairFolder: match must be 'stem' or 'prefix', got {match!r}.")
        folders = [hr_images, lr_images] + ([hr_masks, lr_masks] if hr_masks is not None else [])
        if (hr_masks is None) != (lr_masks is None):
            raise ValueError("PatchPairFolder: give both hr_masks and lr_masks, or neither.")
        listings = [_files(Path(f), match) for f in folders if f is not None]
        keys = sorted(listings[0])
        for folder, listing in zip(folders[1:], listings[1:]):
            missing = [k for k in keys if k not in listing]
            if missing:
                raise FileNotFoundError(
                    f"PatchPairFolder: {len(missing)} HR patches have no partner in {folder} "
                    f"(first: {missing[:3]})."
                )
        if not keys:
            raise FileNotFoundError(f"PatchPairFolder: no images in {hr_images}.")
        self.samples = [tuple(listing[k] for listing in listings) for k in keys]
        self.keys = keys
        self.factor, self.img_size, self.seed = factor, img_size, seed
        self.prompt = prompt if prompt is not None else wsi_sam_prompts()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        paths = self.samples[index]
        hr, lr = ((read_image(p) * 255).round().byte().permute(1, 2, 0).numpy() for p in paths[:2])
        if hr.shape != lr.shape or hr.shape[0] != hr.shape[1]:
            raise ValueError(f"PatchPairFolder: {paths[0]} and {paths[1]} must be square and of one size.")
        masks: list[np.ndarray | None] = [None, None]
        if len(paths) == 4:
            masks = [read_mask(p).numpy() for p in paths[2:]]
        # from the pair's key, not its position: adding or removing a pair keeps every other one's prompt
        generator = torch.Generator().manual_seed(stable_seed(self.seed, self.keys[index]))
        return pair_item(
            hr,
            lr,
            masks[0],
            masks[1],
            factor=self.factor,
            size=self.img_size,
            sampler=self.prompt,
            generator=generator,
            item_id=self.keys[index],
            path=str(paths[0]),
        )
