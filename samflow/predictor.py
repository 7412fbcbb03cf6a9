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

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samflow import tiled_predict
from samflow.batch import SamBatch
from samflow.data.transforms import (
    IMAGE_RESIZES,
    ImageResize,
    ResizeMode,
    pad_to_square,
    resize_longest_side,
    sam_resize,
    stretch,
)
from samflow.predictor_types import ImageEncoding, InputTransform, PredictorError, one_prompt, prompt_rows
from samflow.rebuild import build_model, load_trained_checkpoint, read_run_config, run_files
from samflow.sam import DecoderContext, ForwardContext, HookedSam, SamOutput

__all__ = ["Predictor", "chosen_masks"]


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
        load_trained_checkpoint(model, ckpt)
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
        coords, point_labels, box, mask_input = one_prompt(
            point_coords, point_labels, box, mask_input, self.model.sam.prompt_encoder.mask_input_size
        )
        dev = self.device
        points = labels = boxes = masks_in = None
        if coords is not None and point_labels is not None:
            coords = self.transform.apply_coords(coords, encoding.original_size)
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
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8 or 0 in array.shape:
            raise PredictorError(
                f"set_image takes an H x W x 3 uint8 array (H, W >= 1), got {array.dtype} of shape {array.shape}."
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
        mask_size = self.model.sam.prompt_encoder.mask_input_size
        rows = prompt_rows(point_coords, point_labels, boxes, mask_input, mask_size)
        dev = self.device
        batch = SamBatch(
            image=encoding.image,
            input_size=torch.tensor([encoding.input_size], device=dev),
            original_size=torch.tensor([encoding.original_size], device=dev),
            image_index=torch.zeros(rows, dtype=torch.long, device=dev),
            points=None if point_coords is None else point_coords.to(dev, torch.float),
            point_labels=None if point_labels is None else point_labels.to(dev, torch.long),
            box=None if boxes is None else boxes.to(dev, torch.float),
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

    predict_tiled = tiled_predict.predict_tiled  # prompts on a large image, window by window

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
