"""Concentric two-resolution patches of slides (WSI-SAM's HR and LR views) and their prompts.

For a centre c (level 0) and a high-resolution mpp m, the HR patch is ``size`` px at m and the LR
patch ``size`` px at ``factor * m`` around the same c, so the HR field is the LR patch's central
1/factor (its central half for factor 2). The model learns the geometry from the batch
(``SamBatch.context_affine`` = (1/factor, S(1 - 1/factor)/2, same)), and maps every prompt to LR
with it; the ground truth is rasterised at both resolutions from the same polygons.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from samflow.data.prompts import MixedPrompt, NoisyMaskPrompt, PointPrompt, PromptSampler, mask_to_box
from samflow.data.transforms import scale_boxes, scale_coords
from samflow.data.wsi.annotations import load_annotations, rasterize
from samflow.data.wsi.slide import Slide, SlideError
from samflow.data.wsi.tissue import tissue_mask
from samflow.seeding import cpu_seeded

MAX_DRAWS = 400  # rounds of 256 candidate centres before a slide's tumour or background counts as absent
MAX_OPEN_SLIDES = 64  # slides a process keeps open (file descriptors); the least recently read closes first


class CentreSizeBoxPrompt(PromptSampler):
    """The mask's box with WSI-SAM's (HQ-SAM's ``box_noise``) noise: the centre moves by
    U(-1, 1) * ``centre`` * (w, h), the size by U(-1, 1) * ``size`` * (w, h); clipped to the image.
    Reference: centre 0.1, size 0.2. An empty mask gets no box.

    Args:
        centre: largest shift of the box's centre, as a fraction of its width and height.
        size: largest change of the box's width and height, as a fraction of them (each side stays
            at least 1 pixel).
    """

    def __init__(self, centre: float = 0.1, size: float = 0.2) -> None:
        if centre < 0 or size < 0:
            raise ValueError(f"CentreSizeBoxPrompt: need centre, size >= 0, got {centre}, {size}.")
        self.centre = centre
        self.size = size

    def __call__(self, mask: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        box = mask_to_box(mask)
        if box is None:
            return {}
        h, w = mask.shape
        wh = box[2:] - box[:2] + 1
        centre = (box[:2] + box[2:]) / 2 + (
            torch.rand(2, generator=generator, dtype=box.dtype) * 2 - 1
        ) * self.centre * wh
        side = (
            wh + (torch.rand(2, generator=generator, dtype=box.dtype) * 2 - 1) * self.size * wh
        ).clamp_min(1)
        low, high = centre - (side - 1) / 2, centre + (side - 1) / 2
        limit = torch.tensor([w - 1.0, h - 1.0], dtype=box.dtype)
        return {"box": torch.cat([low.clamp(min=0).minimum(limit), high.clamp(min=0).minimum(limit)])}

    def __repr__(self) -> str:
        return f"CentreSizeBoxPrompt(centre={self.centre}, size={self.size})"


def wsi_sam_prompts() -> PromptSampler:
    """WSI-SAM's training prompts: uniformly a noisy box, 10 positive points or a noisy mask."""
    return MixedPrompt([CentreSizeBoxPrompt(), PointPrompt(positive=10), NoisyMaskPrompt()])


def context_affine(size: int, factor: float) -> Tensor:
    """(a, t, t) of concentric views: a = 1/factor, t = S (1 - a) / 2 (0.5, S/4, S/4 for factor 2)."""
    a = 1.0 / factor
    return torch.tensor([a, size * (1 - a) / 2, size * (1 - a) / 2])


def prompt_item(
    gt: Tensor, sampler: PromptSampler, generator: torch.Generator, size: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Prompts of a (P, P) ground truth in the S x S input frame; a sampler that gives nothing (an
    empty mask and a box) is replaced by one point, negative on an empty mask: every sample has a prompt."""
    prompt = sampler(gt, generator)
    if not prompt:
        prompt = PointPrompt(positive=1)(gt, generator)
    original, frame = tuple(gt.shape), (size, size)
    item: dict[str, Tensor] = {}
    if "points" in prompt:
        item["points"] = scale_coords(prompt["points"].to(dtype), original, frame)
        item["point_labels"] = prompt["point_labels"]
    if "box" in prompt:
        item["box"] = scale_boxes(prompt["box"].to(dtype), original, frame)
    if "mask_prompt" in prompt:
        coarse = prompt["mask_prompt"][None, None].to(dtype)
        item["mask_prompt"] = (F.interpolate(coarse, size=(size // 4, size // 4), mode="area")[0] > 0.5).to(
            dtype
        )
    return item


def _image_tensor(rgb: np.ndarray, size: int, dtype: torch.dtype) -> Tensor:
    x = (
        torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).to(dtype) / 255
    )  # (3, P, P)
    if x.shape[-1] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x


def _mask_tensor(mask: np.ndarray, size: int, dtype: torch.dtype) -> Tensor:
    m = torch.from_numpy(mask)[None].to(dtype)  # (1, P, P)
    if m.shape[-1] != size:
        m = F.interpolate(m[None], size=(size, size), mode="nearest-exact")[0]
    return m


def pair_item(
    hr: np.ndarray,
    lr: np.ndarray,
    hr_gt: np.ndarray | None,
    lr_gt: np.ndarray | None,
    *,
    factor: float,
    size: int,
    sampler: PromptSampler,
    generator: torch.Generator,
    item_id: str,
    path: str = "",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """A collate item (``samflow.data.batch``) of an HR / LR pair of RGB uint8 (P, P, 3) patches."""
    patch = hr.shape[0]
    item: dict[str, Any] = {
        "id": item_id,
        "path": path,
        "image": _image_tensor(hr, size, dtype),
        "context_image": _image_tensor(lr, size, dtype),
        "context_affine": context_affine(size, factor).to(dtype),
        "input_size": torch.tensor([size, size]),
        "original_size": torch.tensor([patch, patch]),
    }
    if hr_gt is not None and lr_gt is not None:
        gt = torch.from_numpy(np.ascontiguousarray(hr_gt))
        item.update(
            gt_original=gt,
            mask=_mask_tensor(hr_gt, size, dtype),
            context_mask=_mask_tensor(lr_gt, size, dtype),
            **prompt_item(gt, sampler, generator, size, dtype),
        )
    return item


@dataclass(frozen=True)
class PatchCentre:
    slide: int  # index into the dataset's slides
    x: float  # level-0 centre
    y: float
    tumour: bool


class SlidePatches(Dataset):
    """Concentric HR / LR patches drawn from the tissue of slides, with their masks and HR prompts.

    Args:
        slides: slide files.
        annotations: one annotation file (GeoJSON / ASAP XML) per slide, or None for slides without
            tumour (every patch is background).
        mpp: HR microns per pixel (1.0: 10x); LR is at ``factor * mpp``.
        factor: LR / HR mpp (2: the HR field is the LR patch's central half).
        patch_size: side of both patches in pixels (1024).
        img_size: the model's input side (patches are resized to it when it differs).
        patches_per_slide: samples per slide and epoch.
        tumour_fraction: share of a slide's samples centred in tumour (when it has tumour).
        seed: the sampler's seed; slide s in epoch e draws its centres from (seed, s, e), patch i its flip,
            colour jitter and prompt from (seed, i, e), so runs repeat.
        prompt: the prompt sampler on the HR mask (default: WSI-SAM's box / 10 points / noisy mask).
        slide_mpp: level-0 mpp of slides without metadata; overrides the metadata.
        tissue_mpp: resolution of the tissue detection (a low level).
        augment: WSI-SAM's shared augmentation: the same horizontal flip (p 0.5) and colour jitter
            (p 0.5; brightness, contrast, saturation 0.2, hue 0.1) for HR and LR.
        label_downsample: level-0 pixels per pixel of label-image annotations (``.png`` / ``.tif``).
    """

    def __init__(
        self,
        slides: Sequence[str | Path],
        annotations: Sequence[str | Path | None] | None = None,
        *,
        mpp: float = 1.0,
        factor: float = 2.0,
        patch_size: int = 1024,
        img_size: int = 1024,
        patches_per_slide: int = 10,
        tumour_fraction: float = 0.5,
        seed: int = 0,
        prompt: PromptSampler | None = None,
        slide_mpp: float | None = None,
        tissue_mpp: float = 16.0,
        augment: bool = False,
        label_downsample: float = 1.0,
    ) -> None:
        if annotations is not None and len(annotations) != len(slides):
            raise ValueError(f"SlidePatches: {len(slides)} slides but {len(annotations)} annotation entries.")
        if not 0 <= tumour_fraction <= 1:
            raise ValueError(f"SlidePatches: tumour_fraction must lie in [0, 1], got {tumour_fraction}.")
        self.paths = [Path(s) for s in slides]
        self.mpp, self.factor, self.patch_size, self.img_size = mpp, factor, patch_size, img_size
        self.patches_per_slide, self.tumour_fraction, self.seed = patches_per_slide, tumour_fraction, seed
        self.prompt = prompt if prompt is not None else wsi_sam_prompts()
        self.slide_mpp, self.augment = slide_mpp, augment
        self._slides: dict[int, Slide] = {}
        self._slides_pid: int | None = os.getpid()  # the process that opened ``_slides``
        self.regions = [
            None
            if a is None
            else load_annotations(a, label_downsample=label_downsample, slide_size=self.slide(i).dimensions)
            for i, a in enumerate(annotations or [None] * len(slides))
        ]
        self.tissue: list[tuple[np.ndarray, float]] = []
        for i, path in enumerate(self.paths):
            mask, downsample = tissue_mask(self.slide(i), tissue_mpp)
            if not mask.any():
                raise SlideError(f"{path}: no tissue found (Otsu on saturation); is it a blank slide?")
            self.tissue.append((mask, downsample))
        self.epoch = -1
        self.set_epoch(0)

    def slide(self, index: int) -> Slide:
        """The slide, opened lazily once per process. A forked loader worker inherits the parent's open
        slides, whose file descriptors share one file offset with the parent's and every other
        worker's: reads through them would race (seek, then read) and return another region's bytes.
        So a process opens its own (``_slides_pid``); pickling (spawned workers) drops them too.

        At most ``MAX_OPEN_SLIDES`` stay open, the most recently read: a dataset of thousands of slides
        would otherwise hold a descriptor per slide in every process and run out of them (``ulimit -n``
        is often 1024)."""
        if self._slides_pid != os.getpid():
            self._slides, self._slides_pid = {}, os.getpid()
        slide = self._slides.pop(index, None)
        if slide is None:
            slide = Slide(self.paths[index], self.slide_mpp)
        self._slides[index] = slide  # last in the dict: the most recently read
        while len(self._slides) > MAX_OPEN_SLIDES:
            self._slides.pop(next(iter(self._slides))).close()
        return slide

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slides"], state["_slides_pid"] = {}, None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's patch centres (the same for the same seed and epoch); the epoch also seeds
        each patch's flip, colour jitter and prompt (``__getitem__``)."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.centres = [c for s in range(len(self.paths)) for c in self._draw(s, epoch)]

    def _draw(self, s: int, epoch: int) -> list[PatchCentre]:
        import shapely

        rng = np.random.default_rng([self.seed, s, epoch])
        tissue, ds = self.tissue[s]
        region = self.regions[s]
        has_tumour = region is not None and not region.is_empty
        n_tumour = round(self.patches_per_slide * self.tumour_fraction) if has_tumour else 0
        out: list[PatchCentre] = []
        if n_tumour and region is not None:
            x0, y0, x1, y1 = region.bounds
            for draw in range(MAX_DRAWS + 1):
                if len(out) >= n_tumour:
                    break
                if draw == MAX_DRAWS:
                    raise SlideError(
                        f"{self.paths[s]}: no point inside its annotated tumour in {MAX_DRAWS * 256} draws "
                        f"from the tumour's bounds {region.bounds}; check the annotation file."
                    )
                xs, ys = rng.uniform(x0, x1, 256), rng.uniform(y0, y1, 256)
                inside = shapely.contains_xy(region, xs, ys)
                out += [PatchCentre(s, float(x), float(y), True) for x, y in zip(xs[inside], ys[inside])]
            out = out[:n_tumour]
        cells = np.argwhere(tissue)  # (n, 2) row, col of tissue at the detection level
        for draw in range(MAX_DRAWS + 1):
            if len(out) >= self.patches_per_slide:
                break
            if draw == MAX_DRAWS:
                raise SlideError(
                    f"{self.paths[s]}: no tissue outside its annotated tumour in {MAX_DRAWS * 256} draws, "
                    "so no background centres; set tumour_fraction: 1 for slides all tumour, or check "
                    "the annotation file."
                )
            pick = cells[rng.integers(len(cells), size=256)]
            xs = (pick[:, 1] + rng.uniform(0, 1, 256)) * ds
            ys = (pick[:, 0] + rng.uniform(0, 1, 256)) * ds
            keep = ~shapely.contains_xy(region, xs, ys) if has_tumour else np.ones(256, dtype=bool)
            out += [PatchCentre(s, float(x), float(y), False) for x, y in zip(xs[keep], ys[keep])]
        return out[: self.patches_per_slide]

    def __len__(self) -> int:
        return len(self.centres)

    def read_pair(self, centre: PatchCentre) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(HR, LR RGB uint8, HR mask, LR mask) at ``centre``."""
        slide = self.slide(centre.slide)
        region = self.regions[centre.slide]
        patches, masks = [], []
        for mpp in (self.mpp, self.mpp * self.factor):
            patches.append(slide.read((centre.x, centre.y), mpp, self.patch_size))
            pixel = mpp / slide.mpp  # level-0 pixels per patch pixel
            origin = (centre.x - self.patch_size * pixel / 2, centre.y - self.patch_size * pixel / 2)
            masks.append(rasterize(region, origin, pixel, self.patch_size))
        return patches[0], patches[1], masks[0], masks[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        centre = self.centres[index]
        hr, lr, hr_gt, lr_gt = self.read_pair(centre)
        # epoch 0 (and the fixed evaluation patches) from (seed, index), a later epoch e from (seed, index, e)
        key = [self.seed, index, 7] + ([self.epoch] if self.epoch else [])
        generator = torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**31)))
        if self.augment:
            hr, lr, hr_gt, lr_gt = _shared_augment(hr, lr, hr_gt, lr_gt, generator)
        name = f"{self.paths[centre.slide].stem}@{centre.x:.0f},{centre.y:.0f}"
        return pair_item(
            hr,
            lr,
            hr_gt,
            lr_gt,
            factor=self.factor,
            size=self.img_size,
            sampler=self.prompt,
            generator=generator,
            item_id=name,
            path=str(self.paths[centre.slide]),
        )


def _shared_augment(
    hr: np.ndarray, lr: np.ndarray, hr_gt: np.ndarray, lr_gt: np.ndarray, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same flip and colour jitter for both views (concentric views stay concentric under a flip)."""
    from PIL import Image
    from torchvision.transforms import ColorJitter
    from torchvision.transforms import functional as TF

    if torch.rand(1, generator=generator) < 0.5:
        hr, lr, hr_gt, lr_gt = (np.ascontiguousarray(a[:, ::-1]) for a in (hr, lr, hr_gt, lr_gt))
    if torch.rand(1, generator=generator) < 0.5:
        with cpu_seeded(int(torch.randint(2**31, (1,), generator=generator))):  # the CUDA generator untouched
            order, b, c, s, h = ColorJitter.get_params((0.8, 1.2), (0.8, 1.2), (0.8, 1.2), (-0.1, 0.1))
        views = []
        for view in (hr, lr):
            img = Image.fromarray(view)
            for i in order.tolist():
                if i == 0 and b is not None:
                    img = TF.adjust_brightness(img, b)
                elif i == 1 and c is not None:
                    img = TF.adjust_contrast(img, c)
                elif i == 2 and s is not None:
                    img = TF.adjust_saturation(img, s)
                elif i == 3 and h is not None:
                    img = TF.adjust_hue(img, h)
            views.append(np.asarray(img))
        hr, lr = views
    return hr, lr, hr_gt, lr_gt
