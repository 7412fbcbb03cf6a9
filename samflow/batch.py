"""``SamBatch``: the batch that crosses from the data to the model and to every plugin.

B images, N prompt rows (``image_index`` maps each row to its image; N == B with one row per image),
S the model's input side, K the most point slots of any row.

=====================  ==========================  ==========================================================
field                  type, shape                 meaning
=====================  ==========================  ==========================================================
``image``              float (B, 3, S, S)          RGB in [0, 1], not normalised (the model normalises);
                                                   resized and zero-padded at the bottom / right (or stretched)
``input_size``         long (B, 2)                 (h, w) of the resized image before padding
``original_size``      long (B, 2)                 (H, W) of the original image
``mask``               float (B, 1, S, S) | None   ground truth in {0, 1} in the input frame; None without
                                                   masks (predict)
``gt_original``        list of B bool (H_i, W_i)   ground truth at the original resolution (metrics); None
                                                   without masks
``id``, ``path``       list[str] of B, or []       file stems and image paths; [] when not given (``names``
                                                   reads ``id`` or, without, the images' positions)
``image_index``        long (N,)                   the image of each prompt row
``points``             float (N, K, 2) | None      x, y in the S x S frame, pixel units
``point_labels``       long (N, K) | None          1 positive, 0 negative, -1 an empty slot (padding): empty
                                                   slots are invisible to the model; other values (SAM's box
                                                   corners 2 / 3: boxes go in ``box``) are refused
``box``                float (N, 4) | None         x0, y0, x1, y1 in the S x S frame, inclusive corners
``has_box``            bool (N,) | None            rows without a box hold zeros and False
``mask_prompt``        float (N, 1, S/4, S/4)      a low-resolution mask prompt in {0, 1} (or logits)
``has_mask_prompt``    bool (N,) | None            rows without a mask prompt hold zeros and False
``context_image``      float (B, 3, S, S) | None   a second view of each image around the same centre at a
                                                   coarser scale (WSI-SAM's low-resolution patch), in [0, 1];
                                                   it fills the S x S frame. With it the model encodes 2B
                                                   images and decodes every row in both views (``with_context``)
``context_mask``       float (B, 1, S, S) | None   the ground truth in the context view
``context_affine``     float (B, 3) | None         (a, tx, ty): a point at continuous position u of the S x S
                                                   frame (pixel i spans [i, i + 1)) lies at a * u + t in the
                                                   context view; default (0.5, S/4, S/4): concentric, the
                                                   view is the context's central half
``context_rows``       int                         0, or N in the batch ``with_context`` builds: images [B, 2B)
                                                   are then the context views and rows [N, 2N) the rows
                                                   [0, N) mapped into them
``sample_seed``        list[int] of B, or []       each training image's seed, from (run seed, epoch, index)
                                                   (``ResumableLoader``): batch augmentation draws each image's
                                                   transform from it; [] in other batches
``pixels``             bool                        False when the images were not decoded: ``image`` is then
                                                   ``image_placeholder`` (NaN, the frame's shape), and only
                                                   its shape, dtype and device mean anything (training from
                                                   an embedding store, ``samflow.embed.check``)
``_image_index_host``  internal                    ``image_index``'s values on the host, with the tensor they
                                                   belong to; read them as ``image_index_host`` (below)
=====================  ==========================  ==========================================================

``image_index`` is known on the host too (``image_index_host``): a batch built on the host carries its
values through ``to``, ``pin_memory``, ``replace``, ``select_rows``, ``select_images`` and
``with_context``, so code that needs them on the host (``ForwardContext.rand``) never waits for the
device. Replace ``image_index``; never write into it in place (its host copy would not follow).

A prompt field is None when no row has that prompt. ``has_box`` / ``has_mask_prompt`` may be None
when the field is set: then every row has one. A row's output never depends on the other rows:
empty point slots, absent boxes and absent mask prompts take no part in the model's attention.
Coordinates follow segment-anything's ``ResizeLongestSide.apply_coords``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from samflow.seeding import derived_seed

__all__ = [
    "CONTEXT_FIELDS",
    "POINT_LABELS",
    "POINT_LABEL_WORDS",
    "PROMPT_FIELDS",
    "SamBatch",
    "bad_point_labels",
    "image_placeholder",
    "to_context_frame",
]

PROMPT_FIELDS = ("points", "point_labels", "box", "has_box", "mask_prompt", "has_mask_prompt")
CONTEXT_FIELDS = ("context_image", "context_mask", "context_affine")
#: The point labels a prompt may hold, and the words errors use for them.
POINT_LABELS = (-1, 0, 1)
POINT_LABEL_WORDS = "1 (positive), 0 (negative) or -1 (an empty slot)"


def bad_point_labels(labels: Tensor | np.ndarray | Any) -> list[Any]:
    """The values of ``labels`` other than -1, 0 and 1 (up to 5, sorted); ``[]`` when there are none.

    SAM's prompt encoder gives a label outside {-1, 0, 1} no label embedding (2 and 3 are its box
    corners), so such a point would silently shift the prompt. Labels on an accelerator are not read
    (``[]``): reading them would wait for the device, so they are checked where they are still on the
    host (data loading, ``Predictor``'s numpy and CPU arguments). Nor under tracing or ``torch.compile``.
    """
    if isinstance(labels, Tensor):
        if labels.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return []
        labels = labels.detach().float().numpy() if labels.is_floating_point() else labels.detach().numpy()
    values = np.asarray(labels)
    try:
        bad = values[~np.isin(values, POINT_LABELS)]
    except TypeError:  # values numpy cannot compare with numbers
        bad = values.ravel()
    return sorted(set(bad.tolist()), key=str)[:5] if bad.size else []


def image_placeholder(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``image`` of items and batches whose pixels were not decoded: NaN of ``shape``, one stored
    value seen through zero strides. NaN, not zeros, so that pixels read where none were decoded make
    the loss non-finite (the run stops) instead of training on a black image."""
    return torch.full((), float("nan"), dtype=dtype).expand(*shape)


@dataclass
class SamBatch:
    """Images, their ground truth and prompt rows (see the module docstring for shapes)."""

    image: Tensor
    input_size: Tensor = None  # type: ignore[assignment]  # default: (S, S) for every image
    original_size: Tensor = None  # type: ignore[assignment]  # default: input_size
    mask: Tensor | None = None
    gt_original: list[Tensor] | None = None
    id: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    image_index: Tensor = None  # type: ignore[assignment]  # default: one row per image
    points: Tensor | None = None
    point_labels: Tensor | None = None
    box: Tensor | None = None
    has_box: Tensor | None = None
    mask_prompt: Tensor | None = None
    has_mask_prompt: Tensor | None = None
    context_image: Tensor | None = None
    context_mask: Tensor | None = None
    context_affine: Tensor | None = None
    context_rows: int = 0
    sample_seed: list[int] = field(default_factory=list)
    pixels: bool = True
    # (the image_index tensor, its values): valid while image_index is that tensor (``image_index_host``)
    _image_index_host: tuple[Tensor, tuple[int, ...]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        b, s = self.image.shape[0], self.image.shape[-1]
        device = self.image.device
        if self.input_size is None:
            self.input_size = torch.tensor([[s, s]] * b, device=device)
        if self.original_size is None:
            self.original_size = self.input_size.clone()
        if self.image_index is None:
            self.image_index = torch.arange(b, device=device)
            self._remember_image_index(range(b))
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("SamBatch: give points and point_labels together.")
        if self.point_labels is not None and (bad := bad_point_labels(self.point_labels)):
            raise ValueError(
                f"SamBatch: point_labels must hold {POINT_LABEL_WORDS}, got {bad}; a box goes in box, "
                "not as corner points."
            )
        if self.context_image is not None and self.context_affine is None:
            self.context_affine = torch.tensor([[0.5, s / 4, s / 4]] * b, device=device)

    # ---- sizes ----
    @property
    def names(self) -> list[str]:
        """The images' ids, or their positions (``"0"``, ``"1"``, ...) in a batch without ids."""
        return self.id or [str(i) for i in range(self.num_images)]

    @property
    def num_images(self) -> int:
        return self.image.shape[0]

    @property
    def num_rows(self) -> int:
        return self.image_index.shape[0]

    @property
    def size(self) -> int:
        """S, the side of the square input."""
        return self.image.shape[-1]

    @property
    def image_index_host(self) -> list[int]:
        """``image_index`` as a list, read from the device only when the batch does not know it (an
        ``image_index`` computed on the device; see the module docstring)."""
        known = self._known_image_index()
        return list(known) if known is not None else self.image_index.tolist()

    def _known_image_index(self) -> tuple[int, ...] | None:
        """The values of ``image_index`` when they are known without waiting for a device, else None."""
        remembered = self._image_index_host
        if remembered is not None and remembered[0] is self.image_index:
            return remembered[1]
        index = self.image_index
        if index.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        self._remember_image_index(index.tolist())
        return self._image_index_host[1]  # type: ignore[index]

    def _remember_image_index(self, values: Any) -> SamBatch:
        """Tie the host values ``values`` (None: unknown) to the current ``image_index``."""
        self._image_index_host = None if values is None else (self.image_index, tuple(int(v) for v in values))
        return self

    # ---- per-row targets ----
    @property
    def row_mask(self) -> Tensor:
        """The ground truth of each prompt row's image (N, 1, S, S); fails clearly without masks."""
        if self.mask is None:
            raise ValueError("This batch has no ground-truth masks (batch.mask is None); losses need them.")
        return self.mask[self.image_index]

    # ---- moving and selecting ----
    def to(self, *args: Any, **kwargs: Any) -> SamBatch:
        """A copy with every tensor moved / cast as ``Tensor.to`` does; integer and bool tensors keep their dtype."""

        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                if value.is_floating_point():
                    return value.to(*args, **kwargs)
                dev = kwargs.get("device") or next((a for a in args if not isinstance(a, torch.dtype)), None)
                return value.to(dev) if dev is not None else value
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        moved = dataclasses.replace(
            self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )
        return moved._remember_image_index(self._known_image_index())

    def pin_memory(self) -> SamBatch:
        """A copy in page-locked memory (what ``DataLoader(pin_memory=True)`` calls, for faster copies to a GPU)."""

        def pin(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.pin_memory()
            if isinstance(value, list):
                return [pin(v) for v in value]
            return value

        pinned = dataclasses.replace(
            self, **{f.name: pin(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )
        return pinned._remember_image_index(self._known_image_index())

    def select_images(self, images: Tensor | list[int]) -> SamBatch:
        """The batch of the given images (indices into B) and of their prompt rows, re-indexed."""
        keep = torch.as_tensor(images, dtype=torch.long, device=self.image.device)
        new_of_old = torch.full((self.num_images,), -1, dtype=torch.long, device=keep.device)
        new_of_old[keep] = torch.arange(keep.numel(), device=keep.device)
        picked, known = _host_ints(images), self._known_image_index()
        if picked is not None and known is not None:  # rows chosen on the host: nothing waits for the device
            new_of = {old % self.num_images: new for new, old in enumerate(picked)}
            rows: Tensor | list[int] = [r for r, image in enumerate(known) if image in new_of]
            new_index = [new_of[known[r]] for r in rows]
        else:
            rows = torch.nonzero(new_of_old[self.image_index] >= 0).flatten()
            picked, new_index = keep.tolist(), None
        out = self.select_rows(rows)
        return dataclasses.replace(
            out,
            image=self.image[keep],
            input_size=self.input_size[keep],
            original_size=self.original_size[keep],
            mask=None if self.mask is None else self.mask[keep],
            gt_original=None if self.gt_original is None else [self.gt_original[i] for i in picked],
            id=[self.id[i] for i in picked] if self.id else [],
            path=[self.path[i] for i in picked] if self.path else [],
            sample_seed=[self.sample_seed[i] for i in picked] if self.sample_seed else [],
            image_index=new_of_old[out.image_index],
            context_image=None if self.context_image is None else self.context_image[keep],
            context_mask=None if self.context_mask is None else self.context_mask[keep],
            context_affine=None if self.context_affine is None else self.context_affine[keep],
        )._remember_image_index(new_index)

    def select_rows(self, rows: Tensor | list[int]) -> SamBatch:
        """The same images with only the given prompt rows (indices into N)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.image.device)
        changes: dict[str, Any] = {"image_index": self.image_index[index]}
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[index]
        picked, known = _host_ints(rows), self._known_image_index()
        kept = None if picked is None or known is None else [known[r] for r in picked]
        return dataclasses.replace(self, **changes)._remember_image_index(kept)

    def replace(self, **changes: Any) -> SamBatch:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def with_context(self) -> SamBatch:
        """The batch the model runs when context views are given: 2B images, 2N rows, one pass.

        Images [0, B) are the views, [B, 2B) their context views (full frame); row N + n is row n
        mapped into its image's context view by ``context_affine`` (``to_context_frame``). The ground
        truth is not copied: losses read ``mask`` and ``context_mask`` of the batch itself.
        """
        if self.context_image is None or self.context_affine is None:
            raise ValueError("SamBatch.with_context: this batch has no context_image.")
        b, n, s = self.num_images, self.num_rows, self.size
        known = self._known_image_index()
        affine = self.context_affine[self.image_index]  # (N, 3), per row
        rows: dict[str, Any] = {"image_index": torch.cat([self.image_index, self.image_index + b])}
        for name in PROMPT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                mapped = value
                if name == "points":
                    mapped = to_context_frame(value, affine)
                elif name == "box":
                    mapped = to_context_frame(value.unflatten(-1, (2, 2)), affine).flatten(-2)
                elif name == "mask_prompt":
                    mapped = _warp_to_context(value, affine, s)
                rows[name] = torch.cat([value, mapped])
        full = torch.tensor([[s, s]] * b, dtype=self.input_size.dtype, device=self.input_size.device)
        return SamBatch(
            image=torch.cat([self.image, self.context_image]),
            input_size=torch.cat([self.input_size, full]),
            original_size=torch.cat([self.original_size, full]),
            id=self.id + [f"{i}@context" for i in self.id],
            path=self.path + self.path,
            context_rows=n,
            # a context view draws (``ctx.rand``) from a seed of its own, not its view's twin
            sample_seed=self.sample_seed + [_context_seed(seed) for seed in self.sample_seed],
            **rows,
        )._remember_image_index(None if known is None else [*known, *(i + b for i in known)])

    # ---- prompt presence ----
    def point_valid(self) -> Tensor | None:
        """(N, K) True where a point slot holds a point (label != -1); None without points."""
        return None if self.point_labels is None else self.point_labels != -1

    def box_valid(self) -> Tensor | None:
        """(N,) True where a row has a box; None without boxes."""
        if self.box is None:
            return None
        if self.has_box is None:
            return torch.ones(self.box.shape[0], dtype=torch.bool, device=self.box.device)
        return self.has_box

    def mask_prompt_valid(self) -> Tensor | None:
        """(N,) True where a row has a mask prompt; None without mask prompts."""
        if self.mask_prompt is None:
            return None
        if self.has_mask_prompt is None:
            return torch.ones(self.mask_prompt.shape[0], dtype=torch.bool, device=self.mask_prompt.device)
        return self.has_mask_prompt


def _host_ints(values: Tensor | list[int]) -> list[int] | None:
    """Indices as a list when they are on the host (a list, a CPU tensor), else None (not read)."""
    if isinstance(values, Tensor):
        if values.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        return values.reshape(-1).tolist()
    return [int(v) for v in values]


def _context_seed(sample_seed: int) -> int:
    """The seed of an image's context view in ``with_context``: from the image's, apart from it."""
    return derived_seed(sample_seed, 0x636F6E74)


def to_context_frame(coords: Tensor, affine: Tensor) -> Tensor:
    """Pixel coordinates (N, ..., 2) of the view -> those of the context view, by (N, 3) ``(a, tx, ty)``.

    Coordinates are pixel indices as in the batch (pixel i's centre is at i + 0.5), so
    x' = a (x + 0.5) + tx - 0.5: the exact geometry (the WSI-SAM code's ``x / 2 + 256`` is a quarter
    pixel off it at 1024 px).
    """
    shape = (coords.shape[0],) + (1,) * (coords.dim() - 2)
    scale = affine[:, 0].view(*shape, 1).to(coords.dtype)
    shift = affine[:, 1:].view(*shape, 2).to(coords.dtype)
    return scale * (coords + 0.5) + shift - 0.5


def _warp_to_context(mask: Tensor, affine: Tensor, size: int) -> Tensor:
    """Low-resolution mask prompts (N, 1, S/4, S/4) resampled into the context frame (bilinear; 0 outside).

    For a = 1/2 each context pixel is exactly the mean of the 2 x 2 view pixels it covers.
    """
    low = mask.shape[-1]
    centres = (torch.arange(low, device=mask.device, dtype=torch.float64) + 0.5) * (size / low)  # S frame
    a = affine[:, :1].double()  # (N, 1)
    x = (centres[None] - affine[:, 1:2].double()) / a  # (N, low): view coordinate of each context column
    y = (centres[None] - affine[:, 2:3].double()) / a
    gx, gy = 2 * x / size - 1, 2 * y / size - 1  # grid_sample's [-1, 1], align_corners=False
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (N, low, low, 2)
    values = mask if mask.is_floating_point() else mask.float()
    warped = torch.nn.functional.grid_sample(
        values, grid.to(values.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped.to(mask.dtype)
