"""Image / mask pairs from folders whose files share a stem (COD10K, CAMO, Kvasir, ISTD, DIS5K, HQSeg-44K).

A root holds an image folder and a mask folder (``images/`` and ``masks/`` by default; COD10K calls them
``Imgs/`` and ``GT/``, DIS5K ``im/`` and ``gt/``). ``images/cat.jpg`` pairs with ``masks/cat.png``.
Both may be the same folder when the suffixes tell images from masks (cascade_psp: ``x.jpg`` + ``x.png``):
``image_suffixes`` and ``mask_suffixes`` then share no suffix. Pairs are sorted by stem; stems are
case-sensitive (``Cat.jpg`` does not pair with ``cat.png``).
Several roots, each with its own folder names, make one dataset (HQSeg-44K style multi-dataset training).

Rules, checked when the dataset is built (listing only, no image is opened):

- a missing or empty folder is an error that names it and lists what the root does contain;
- an image without a mask is an error that lists up to 10 of them;
- a mask without an image is only a warning (datasets often ship extra masks), listing up to 10;
- two files with one stem in one folder (``a.jpg`` and ``a.png``) is an error naming both;
- one stem for two different images in two roots of one dataset is an error naming both: the stem is
  the sample's id, the key of its evaluation prompt (one root listed twice is fine; predict data leaves
  this to ``MaskWriter``, which names the mask file both would write);
- only a folder's own files are read: subfolders holding images get a warning that lists them (an error
  when the folder has no image of its own); each may be given as a root of its own;
- suffixes are matched in any case (``a.JPG``, ``a.Tif``); hidden files (``.DS_Store``, macOS's
  ``._a.png``) and files with other suffixes (``Thumbs.db``) are not listed.

And when a sample is read: an unreadable file, an image and mask of different sizes (as read, upright;
both named, with both sizes), a float file with NaN or infinite values, or a file of several frames (an
animated GIF, PNG or WebP, a TIFF with several pages of one size), is a ``DataError`` naming the
file(s). A JPEG's further frames (MPO: a phone's preview or depth map) and TIFF pages of other sizes
(thumbnails, pyramid levels) are not refused: the first frame is read, as viewers show it.

``MaskFolderDataset.check_files`` finds unreadable files and size mismatches of a whole dataset before
any sample is read (``SegmentationDataModule`` runs it when it builds the datasets, so a corrupt file
stops a run before training starts): every file is opened (its header parsed), PNGs are walked chunk by
chunk with their checksums (``verify``, no decompression), a JPEG must end with its end-of-image marker
(else it is decoded at 1/8 scale to tell a truncated file from trailing bytes), other formats are
decoded in full; a failed check is confirmed by reading the file as a sample read would, so only files
that cannot be read are reported; files of several frames are refused as a read refuses them. Each
mask's size (upright) is compared with its image's. It reports every bad
file (``error``: one ``DataError`` line listing them) or drops the samples that have one (``skip``).

How files are read (``read_mask``, ``read_image``; the README says the same):

- orientation: a file with an EXIF orientation tag (a phone photo stored sideways) is turned upright,
  as image viewers, OpenCV's ``imread`` and annotation tools show it, images and masks alike; its mask
  must fit it as shown. An image stored sideways whose mask fits the stored pixels is a size mismatch
  that says so; one turned 180 degrees cannot be told from the sizes, so the first file with an
  orientation in each root gives an ``OrientationWarning``.
- masks: a mask with an alpha channel that varies (an RGBA or grey + alpha cut-out) is that channel,
  read as a grey mask below (transparent is background). Palette PNGs (VOC, DAVIS) are foreground
  where the palette index is not 0. Other masks are
  taken as grey levels (RGB masks by their grey level, 1-bit masks as 0 / 255) and a pixel is
  foreground when its value is above half the range (> 127 for 8-bit, > 32767 for 16-bit, > 0.5 for a
  float mask in [0, 1], > 127.5 for any other float mask); a mask with no value above half the range
  is foreground where it is not 0. So {0, 1}, {0, 255}, {0, 7} and any {0, v} mask is foreground at v,
  a soft, anti-aliased or JPEG mask is cut at half the range, and a label mask {0, 1, 2, ...} is
  foreground at every label.
- images: 8-bit files (RGB, grey, RGBA, palette, 1-bit, CMYK, ...) become RGB / 255 (alpha is
  dropped). 16-bit files (grey
  ``I;16``, or ``I`` with values in 0..65535) become value / 65535, as scikit-image's ``img_as_float``
  scales by the type's range (a 12-bit image in a 16-bit file is therefore dark, and warned about);
  16-bit RGB TIFFs are read at full precision when ``tifffile`` is installed, else at Pillow's 8 bits.
  Float files (``F``) already in [0, 1] are read as they are; others are mapped from their own
  [min, max] to [0, 1]; so are ``I`` files with values outside 0..65535. A grey image is repeated
  on the three channels.

``MaskFolderDataset`` warns once per dataset root (and once per data-loader worker process, which
has its own copy of the dataset) about the first mask, and the first image, whose values are unusual:
a mask that is not {0, 1} or {0, full range}, a float mask, negative values, a mask read from its
alpha channel; a 16-bit image with nothing above 4095, a float or 32-bit image mapped by its own range.
``ValueRangeWarning`` is its class.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from samflow.batch import POINT_LABEL_WORDS, bad_point_labels, image_placeholder
from samflow.data.bad_files import CHECK_THREADS, BadFile, FileHeader, OnBadSample, check_file, size_mismatch
from samflow.data.errors import DataError
from samflow.data.listing import (
    IMAGE_SUFFIXES,
    MASK_SUFFIXES,
    FolderSpec,
    Sample,
    find_samples,
    refuse_duplicate_ids,
    root_entries,
    short_listing,
)
from samflow.data.prompts import NoPrompt, PromptSampler, build_prompt
from samflow.data.reading import (
    TURNS,
    OrientationWarning,
    ValueRangeWarning,
    floating_dtype,
    header_size,
    read_image_with_note,
    read_mask_with_note,
)
from samflow.data.transforms import (
    IMAGE_RESIZES,
    ImageResize,
    ResizeMode,
    input_shape,
    scale_boxes,
    scale_coords,
    to_input_frame,
)
from samflow.seeding import stable_seed


def _check_labels(labels: torch.Tensor, sampler: PromptSampler, sample: Sample) -> None:
    """Refuse a sampler's point labels other than -1, 0, 1, naming the sampler and the sample (SAM gives
    such a point no label embedding, so it would shift the prompt without a word)."""
    bad = bad_point_labels(labels)
    if bad:
        raise DataError(
            f"Prompt sampler {sampler!r} drew point_labels {bad} for {sample.image}; a PromptSampler's "
            f"point_labels must hold {POINT_LABEL_WORDS}."
        )


class MaskFolderDataset(Dataset):
    """Image / mask pairs from one or several folder roots, brought into SAM's S x S input frame.

    Args:
        root: a dataset folder, a dict ``{"root": ..., "images": ..., "masks": ..., "image_suffixes": ...,
            "mask_suffixes": ...}`` overriding the arguments below for that root, or a list of those.
        images: image folder name under each root.
        masks: mask folder name under each root; ``None`` for images only (predict).
        image_suffixes: image file suffixes.
        mask_suffixes: mask file suffixes.
        prompt: prompt sampler or ``build_prompt`` spec, applied to the original-size mask.
        img_size: S, the side of the model's square input.
        resize_mode: ``"longest"`` (SAM's: resize the longest side, pad bottom/right) or ``"stretch"``.
        image_resize: ``"sam"`` (segment-anything's own Pillow resize, exact) or ``"bilinear"`` (torch's
            antialiased interpolation: faster, within one grey level); see ``samflow.data.transforms``.
        prompt_seed: ``None`` draws fresh prompts each time (training); an int seeds the prompt of
            each sample with ``(prompt_seed, its id)`` (``samflow.seeding.stable_seed``), so it is the same every
            epoch and whatever other files the dataset holds (validation, test).
        require_masks: when False, roots without a mask folder give images only (see ``find_samples``);
            such a dataset has no prompts (they are drawn from masks), whatever ``prompt`` says.
        unique_ids: refuse two different images with one id (one stem in two roots), naming both. Off
            only for predict data, where ``MaskWriter`` refuses them naming the mask file both would write.
        dtype: the floating dtype (or its name) of every float in an item: image, mask, points, box and
            mask prompt. ``torch.float64`` / ``"float64"`` keeps the pipeline in double precision.

    An item is a dict: ``image`` (3, S, S); ``mask`` (1, S, S) and ``gt_original`` bool (H, W) when there
    are masks; ``input_size`` and ``original_size`` long (2,); ``id``; ``path``; and the prompt in the
    S x S frame: ``points`` (K, 2) + ``point_labels`` long (K,), ``box`` (4,), ``mask_prompt``
    (1, S/4, S/4); floats are of ``dtype``. ``collate`` turns a list of items into a ``SamBatch``.
    """

    def __init__(
        self,
        root: FolderSpec,
        images: str = "images",
        masks: str | None = "masks",
        image_suffixes: Sequence[str] = IMAGE_SUFFIXES,
        mask_suffixes: Sequence[str] = MASK_SUFFIXES,
        prompt: PromptSampler | str | Mapping[str, Any] | None = None,
        img_size: int = 1024,
        resize_mode: ResizeMode = "longest",
        image_resize: ImageResize = "sam",
        prompt_seed: int | None = None,
        require_masks: bool = True,
        dtype: torch.dtype | str = torch.float32,
        unique_ids: bool = True,
    ) -> None:
        if resize_mode not in ("longest", "stretch"):
            raise ValueError(f"resize_mode must be 'longest' or 'stretch', got {resize_mode!r}.")
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"image_resize must be 'sam' or 'bilinear', got {image_resize!r}.")
        if img_size <= 0 or img_size % 4:
            raise ValueError(
                f"img_size must be a positive multiple of 4 (mask prompts are S/4); got {img_size}."
            )
        defaults = {
            "images": images,
            "masks": masks,
            "image_suffixes": image_suffixes,
            "mask_suffixes": mask_suffixes,
        }
        self.samples: list[Sample] = []
        entries = root_entries(root)
        self.roots = [Path(entry["root"]).expanduser() for entry in entries]
        self._warned: set[tuple[str, str]] = set()  # (root, "mask" / "image") already warned about
        for entry in entries:
            unknown = set(entry) - set(defaults) - {"root"}
            if unknown:
                raise DataError(
                    f"Folder spec {entry} has unknown keys {sorted(unknown)}; "
                    f"use 'root' and {sorted(defaults)}."
                )
            self.samples += find_samples(**{**defaults, **entry}, require_masks=require_masks)
        if unique_ids:
            refuse_duplicate_ids(self.samples)
        with_masks = {s.mask is not None for s in self.samples}
        if len(with_masks) > 1:
            raise DataError(f"Roots {root}: some have masks and some do not; give masks for all or for none.")
        self.has_masks = with_masks == {True}
        if require_masks and not self.has_masks:
            raise DataError(f"Roots {root} are set to have no masks (masks=None), but this split needs them.")
        # Prompts are drawn from masks: without masks there are none.
        self.prompt = build_prompt(prompt) if self.has_masks else NoPrompt()
        self.img_size = img_size
        self.resize_mode = resize_mode
        self.image_resize = image_resize
        self.prompt_seed = prompt_seed
        self.dtype = floating_dtype(dtype)
        self.check_seconds: float | None = None  # how long ``check_files`` took
        # False: items carry no pixels (``image_placeholder``) and image files are not decoded, only
        # their headers read for the size; set for a run whose encoder outputs come from an embedding
        # store when no plugin reads the image (``samflow.embed.check.skip_training_pixels``)
        self.pixels = True

    def __len__(self) -> int:
        return len(self.samples)

    def check_files(
        self,
        on_bad_sample: OnBadSample = "error",
        progress: Callable[[int], Any] | None = None,
        threads: int = CHECK_THREADS,
    ) -> list[BadFile]:
        """Check every image and mask file before any is read (see ``check_file``), and each mask's size.

        Args:
            on_bad_sample: ``"error"``: raise one ``DataError`` line listing up to 10 bad files (path and
                reason) and their count; ``"skip"``: drop the samples with a bad file (image and mask
                together) from ``samples`` and return the bad files, for the caller to report.
            progress: called with the number of files checked since the last call (a progress bar).
            threads: files checked at once.

        Returns:
            The bad files, in sample order (empty when every file is fine).
        """
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}.")
        paths = [p for s in self.samples for p in (s.image, s.mask) if p is not None]
        start = time.perf_counter()
        results: dict[Path, FileHeader | str] = {}
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for path, result in zip(paths, pool.map(check_file, paths), strict=True):
                results[path] = result
                if progress is not None:
                    progress(1)
        self.check_seconds = time.perf_counter() - start
        bad: list[BadFile] = []
        for sample in self.samples:
            image = results[sample.image]
            if isinstance(image, str):
                bad.append(BadFile(sample, sample.image, image))
            if sample.mask is None:
                continue
            mask = results[sample.mask]
            if isinstance(mask, str):
                bad.append(BadFile(sample, sample.mask, mask))
            elif not isinstance(image, str) and mask.size != image.size:
                mismatch = size_mismatch(sample.image, mask.size, image.size, image.orientation)
                reason = f"mask is {mismatch}: a mask must have its image's size"
                bad.append(BadFile(sample, sample.mask, reason))
        if not bad:
            return bad
        samples = {b.sample for b in bad}
        if on_bad_sample == "error":
            raise DataError(
                f"{len(bad)} of {len(paths)} files cannot be used ({len(samples)} of {len(self.samples)} "
                "samples; checked when the datasets were built, before any sample was read): "
                f"{short_listing(bad, sep='; ')}. "
                "Replace or remove these files (an image with its mask), or set data.on_bad_sample: skip "
                "to leave their samples out."
            )
        self.samples = [s for s in self.samples if s not in samples]
        return bad

    def _warn_once(self, kind: str, path: Path, note: str | None, turn: int = 1) -> None:
        """Warn about ``path``'s unusual values (``note``) and its EXIF orientation ``turn``, unless this
        root already had a warning of that sort for ``kind`` ("image" / "mask")."""
        under = [r for r in self.roots if path.is_relative_to(r)]
        root = str(max(under, key=lambda r: len(r.parts))) if under else ", ".join(map(str, self.roots))
        if note and (root, kind) not in self._warned:
            self._warned.add((root, kind))
            warnings.warn(
                f"Dataset root {root}: unusual {kind} values, first in {path}: {note}. Other {kind}s of "
                f"this root are read by the same rules without another warning (README: how masks and "
                f"images are read).",
                ValueRangeWarning,
                stacklevel=3,
            )
        if turn != 1 and (root, f"{kind} orientation") not in self._warned:
            self._warned.add((root, f"{kind} orientation"))
            warnings.warn(
                f"Dataset root {root}: {kind}s with an EXIF orientation are read upright, as viewers and "
                f"annotation tools show them; the first, {path}, is {TURNS[turn]} (orientation {turn}). "
                "Masks must fit the images as shown: a mask drawn on an image's stored pixels (by a tool "
                "that ignores the orientation) is misaligned (one per root; README: how masks and images "
                "are read).",
                OrientationWarning,
                stacklevel=3,
            )

    def _generator(self, sample: Sample) -> torch.Generator:
        """The generator of ``sample``'s prompt: from its id with ``prompt_seed`` (not from its position,
        which a file added before it shifts), else from the global / worker RNG (training, where
        ``ResumableLoader`` seeds that per epoch and index)."""
        if self.prompt_seed is None:
            seed = int(torch.randint(2**62, ()))
        else:
            seed = stable_seed(self.prompt_seed, sample.id)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = self.img_size
        item: dict[str, Any] = {"id": sample.id, "path": str(sample.image)}
        if self.pixels:
            # segment-anything's resize of an 8-bit image works on its uint8 values k (``sam_resize``
            # finds them again in k / 255, exactly for float32 / float64): resized and padded as uint8,
            # then divided by 255, the frame is the same to the bit, without the float passes over it
            codes = self.image_resize == "sam" and self.dtype in (torch.float32, torch.float64)
            image, note, turn = read_image_with_note(sample.image, self.dtype, codes=codes)  # (3, H, W)
            self._warn_once("image", sample.image, note, turn)
            original: tuple[int, int] = tuple(image.shape[-2:])  # type: ignore[assignment]
            frame, input_size = to_input_frame(image, size, self.resize_mode, self.image_resize)
            item["image"] = frame.to(self.dtype).div_(255) if frame.dtype == torch.uint8 else frame
        else:
            original, turn = header_size(sample.image), 1  # not decoded: nothing to warn about
            input_size = input_shape(*original, size, self.resize_mode)
            item["image"] = image_placeholder((3, size, size), self.dtype)
            item["pixels"] = False
        item["input_size"] = torch.tensor(input_size, dtype=torch.long)
        item["original_size"] = torch.tensor(original, dtype=torch.long)
        if sample.mask is None:
            return item
        gt, note, mask_turn = read_mask_with_note(sample.mask)  # (H, W) bool
        if tuple(gt.shape) != original:
            wh = (gt.shape[1], gt.shape[0]), (original[1], original[0])
            raise DataError(
                f"{sample.mask} is {size_mismatch(sample.image, *wh, turn)}; masks must have the image's size."
            )
        self._warn_once("mask", sample.mask, note, mask_turn)
        item["gt_original"] = gt
        item["mask"] = to_input_frame(gt[None].to(self.dtype), size, self.resize_mode, "nearest-exact")[0]
        prompt = self.prompt(gt, self._generator(sample))
        if "points" in prompt:
            _check_labels(prompt["point_labels"], self.prompt, sample)
            item["points"] = scale_coords(prompt["points"].to(self.dtype), original, input_size)
            item["point_labels"] = prompt["point_labels"]
        if "box" in prompt:
            item["box"] = scale_boxes(prompt["box"].to(self.dtype), original, input_size)
        if "mask_prompt" in prompt:
            coarse = prompt["mask_prompt"][None].to(self.dtype)  # (1, H, W)
            full = to_input_frame(coarse, size, self.resize_mode, "nearest-exact")[0]  # (1, S, S)
            low = F.interpolate(full[None], size=(size // 4, size // 4), mode="area")[0]
            item["mask_prompt"] = (low > 0.5).to(self.dtype)  # (1, S/4, S/4)
        return item
