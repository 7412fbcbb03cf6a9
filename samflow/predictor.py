"""``Predictor``: a trained samflow model on new images with a user's boxes and points.

It has segment-anything's ``SamPredictor`` interface, so switching is a one-line change::

    from samflow import Predictor

    predictor = Predictor.from_run("runs/quickstart/version_0")  # was: SamPredictor(sam)
    predictor.set_image(image)                                   # H x W x 3 uint8, RGB
    masks, scores, low_res_logits = predictor.predict(box=np.array([10, 20, 200, 240]))

``from_run`` / ``from_checkpoint`` read the resolved ``config.yaml`` a run wrote, rebuild SAM and the
plugins (``model.sam``, ``model.plugins``), load the checkpoint's weights (the frozen SAM comes from
``model.sam.checkpoint`` or ``sam_checkpoint=``) and the input geometry (``data.resize_mode``,
``data.image_resize``); ``from_export`` loads a ``samflow export`` folder (``samflow.export``).

With no plugins it equals ``SamPredictor`` on the same SAM: the image is resized as
``ResizeLongestSide.apply_image`` does (``image_resize="sam"``), prompts are mapped as ``apply_coords`` /
``apply_boxes``, and masks are upsampled as ``Sam.postprocess_masks``. ``encode`` / ``decode`` split
the two stages, so a GUI encodes an image once and decodes many prompts.

With plugins, ``predict`` returns what the model predicts: SAM's masks (1 or, with
``multimask_output``, 3 per prompt, scored by SAM's IoU head), or, when a plugin chooses the prediction
(``select``: HQ-SAM, ExtraTokens with ``predict``), that one mask per prompt, scored by SAM's IoU
prediction of the token SAM's own rule picks. As in ``SamPredictor``, ``multimask_output`` is also the
rule of that call (token 0, or the best of tokens 1..3); ``multimask_output=None`` takes the model's
own rule (``model.sam.multimask_output`` of its training) and gives one mask per prompt, the one
validation scored: ``samflow predict --prompts`` and ``predict_tiled`` predict that way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from samflow.batch import SamBatch
from samflow.data.transforms import (
    IMAGE_RESIZES,
    ImageResize,
    ResizeMode,
    input_shape,
    pad_to_square,
    resize_longest_side,
    sam_resize,
    scale_boxes,
    scale_coords,
    stretch,
)
from samflow.module import SAM_PREFIX, SamSpec
from samflow.plugins import PluginStack, SamPlugin
from samflow.plugins.registry import discover
from samflow.sam import (
    CheckpointError,
    DecoderContext,
    EncodedImages,
    ForwardContext,
    HookedSam,
    SamOutput,
    build_sam,
)

__all__ = [
    "ImageEncoding",
    "InputTransform",
    "Predictor",
    "PredictorError",
    "build_model",
    "chosen_masks",
    "read_run_config",
    "run_files",
]


class PredictorError(ValueError):
    """A run folder, checkpoint or image cannot be used for prediction; the message names it."""


@dataclass
class ImageEncoding:
    """One image after the image encoder: everything ``Predictor.decode`` needs.

    Attributes:
        image: the image in the model's frame (1, 3, S, S), in [0, 1].
        input_size: (h, w) of the resized image before padding.
        original_size: (H, W) of the image given.
        encoded: the encoder's results (embeddings, block features plugins read, dense PE).
        state: what encoder-side hooks left in ``ForwardContext.state``; each decode starts from a copy.
    """

    image: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    encoded: EncodedImages
    state: dict[str, dict[str, Any]]


class InputTransform:
    """Original-image pixels -> the model's S x S frame, as ``ResizeLongestSide`` (or a stretch).

    ``apply_coords`` / ``apply_boxes`` (numpy) and ``apply_coords_torch`` / ``apply_boxes_torch`` have
    ``ResizeLongestSide``'s signatures, so code written for ``SamPredictor.transform`` runs unchanged.
    """

    def __init__(self, size: int, resize_mode: ResizeMode = "longest") -> None:
        self.size = size
        self.resize_mode = resize_mode

    def input_size(self, original_size: tuple[int, ...]) -> tuple[int, int]:
        """(h, w) of an (H, W) image after resizing, before padding."""
        return input_shape(int(original_size[0]), int(original_size[1]), self.size, self.resize_mode)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 2) xy in original pixels -> the resized frame (float64, as segment-anything)."""
        (height, width), (h, w) = original_size[:2], self.input_size(original_size)
        return np.asarray(coords, dtype=np.float64) * np.array([w / width, h / height])

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """(..., 4) xyxy boxes in original pixels -> (N, 4) in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: Tensor, original_size: tuple[int, ...]) -> Tensor:
        return scale_coords(coords.float(), original_size[:2], self.input_size(original_size))

    def apply_boxes_torch(self, boxes: Tensor, original_size: tuple[int, ...]) -> Tensor:
        return scale_boxes(boxes.float(), original_size[:2], self.input_size(original_size)).reshape(-1, 4)


class Predictor:
    """Predict masks for prompts on one image at a time with a (trained) ``HookedSam``.

    Args:
        model: SAM and its plugins (weights loaded); put in eval mode and moved to ``device``.
        device: where to run; default CUDA when available, else the CPU.
        resize_mode: the geometry the model was trained with: ``"longest"`` (SAM's) or ``"stretch"``.
        image_resize: ``"sam"`` (segment-anything's Pillow resize on the CPU, exact) or ``"bilinear"``
            (torch's antialiased interpolation on ``device``: faster for large images on a GPU,
            within one grey level of SAM's).
        mask_threshold: logit above which a pixel is foreground (SAM's ``mask_threshold``, 0.0).
    """

    def __init__(
        self,
        model: HookedSam,
        *,
        device: str | torch.device | None = None,
        resize_mode: ResizeMode = "longest",
        image_resize: ImageResize = "sam",
        mask_threshold: float = 0.0,
    ) -> None:
        if image_resize not in IMAGE_RESIZES:
            raise PredictorError(f"image_resize must be one of {IMAGE_RESIZES}, got {image_resize!r}.")
        if resize_mode not in ("longest", "stretch"):
            raise PredictorError(f"resize_mode must be 'longest' or 'stretch', got {resize_mode!r}.")
        self.model = model.eval().to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.model.encoder_cache = None  # one image at a time; encode() is the cache
        self.resize_mode: ResizeMode = resize_mode
        self.image_resize: ImageResize = image_resize
        self.mask_threshold = mask_threshold
        self.transform = InputTransform(model.img_size, resize_mode)
        self.encoding: ImageEncoding | None = None

    # ---- building from what training wrote ----
    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        checkpoint: str | Path | None = None,
        sam_checkpoint: str | Path | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """The model of a run folder (``runs/<experiment>/version_N``).

        Args:
            run_dir: the folder ``samflow fit`` wrote (``config.yaml``, ``checkpoints/``).
            checkpoint: a file name in ``checkpoints/`` or a path; default ``last.ckpt``, else the only
                checkpoint there.
            sam_checkpoint: the SAM file to use instead of the config's ``model.sam.checkpoint``.
            kwargs: ``Predictor`` options (``device``, ``image_resize``, ...), over the run's.
        """
        ckpt, config = run_files(run_dir, checkpoint)
        return cls.from_checkpoint(ckpt, config=config, sam_checkpoint=sam_checkpoint, **kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        *,
        config: str | Path | None = None,
        sam_checkpoint: str | Path | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """The model of a Lightning checkpoint written by ``samflow fit``.

        Args:
            checkpoint: the ``.ckpt`` file.
            config: the run's resolved ``config.yaml``; default: the run folder's (the checkpoint's
                ``../config.yaml`` when it lies in ``checkpoints/``).
            sam_checkpoint: the SAM file instead of the config's ``model.sam.checkpoint``.
            kwargs: ``Predictor`` options, over the run's.
        """
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_file():
            raise FileNotFoundError(f"Checkpoint {str(ckpt)!r} does not exist.")
        if config is None:
            config = run_files(ckpt)[1]
        settings = read_run_config(config)
        model = build_model(settings["model"], sam_checkpoint=sam_checkpoint)
        load_trained_state(model, read_checkpoint_state(ckpt), str(ckpt))
        return cls(model, **{**settings["predictor"], **kwargs})

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        *,
        sam_checkpoint: str | Path | None = None,
        force: bool = False,
        **kwargs: Any,
    ) -> Predictor:
        """The model of a ``samflow export`` folder (see ``samflow.export.load_export``)."""
        from samflow.export import load_export

        model, options = load_export(folder, sam_checkpoint=sam_checkpoint, force=force)
        return cls(model, **{**options, **kwargs})

    # ---- SamPredictor's interface ----
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_image_set(self) -> bool:
        return self.encoding is not None

    @property
    def original_size(self) -> tuple[int, int]:
        return self._current().original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self._current().input_size

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode ``image`` (H x W x 3 uint8) for the following ``predict`` calls."""
        self.encoding = self.encode(image, image_format)

    def reset_image(self) -> None:
        """Forget the current image."""
        self.encoding = None

    def get_image_embedding(self) -> Tensor:
        """The current image's embedding (1, C, h, w)."""
        return self._current().encoded.embeddings

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool | None = True,
        return_logits: bool = False,
        *,
        encoding: ImageEncoding | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for one prompt on the current image, as ``SamPredictor.predict``.

        Args:
            point_coords: (K, 2) xy in the original image's pixels.
            point_labels: (K,) 1 foreground, 0 background.
            box: (4,) xyxy in the original image's pixels.
            mask_input: (1, h, w) low-resolution logits of an earlier prediction.
            multimask_output: three masks (SAM's tokens 1..3) instead of one (token 0); None: one, the
                model's own prediction by the rule it was trained with (module docstring).
            return_logits: logits instead of boolean masks.
            encoding: an ``encode`` result to predict on instead of the image ``set_image`` set.

        Returns:
            ``(masks (C, H, W), scores (C,), low_res_logits (C, h, w))`` as numpy arrays.
        """
        encoding = encoding if encoding is not None else self._current()
        if point_coords is not None and point_labels is None:
            raise PredictorError("point_labels must be given with point_coords.")
        dev = self.device
        points = labels = boxes = masks_in = None
        if point_coords is not None and point_labels is not None:
            coords = self.transform.apply_coords(point_coords, encoding.original_size)
            points = torch.as_tensor(coords, dtype=torch.float, device=dev)[None]
            labels = torch.as_tensor(point_labels, dtype=torch.long, device=dev)[None]
        if box is not None:
            boxes = torch.as_tensor(
                self.transform.apply_boxes(box, encoding.original_size), dtype=torch.float
            )
            boxes = boxes.to(dev)
        if mask_input is not None:
            masks_in = torch.as_tensor(mask_input, dtype=torch.float, device=dev)[None]
        masks, scores, low = self.decode(
            encoding, points, labels, boxes, masks_in, multimask_output, return_logits
        )
        return masks[0].cpu().numpy(), scores[0].float().cpu().numpy(), low[0].float().cpu().numpy()

    def predict_torch(
        self,
        point_coords: Tensor | None,
        point_labels: Tensor | None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool | None = True,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """B prompts on the current image, already in the model's frame (``transform.apply_*_torch``).

        Args:
            point_coords: (B, K, 2); point_labels: (B, K); boxes: (B, 4); mask_input: (B, 1, h, w).

        Returns:
            ``(masks (B, C, H, W), scores (B, C), low_res_logits (B, C, h, w))`` as tensors.
        """
        return self.decode(
            self._current(), point_coords, point_labels, boxes, mask_input, multimask_output, return_logits
        )

    # ---- encode once, decode many ----
    @torch.inference_mode()
    def encode(self, image: np.ndarray | Tensor, image_format: str = "RGB") -> ImageEncoding:
        """Run the image encoder (with the plugins' encoder hooks) on one H x W x 3 uint8 image."""
        if image_format not in ("RGB", "BGR"):
            raise PredictorError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}.")
        array = image.cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise PredictorError(
                f"set_image takes an H x W x 3 uint8 array, got {array.dtype} of shape {array.shape}."
            )
        if image_format == "BGR":
            array = array[..., ::-1]
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # e.g. np.asarray(PIL image): torch wants its own copy
            array = array.copy()
        pixels = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W) uint8
        original = (int(pixels.shape[1]), int(pixels.shape[2]))
        shape = self.transform.input_size(original)
        size = self.model.img_size
        if self.image_resize == "sam":
            resized = sam_resize(pixels, shape).to(self.device, torch.float32) / 255
        else:
            x = pixels.to(self.device, torch.float32) / 255
            resized = resize_longest_side(x, size) if self.resize_mode == "longest" else stretch(x, size)
        frame = pad_to_square(resized, size)[None]  # (1, 3, S, S)
        batch = SamBatch(
            image=frame,
            input_size=torch.tensor([shape], device=self.device),
            original_size=torch.tensor([original], device=self.device),
        )
        ctx = self.model.context(batch)
        encoded = self.model.encode(ctx)
        return ImageEncoding(frame, shape, original, encoded, ctx.state)

    @torch.inference_mode()
    def decode(
        self,
        encoding: ImageEncoding,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool | None = True,
        return_logits: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt encoder, mask decoder and plugins for B prompts (model frame) on an encoded image.

        Returns ``(masks (B, C, H, W), scores (B, C), low_res_logits (B, C, h, w))``.
        """
        rows = next((len(t) for t in (point_coords, boxes, mask_input) if t is not None), 1)
        dev = self.device
        batch = SamBatch(
            image=encoding.image,
            input_size=torch.tensor([encoding.input_size], device=dev),
            original_size=torch.tensor([encoding.original_size], device=dev),
            image_index=torch.zeros(rows, dtype=torch.long, device=dev),
            points=None if point_coords is None else point_coords.to(dev, torch.float),
            point_labels=None if point_labels is None else point_labels.to(dev, torch.long),
            box=None if boxes is None else boxes.to(dev, torch.float).reshape(rows, 4),
            mask_prompt=None if mask_input is None else mask_input.to(dev, torch.float),
        )
        ctx = ForwardContext(
            sam=self.model.sam,
            batch=batch,
            # the rule plugins follow (HQ-SAM's sam_hq): the call's, or with None the model's own
            multimask_output=self.model.multimask_output if multimask_output is None else multimask_output,
            state={key: dict(value) for key, value in encoding.state.items()},
        )
        out = self.model.decode(DecoderContext.after_encoder(ctx, encoding.encoded))
        low, scores = chosen_masks(self.model, out, multimask_output)
        masks = self.postprocess(low, encoding.input_size, encoding.original_size)
        return (masks if return_logits else masks > self.mask_threshold), scores, low

    def predict_tiled(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        *,
        tile: int | None = None,
        overlap: int | None = None,
        multimask_output: bool | None = None,
        return_logits: bool = False,
        image_format: str = "RGB",
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """N prompts on an image larger than the model's input, window by window.

        The image is cut into ``tile`` x ``tile`` windows (default: the model's input side, so a window
        is not shrunk) that overlap by ``overlap`` pixels (default ``tile // 4``); the last window of
        a row or column ends at the image's edge. Each prompt goes to every window that contains it
        whole (its box, or all its points); each such window is encoded once for all its prompts.
        A prompt's logits from several windows are blended with weights that fall linearly to 0 over
        the overlap at a window's inner edges (1 at the image's own edges); outside its windows a
        prompt's logits are ``-inf``. An image no larger than one window is one window: the result is
        then ``predict``'s (to float rounding: the prompts are decoded as one batch). Only one window's
        encoder state is held at a time; the outputs are N full-size maps.

        Args:
            image: H x W x 3 uint8.
            boxes: (N, 4) xyxy in the image's pixels; point_coords (N, K, 2), point_labels (N, K).
            tile, overlap: window side and overlap in the image's pixels.
            multimask_output: as ``predict``; the default None gives each prompt the model's own
                prediction (one mask).
            progress: show a progress bar over the windows (``samflow predict --prompts --tile`` does).

        Returns:
            ``(masks (N, C, H, W), scores (N, C))``: boolean masks (logits with ``return_logits``), and
            each prompt's scores averaged over its windows.
        """
        array = np.asarray(image)
        height, width = array.shape[:2]
        tile = tile or self.model.img_size
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise PredictorError(
                f"predict_tiled: overlap must be in [0, tile), got {overlap} for tile {tile}."
            )
        if boxes is None and point_coords is None:
            raise PredictorError("predict_tiled needs boxes or point_coords (with point_labels).")
        if point_coords is not None and point_labels is None:
            raise PredictorError("point_labels must be given with point_coords.")
        box_rows = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        point_rows = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)
        extents = []  # (N, 4) xyxy that each prompt needs inside a window
        if box_rows is not None:
            extents.append(box_rows)
        if point_rows is not None:
            extents.append(np.concatenate([point_rows.min(1), point_rows.max(1)], -1))
        lo = np.min([e[:, :2] for e in extents], axis=0)
        hi = np.max([e[:, 2:] for e in extents], axis=0)
        rows = len(lo)
        windows = [
            (y, x, min(tile, height), min(tile, width))
            for y in _starts(height, tile, overlap)
            for x in _starts(width, tile, overlap)
        ]
        channels = 3 if multimask_output and not self.model.plugins.uses("select") else 1
        total = np.zeros((rows, channels, height, width), dtype=np.float32)
        weight = np.zeros((rows, 1, height, width), dtype=np.float32)
        score_sum = np.zeros((rows, channels), dtype=np.float32)
        hits = np.zeros(rows, dtype=np.int64)
        for y, x, h, w in _tracked(windows, progress):
            inside = (lo[:, 0] >= x) & (lo[:, 1] >= y) & (hi[:, 0] <= x + w - 1) & (hi[:, 1] <= y + h - 1)
            if not inside.any():
                continue
            chosen = np.flatnonzero(inside)
            encoding = self.encode(np.ascontiguousarray(array[y : y + h, x : x + w]), image_format)
            shift = np.array([x, y], dtype=np.float64)
            frame = (h, w)
            args: dict[str, Tensor | None] = {"point_coords": None, "point_labels": None, "boxes": None}
            if box_rows is not None:
                local = self.transform.apply_boxes(box_rows[chosen] - np.tile(shift, 2), frame)
                args["boxes"] = torch.as_tensor(local, dtype=torch.float)
            if point_rows is not None and point_labels is not None:
                local = self.transform.apply_coords(point_rows[chosen] - shift, frame)
                args["point_coords"] = torch.as_tensor(local, dtype=torch.float)
                args["point_labels"] = torch.as_tensor(np.asarray(point_labels)[chosen], dtype=torch.long)
            window_logits, window_scores, _ = self.decode(
                encoding, **args, multimask_output=multimask_output, return_logits=True
            )
            ramp = _window_weight(y, x, h, w, height, width, overlap)
            total[chosen, :, y : y + h, x : x + w] += window_logits.float().cpu().numpy() * ramp
            weight[chosen, :, y : y + h, x : x + w] += ramp
            score_sum[chosen] += window_scores.float().cpu().numpy()
            hits[chosen] += 1
        missing = np.flatnonzero(hits == 0)
        if len(missing):
            raise PredictorError(
                f"predict_tiled: prompts {missing[:5].tolist()} fit in no {tile} px window; pass a larger tile."
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            blended = np.where(weight > 0, total / np.maximum(weight, 1e-12), -np.inf).astype(np.float32)
        return (blended if return_logits else blended > self.mask_threshold), score_sum / hits[:, None]

    def postprocess(
        self, low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Low-resolution logits (B, C, h, w) -> (B, C, H, W) logits at the original size, as
        ``Sam.postprocess_masks``: upsample to S x S, drop the padding, resize to (H, W)."""
        size = self.model.img_size
        full = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
        full = full[..., : input_size[0], : input_size[1]]
        return F.interpolate(full, original_size, mode="bilinear", align_corners=False)

    def _current(self) -> ImageEncoding:
        if self.encoding is None:
            raise PredictorError("No image is set; call set_image(image) before predicting.")
        return self.encoding


def chosen_masks(model: HookedSam, out: SamOutput, multimask_output: bool | None) -> tuple[Tensor, Tensor]:
    """What ``predict`` returns of a decoder output: (low-resolution logits (N, M, h, w), scores (N, M)).

    SAM's tokens 1..3 (``multimask_output``) or token 0 with their IoU predictions; when a plugin
    chooses the prediction (``select``), that one mask, scored by SAM's IoU prediction of the token
    SAM's own rule picks. ``None``: the model's own prediction (``out.pred``, by the model's rule, as
    validation scores it), scored the same way.
    """
    rule = model.multimask_output if multimask_output is None else multimask_output
    if multimask_output is None or model.plugins.uses("select"):  # one chosen mask per prompt
        return out.pred, out.iou_pred[:, 1:].max(dim=1, keepdim=True).values if rule else out.iou_pred[:, :1]
    if multimask_output:
        return out.masks["sam"][:, 1:], out.iou_pred[:, 1:]
    return out.masks["sam"][:, :1], out.iou_pred[:, :1]


def _tracked(windows: list[tuple[int, int, int, int]], progress: bool) -> Iterator[tuple[int, int, int, int]]:
    """``windows`` one by one, under a progress bar over the tiles when ``progress``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        yield from bar.track(windows)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _window_weight(y: int, x: int, h: int, w: int, height: int, width: int, overlap: int) -> np.ndarray:
    """(h, w) blending weights of a window: linear from ~0 to 1 over ``overlap`` pixels at each edge
    inside the image, 1 at the image's own edges."""

    def ramp(start: int, size: int, total: int) -> np.ndarray:
        r = np.ones(size, dtype=np.float32)
        if overlap == 0:
            return r
        up = (np.arange(size, dtype=np.float32) + 1) / (overlap + 1)
        if start > 0:
            r = np.minimum(r, up)
        if start + size < total:
            r = np.minimum(r, up[::-1])
        return r

    return ramp(y, h, height)[:, None] * ramp(x, w, width)[None, :]


# ---- rebuilding a model from a run's config and weights (shared with samflow.export) ----
def run_files(source: str | Path, checkpoint: str | Path | None = None) -> tuple[Path, Path]:
    """(checkpoint, config.yaml) of a run folder or of a checkpoint file.

    A run folder gives ``checkpoint`` (a file name in its ``checkpoints/`` or a path), else
    ``checkpoints/last.ckpt``, else the only checkpoint there; a checkpoint file gives its run's
    ``config.yaml`` (``../config.yaml`` when it lies in ``checkpoints/``).
    """
    path = Path(source).expanduser()
    if path.is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run / "config.yaml"
    if not (path / "config.yaml").is_file():
        raise PredictorError(
            f"{path} is not a samflow run folder (no config.yaml) nor a checkpoint file; pass "
            "runs/<experiment>/version_N or a .ckpt file."
        )
    folder = path / "checkpoints"
    if checkpoint is not None:
        given = Path(checkpoint).expanduser()
        return (given if given.is_absolute() or given.exists() else folder / given), path / "config.yaml"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt", path / "config.yaml"
    found = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if len(found) != 1:
        raise PredictorError(
            f"{folder}: {'no checkpoint' if not found else f'{len(found)} checkpoints'} and no last.ckpt; "
            "pass the checkpoint (a file name there or a path)."
        )
    return found[0], path / "config.yaml"


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's resolved ``config.yaml`` -> ``{"model": model section, "predictor": Predictor options}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PredictorError(
            f"Run config {str(path)!r} does not exist; pass config= (the config.yaml samflow fit wrote in the run folder)."
        )
    config = yaml.safe_load(path.read_text()) or {}
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise PredictorError(f"{path} has no model section; pass the config.yaml samflow fit wrote.")
    data = config.get("data") or {}
    data = data.get("init_args", data) if isinstance(data, dict) else {}
    options: dict[str, Any] = {
        "resize_mode": data.get("resize_mode") or "longest",
        "image_resize": data.get("image_resize") or "sam",
    }
    threshold = model.get("threshold")
    if threshold is not None and 0 < float(threshold) < 1:
        options["mask_threshold"] = math.log(float(threshold) / (1 - float(threshold)))
    return {"model": model, "predictor": options, "config": config}


def build_model(model: Mapping[str, Any], *, sam_checkpoint: str | Path | None = None) -> HookedSam:
    """SAM and the plugins of a run's ``model`` section (``sam``, ``plugins``), SAM's weights loaded."""
    from jsonargparse import ArgumentParser

    spec = SamSpec(
        **{
            f.name: (model.get("sam") or {})[f.name]
            for f in fields(SamSpec)
            if f.name in (model.get("sam") or {})
        }
    )
    if sam_checkpoint is not None:
        spec.checkpoint = str(sam_checkpoint)
    discover()  # plugins named by their short class name resolve, broken ones are known
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--plugins", type=dict[str, SamPlugin] | None, default=None)
    try:
        plugins = parser.instantiate_classes(parser.parse_object({"plugins": model.get("plugins")})).plugins
    except Exception as err:  # jsonargparse reports bad specs in several types
        raise PredictorError(f"model.plugins of the run cannot be built: {err}") from err
    sam = build_sam(spec.variant, spec.checkpoint, spec.img_size, seed=spec.seed)
    return HookedSam(sam, PluginStack(plugins or {}), spec.multimask_output)


def read_checkpoint_state(path: Path) -> dict[str, Tensor]:
    """The state dict of a Lightning checkpoint, loaded with ``weights_only=True``, keys of ``HookedSam``."""
    try:
        with torch.serialization.safe_globals([SamSpec]):  # a module built in Python keeps its SamSpec
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(
            f"Cannot read checkpoint {str(path)!r} with weights_only=True ({type(err).__name__}); pass a "
            "checkpoint samflow fit wrote (runs/<experiment>/version_N/checkpoints/*.ckpt)."
        ) from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict; pass a checkpoint samflow fit wrote.")
    prefix = SAM_PREFIX.split(".")[0] + "."  # "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_trained_state(model: HookedSam, state: Mapping[str, Tensor], source: str) -> None:
    """Load plugin weights and trained SAM parts into ``model``; its frozen SAM weights stay.

    Strict: every key the model trains or holds outside the frozen SAM must be in ``state``, and
    ``state`` may hold nothing the model lacks; otherwise one error names the keys and ``source``.
    """
    stack = model.plugins
    frozen = {f"sam.{k}" for k in getattr(stack, "frozen_sam_keys", set())}
    expected = model.state_dict()
    needed = set(expected) - frozen
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the run's model: missing {len(missing)} keys ({', '.join(missing[:4])}), "
            f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])}); pass the config.yaml of the run "
            "that wrote it."
        )
    full = {**expected, **state}
    model.load_state_dict(full, strict=True)
