"""Geometry of SAM's input frame, and batch augmentation on the model's device.

The dataset brings every image into an S x S frame (S = ``img_size``) on the CPU:

- ``"longest"`` (SAM's own preprocessing): scale by ``S / max(H, W)`` so the longest side becomes S,
  the other ``int(side * scale + 0.5)``, then zero-pad at the bottom and right;
- ``"stretch"``: resize to S x S, ignoring the aspect ratio (as some adaptation papers do).

Images are resized as segment-anything resizes them by default (``image_resize="sam"``): Pillow's
bilinear filter (antialiased when shrinking) on the 8-bit image, the result still 8-bit, exactly
``ResizeLongestSide.apply_image``. An image that is not 8-bit (16-bit, float) goes through the same
filter per channel in 32-bit float, without rounding to 8 bits. ``image_resize="bilinear"`` is the fast
path: one antialiased bilinear ``torch.nn.functional.interpolate`` on the tensor's device (a GPU too),
within one grey level of Pillow's. Masks are resized with nearest neighbour (``nearest-exact``, which
samples pixel centres). Prompt coordinates follow segment-anything's ``ResizeLongestSide``: a point
``(x, y)`` in pixels of the original image becomes ``(x * w / W, y * h / H)`` where ``(h, w)`` is the
resized size before padding (``input_size``).

``GpuAugment`` then augments a collated batch on the device with kornia, moving image, mask, mask
prompt, boxes and points together.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from kornia.augmentation.container.params import ParamItem
from PIL import Image
from torch import Tensor

from samflow.batch import SamBatch
from samflow.data.augment import BatchAugment
from samflow.seeding import cpu_seeded, derived_seed, image_keys, stable_seed

ResizeMode = Literal["longest", "stretch"]
#: How images are resized: ``"sam"`` (segment-anything's Pillow resize, the default) or ``"bilinear"``
#: (torch's antialiased bilinear interpolation, on any device).
ImageResize = Literal["sam", "bilinear"]
IMAGE_RESIZES = ("sam", "bilinear")


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling so that the longest side is ``size``, rounded as segment-anything does."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def input_shape(height: int, width: int, size: int, resize_mode: ResizeMode) -> tuple[int, int]:
    """The resized (h, w) before padding of an (height, width) image in the given mode."""
    if resize_mode == "longest":
        return longest_side_shape(height, width, size)
    if resize_mode == "stretch":
        return size, size
    raise ValueError(f"resize_mode must be 'longest' or 'stretch', got {resize_mode!r}.")


def _resize(x: Tensor, shape: tuple[int, int], mode: str) -> Tensor:
    """Resize a (C, H, W) or (B, C, H, W) tensor, keeping its dtype.

    ``mode``: ``"sam"`` (Pillow, see ``sam_resize``), ``"bilinear"`` (antialiased) or any other mode of
    ``F.interpolate`` (``"nearest-exact"`` for masks).
    """
    if mode == "sam":
        return sam_resize(x, shape)
    unbatched = x.dim() == 3
    y = x[None] if unbatched else x
    dtype = y.dtype
    if not y.is_floating_point():
        y = y.float()
    if mode == "bilinear":
        y = F.interpolate(y, size=shape, mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(y, size=shape, mode=mode)
    y = y.to(dtype)
    return y[0] if unbatched else y


def sam_resize(image: Tensor, shape: tuple[int, int]) -> Tensor:
    """Resize (C, H, W) or (B, C, H, W) to ``shape`` (h, w) as segment-anything does, on the CPU.

    segment-anything's ``ResizeLongestSide.apply_image`` resizes the uint8 image with Pillow's bilinear
    filter (torchvision's ``resize`` of a PIL image). A uint8 tensor, or a float one in [0, 1] that holds
    8-bit values (``k / 255``, as ``read_image`` gives for 8-bit files), takes exactly that path and
    comes back in its dtype (``k / 255``); any other float image is resized channel by channel in
    Pillow's 32-bit float mode with the same filter, so 16-bit and float images keep their precision.
    The result is on ``image``'s device.
    """
    if image.dim() == 4:
        return torch.stack([sam_resize(one, shape) for one in image])
    h, w = shape
    if tuple(image.shape[-2:]) == (h, w):
        return image.clone()
    array = image.detach().cpu()
    if array.dtype == torch.uint8:
        codes: Tensor | None = array
    else:
        # float32 is exact enough to tell 8-bit values (k / 255 * 255 is within 1e-5 of k)
        scaled = array.to(torch.promote_types(array.dtype, torch.float32)) * 255
        rounded = scaled.round()
        codes = (
            rounded.to(torch.uint8)
            if bool(((scaled - rounded).abs() < 1e-3).all())
            and bool(((rounded >= 0) & (rounded <= 255)).all())
            else None
        )
    if codes is not None:
        planes = [np.ascontiguousarray(c) for c in codes.numpy()] if codes.shape[0] != 3 else None
        if planes is None:  # RGB, as segment-anything hands Pillow the image
            rgb = Image.fromarray(np.ascontiguousarray(codes.permute(1, 2, 0).numpy()))
            out = np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        else:
            out = np.stack(
                [np.asarray(Image.fromarray(p).resize((w, h), Image.Resampling.BILINEAR)) for p in planes]
            )
        result = torch.from_numpy(out.copy())
        if image.dtype != torch.uint8:
            result = result.to(image.dtype) / 255
    else:
        planes = [
            np.asarray(Image.fromarray(c.float().numpy()).resize((w, h), Image.Resampling.BILINEAR))
            for c in array
        ]
        result = torch.from_numpy(np.stack(planes)).to(image.dtype)
    return result.to(image.device)


def resize_longest_side(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Resize (C, H, W) or (B, C, H, W) so its longest side is ``size``, keeping the aspect ratio.

    Args:
        x: the image or mask.
        size: target length of the longest side.
        mode: ``"sam"`` (segment-anything's Pillow resize, for images), ``"bilinear"`` (antialiased, the
            fast path for images) or ``"nearest-exact"`` (for masks).

    Returns:
        The resized tensor, (..., h, w) with ``(h, w) = longest_side_shape(H, W, size)``.
    """
    return _resize(x, longest_side_shape(x.shape[-2], x.shape[-1], size), mode)


def stretch(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Resize (C, H, W) or (B, C, H, W) to ``size x size``, ignoring the aspect ratio."""
    return _resize(x, (size, size), mode)


def pad_to_square(x: Tensor, size: int, value: float = 0.0) -> Tensor:
    """Pad (..., h, w) with ``value`` at the bottom and right to (..., size, size)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"pad_to_square: input {h}x{w} is larger than {size}x{size}.")
    return F.pad(x, (0, size - w, 0, size - h), value=value)


def to_input_frame(
    x: Tensor, size: int, resize_mode: ResizeMode = "longest", mode: str = "bilinear"
) -> tuple[Tensor, tuple[int, int]]:
    """Bring (C, H, W) into the S x S model frame; returns the result and ``input_size`` (h, w)."""
    shape = input_shape(x.shape[-2], x.shape[-1], size, resize_mode)
    return pad_to_square(_resize(x, shape, mode), size), shape


def scale_coords(coords: Tensor, original_size: Sequence[int], input_size: Sequence[int]) -> Tensor:
    """Map (..., 2) xy pixel coordinates from the original (H, W) image to the resized (h, w) one."""
    (height, width), (h, w) = original_size, input_size
    # multiplied by Python numbers: no factor tensor copied from the host (a GPU sync per call)
    return torch.stack([coords[..., 0] * (w / width), coords[..., 1] * (h / height)], dim=-1)


def scale_boxes(boxes: Tensor, original_size: Sequence[int], input_size: Sequence[int]) -> Tensor:
    """Map (..., 4) xyxy boxes from the original (H, W) image to the resized (h, w) one."""
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)  # (..., 2 corners, xy)
    return scale_coords(corners, original_size, input_size).reshape(boxes.shape)


def _augment_seed(key: tuple[int | str, ...]) -> int:
    """The seed of an image's augmentation from its key (``image_keys``): for a sample seed, a stream of
    its own, apart from the one its prompt was drawn from while it was read (``SeededSamples`` seeds
    that with ``sample_seed`` itself); for an id key, the key's ``"augment"`` stream."""
    if len(key) == 1 and isinstance(key[0], int):
        return derived_seed(key[0], 0x617567)
    return stable_seed(*key, "augment")


class GpuAugment(BatchAugment):
    """Augment a collated batch on its device with kornia, keeping every spatial key consistent.

    Geometric steps (flips, rotation and scale jitter, in that order, one ``RandomAffine`` for the last
    two) move ``image``, ``mask``, ``mask_prompt``, ``box`` and ``points`` together through one
    ``kornia.augmentation.AugmentationSequential``; the colour step touches only the image. Large-scale
    jitter as in HQ-SAM is ``scale=(0.1, 2.0)`` with ``translate=0.5``: the S x S frame is zoomed about its
    centre by a random factor (same on both axes), shifted, cropped to S x S and zero-filled.

    After a geometric step the batch describes the augmented S x S frame: ``input_size`` and
    ``original_size`` become (S, S) and ``gt_original`` the augmented masks, so postprocessing and
    metrics stay consistent. Boxes become the axis-aligned enclosure of their moved corners clipped to
    the frame (``has_box`` turns False for a box moved out of it); points that leave the frame get label
    -1. Inputs are not modified in place.

    Each image's transform (flips, affine, colour) is drawn from its own ``sample_seed``, which
    ``ResumableLoader`` gives every training item from (run seed, epoch, index): an image is augmented
    alike alone or in any batch, at any place in it, on any DDP rank (ranks share the process
    generator's state, so one draw per batch would transform every rank's i-th image alike), and in a
    resumed run. A batch without seeds (another loader) keys each image's draw by its ``batch.id``, the
    run's seed (``torch.initial_seed()``) and the epoch (``set_epoch``, which ``SegmentationDataModule``
    calls before it augments a training batch; without it, such a batch gets a warning once), as
    ``ForwardContext.rand`` does (``samflow.seeding.image_keys``); only a
    batch with neither seeds nor ids takes one draw from the global generator.

    A two-resolution batch (``context_image`` / ``context_mask``, WSI-SAM) gets the same flip and the
    same colour draw on its context view; concentric views stay concentric under flips, so
    ``context_affine`` holds. The affine step (rotation, scale, translate) is refused for such batches.

    Args:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotation: maximal rotation in degrees (uniform in ``[-rotation, rotation]``).
        scale: ``(min, max)`` zoom factor, e.g. ``(0.1, 2.0)`` for large-scale jitter; ``None`` for none.
        translate: maximal shift as a fraction of S on each axis.
        affine_p: probability of applying the rotation / scale / translation step.
        color_jitter: a float ``c`` jitters brightness, contrast and saturation by up to ``c``; a tuple
            gives (brightness, contrast, saturation, hue) as kornia's ``ColorJitter``.
        color_p: probability of the colour step.
    """

    def __init__(
        self,
        hflip: float = 0.0,
        vflip: float = 0.0,
        rotation: float = 0.0,
        scale: tuple[float, float] | None = None,
        translate: float = 0.0,
        affine_p: float = 1.0,
        color_jitter: float | tuple[float, float, float, float] = 0.0,
        color_p: float = 1.0,
    ) -> None:
        super().__init__()
        geometric: list[K.RandomHorizontalFlip | K.RandomVerticalFlip | K.RandomAffine] = []
        if hflip > 0:
            geometric.append(K.RandomHorizontalFlip(p=hflip))
        if vflip > 0:
            geometric.append(K.RandomVerticalFlip(p=vflip))
        if rotation > 0 or scale is not None or translate > 0:
            geometric.append(
                K.RandomAffine(
                    degrees=rotation,
                    translate=(translate, translate) if translate > 0 else None,
                    scale=(float(scale[0]), float(scale[1])) if scale is not None else None,
                    p=affine_p,
                )
            )
        self.has_affine = bool(geometric) and isinstance(geometric[-1], K.RandomAffine)
        self.geometric = K.AugmentationSequential(*geometric, data_keys=None) if geometric else None
        cj = (color_jitter,) * 3 + (0.0,) if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(cj) != 4:
            raise ValueError(f"GpuAugment: color_jitter must be a float or 4 floats, got {color_jitter}.")
        self.color = K.ColorJitter(*cj, p=color_p) if any(v > 0 for v in cj) else None
        # None until set_epoch: an image keyed by its id would draw alike every epoch (warned once)
        self.epoch: int | None = None
        self._warned_epoch = False

    def set_epoch(self, epoch: int) -> None:
        """The training epoch, part of the key of an image without a sample seed (see the class)."""
        self.epoch = int(epoch)

    def forward(self, batch: SamBatch) -> SamBatch:
        """Return an augmented copy of ``batch`` (one prompt row per image)."""
        # ``image_index_host``: the rows' images known on the host, so the check waits for no device
        if batch.num_rows != batch.num_images or batch.image_index_host != list(range(batch.num_images)):
            raise ValueError(
                "GpuAugment moves prompts with their image and needs one prompt row per image, in order; "
                f"this batch has {batch.num_rows} rows for {batch.num_images} images."
            )
        if batch.context_image is not None and self.has_affine:
            raise ValueError(
                "GpuAugment: a two-resolution batch (context_image, WSI-SAM) takes flips and colour jitter only; "
                "rotation, scale and translate would break the concentric geometry (context_affine). Set them "
                "to 0 / null in data.init_args.augment."
            )
        if self.geometric is not None:
            batch = self._geometric(batch)
        if self.color is not None:
            batch = self._colour(batch)
        return batch

    def _each(self, batch: SamBatch, draw: Any, channels: int) -> list[Any] | None:
        """``draw(shape)`` of one image for each image of the batch, each from its own seed: its
        ``SamBatch.sample_seed`` (``ResumableLoader`` gives training batches one), else its id with the
        run's seed and ``epoch`` (``image_keys``). An image's transform then depends on neither its batch,
        its place in it, the process (DDP ranks share one global generator, so they would all draw
        alike) nor what ran before. None when the batch has neither seeds nor ids: one draw for the
        batch from the global generator then."""
        keys = image_keys(batch.sample_seed, batch.id, batch.num_images, training=True, epoch=self.epoch or 0)
        if keys is None:
            return None
        if len(batch.sample_seed) != batch.num_images and self.epoch is None and not self._warned_epoch:
            self._warned_epoch = True
            warnings.warn(
                "GpuAugment: this batch has no sample seeds, so each image's transform is keyed by its id, "
                "the run's seed and the epoch, but set_epoch was never called: every epoch would transform "
                "an image alike. Call augment.set_epoch(trainer.current_epoch) before augmenting a training "
                "batch (samflow's data modules do), or give the batches sample seeds (ResumableLoader).",
                stacklevel=3,
            )
        shape = torch.Size([1, channels, *batch.image.shape[2:]])
        drawn = []
        for key in keys:
            with cpu_seeded(_augment_seed(key)):  # kornia draws its parameters on the CPU
                drawn.append(draw(shape))
        return drawn

    def _geometric_params(self, batch: SamBatch, channels: int) -> list[ParamItem] | None:
        """Each image's flip / affine parameters from its own seed, merged into one batch's (kornia
        draws every parameter for every image, applied or not, so the rows line up); None: draw them
        in the call."""
        assert self.geometric is not None
        each = self._each(batch, self.geometric.forward_parameters, channels)
        if each is None:
            return None
        full = torch.tensor([batch.num_images, channels, *batch.image.shape[2:]])
        merged = []
        for steps in zip(*each):
            data = {
                key: full if key == "forward_input_shape" else torch.cat([step.data[key] for step in steps])
                for key in steps[0].data
            }
            merged.append(ParamItem(steps[0].name, data))
        return merged

    def _colour(self, batch: SamBatch) -> SamBatch:
        """The colour step; a context view takes its image's draw. Images with their own draws go one
        by one: kornia's ``ColorJitter`` applies one order of its four operations to a whole call."""
        assert self.color is not None
        color, context = self.color, batch.context_image
        each = self._each(batch, color.forward_parameters, 3)
        if each is None:  # one draw for the batch, the draw ``color(batch.image)`` would make
            drawn = color.forward_parameters(batch.image.shape)
            image = color(batch.image, params=drawn)
            view = None if context is None else color(context, params=drawn)
        else:
            image = torch.cat([color(batch.image[i : i + 1], params=p) for i, p in enumerate(each)])
            view = (
                None
                if context is None
                else torch.cat([color(context[i : i + 1], params=p) for i, p in enumerate(each)])
            )
        changes = {"image": image.clamp(0, 1)}
        if view is not None:
            changes["context_image"] = view.clamp(0, 1)
        return batch.replace(**changes)

    def _geometric(self, batch: SamBatch) -> SamBatch:
        image = batch.image  # (B, 3, S, S)
        b, _, size, _ = image.shape
        # concentric views: a flip of both frames keeps the geometry; stacked as channels, one draw
        context, context_mask = batch.context_image, batch.context_mask
        inputs: dict[str, Tensor] = {"image": image if context is None else torch.cat([image, context], 1)}
        if batch.mask is not None:
            both = context is not None and context_mask is not None
            inputs["mask"] = (
                torch.cat([batch.mask, context_mask], 1) if context_mask is not None and both else batch.mask
            )
        if batch.mask_prompt is not None:  # (B, 1, S/4, S/4) -> S x S so it shares the image's transform
            inputs["mask_prompt"] = F.interpolate(batch.mask_prompt, size=(size, size), mode="nearest")
        if batch.box is not None:
            inputs["bbox_xyxy"] = batch.box[:, None]  # (B, 1, 4)
        if batch.points is not None:
            inputs["keypoints"] = batch.points  # (B, K, 2)
        assert self.geometric is not None  # only called when there is a geometric step
        params = self._geometric_params(batch, inputs["image"].shape[1])
        out = self.geometric(inputs) if params is None else self.geometric(inputs, params=params)
        changes: dict[str, Any] = {"image": out["image"][:, :3]}
        if context is not None:
            changes["context_image"] = out["image"][:, 3:]
        if batch.mask is not None:
            moved_masks = (out["mask"] > 0.5).to(batch.mask.dtype)
            mask = moved_masks[:, :1]
            changes.update(mask=mask, gt_original=list(mask[:, 0] > 0.5))
            if moved_masks.shape[1] > 1:
                changes["context_mask"] = moved_masks[:, 1:]
        if batch.mask_prompt is not None:
            low = batch.mask_prompt.shape[-2:]
            moved = F.interpolate(out["mask_prompt"], size=low, mode="area") > 0.5
            changes["mask_prompt"] = moved.to(batch.mask_prompt.dtype)
        if batch.box is not None:
            boxes = out["bbox_xyxy"][:, 0]  # (B, 4)
            inside = (boxes[:, 2:] >= 0).all(-1) & (boxes[:, :2] <= size - 1).all(-1)  # (B,) meets the frame
            has_box = batch.box_valid()
            assert has_box is not None
            changes.update(box=boxes.clamp(0, size - 1), has_box=has_box & inside)
        if batch.points is not None and batch.point_labels is not None:
            points = out["keypoints"]
            inside = ((points >= 0) & (points <= size - 1)).all(dim=-1)  # (B, K)
            changes.update(points=points, point_labels=torch.where(inside, batch.point_labels, -1))
        frame = torch.tensor([size, size], dtype=torch.long, device=image.device).expand(b, 2).clone()
        changes.update(input_size=frame, original_size=frame.clone())
        return batch.replace(**changes)
