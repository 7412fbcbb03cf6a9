"""Prompt samplers: draw SAM prompts from a ground-truth mask, in the original image's coordinates.

Every sampler is a small callable ``sampler(mask, generator) -> dict`` that runs on the CPU inside the
dataset. ``mask`` is a bool tensor (H, W) at the original resolution; the returned dict holds any of

- ``points`` float (K, 2), pixel indices x (column) then y (row), and ``point_labels`` long (K,):
  1 positive, 0 negative, -1 padding (a slot with nothing to point at);
- ``box`` float (4,), xyxy with inclusive corners: the first and last column / row of the mask, as
  segment-anything's ``batched_mask_to_box``;
- ``mask_prompt`` bool (H, W): a low-quality mask (the dataset brings it to SAM's S/4 mask input).

A sampler returns ``{}`` when it has nothing to say (``NoPrompt``; ``BoxPrompt`` on an empty mask).
The dataset maps the coordinates into the model's input frame (``transforms.scale_coords``).

All randomness comes from ``generator``, so a dataset that seeds it per sample gets the same prompts
every epoch (validation), and one that seeds it from the global RNG gets fresh ones (training). An
evaluation prompt is seeded by ``samflow.seeding.stable_seed(seed, <the sample's id>)``, not by the sample's position,
so adding or removing a file leaves every other sample's prompt as it was.

**Choosing a sampler** (``data.init_args.prompt`` / ``eval_prompt``, ``MaskFolderDataset(prompt=...)``)
is a ``class_path`` spec, as for every component. Any subclass of :class:`PromptSampler` works, a
third party's too; a bare class name resolves among the imported subclasses::

    prompt: {class_path: BoxPrompt, init_args: {jitter: 0.1}}
    prompt: {class_path: my_pkg.prompts.CenterPoint}      # your own PromptSampler subclass
    prompt: BoxPrompt                                     # a class alone: its default arguments

The short names of ``PROMPTS`` are aliases of the built-in classes, alone or with their arguments::

    prompt: box                                           # = BoxPrompt()
    prompt: {name: points, positive: 2, negative: 1}      # = PointPrompt(positive=2, negative=1)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import register_type
from torch import Tensor

from samflow.components import instantiate, is_class_path_spec

PromptDict = dict[str, Tensor]


class PromptSampler(ABC):
    """Base class of prompt samplers: subclass it and give the subclass as ``class_path``.

    ``__call__(mask, generator)`` gets the ground truth as a bool tensor (H, W) at the original
    resolution and returns a ``PromptDict`` (see the module docstring); draw every random number from
    ``generator``. The constructor's arguments are the ``init_args`` a config can set.
    """

    @abstractmethod
    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        """Draw the prompt of one mask."""


PromptName = Literal["none", "box", "points", "noisy_mask", "mixed"]


class PromptByName:
    """A short name with arguments, ``{name: points, positive: 2}``, as a config gives it.

    A type of its own (not ``dict``) so that jsonargparse checks it when it parses the config and
    never takes a broken class_path spec for it: the error then says what is wrong with the class.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        if not isinstance(spec, Mapping) or "class_path" in spec or not isinstance(spec.get("name"), str):
            raise ValueError(f"expected {{name: <one of {list(PROMPTS)}>, **init_args}}, got {spec!r}")
        self.spec = dict(spec)

    def __repr__(self) -> str:
        return f"PromptByName({self.spec})"


def _by_name(value: Any) -> PromptByName:
    return value if isinstance(value, PromptByName) else PromptByName(value)


register_type(PromptByName, serializer=lambda value: dict(value.spec), deserializer=_by_name)

# What a config may give for a prompt, in the order jsonargparse tries: a class_path spec (built by
# jsonargparse, the classes shown in ``--help``), a short name, a short name with arguments.
PromptSpec = PromptSampler | PromptName | PromptByName


class NoPrompt(PromptSampler):
    """No prompt at all: SAM's prompt-free mode (the model sees only its no-mask embedding)."""

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        return {}

    def __repr__(self) -> str:
        return "NoPrompt()"


def _coord_dtype(mask: Tensor) -> torch.dtype:
    """The float dtype of what a sampler draws from ``mask``: the mask's own if it is floating (a float64
    mask gives float64 prompts), else torch's default dtype (float32 unless ``torch.set_default_dtype``)."""
    return mask.dtype if mask.is_floating_point() else torch.get_default_dtype()


def mask_to_box(mask: Tensor) -> Tensor | None:
    """Tight xyxy box of a mask (H, W) (foreground: non-zero) with inclusive corners, or None if it is empty.

    The box has the mask's dtype when the mask is floating, else torch's default float dtype.
    """
    if mask.dtype == torch.bool and mask.device.type == "cpu":
        # the same booleans through numpy: torch's two reductions of a 1000 x 1000 mask take ~2.5 ms on
        # one thread (~16 ms with two threads on a busy 2-core CPU), numpy's < 0.1 ms
        array = mask.numpy()
        rows = torch.from_numpy(array.any(axis=1)).nonzero()  # (n_rows, 1)
        if rows.numel() == 0:
            return None
        cols = torch.from_numpy(array.any(axis=0)).nonzero()
    else:
        rows = mask.any(dim=1).nonzero()
        if rows.numel() == 0:
            return None
        cols = mask.any(dim=0).nonzero()
    return torch.stack([cols[0, 0], rows[0, 0], cols[-1, 0], rows[-1, 0]]).to(_coord_dtype(mask))


class BoxPrompt(PromptSampler):
    """The tight box around the mask, optionally jittered.

    Args:
        jitter: each coordinate moves by ``U(-jitter, jitter)`` times the box's width (x) or height (y),
            then the box is clipped to the image and its corners re-ordered. ``0`` keeps the tight box.
        empty: what an empty mask gets. ``"absent"`` (default) returns no box, so the batch flags the row
            with ``has_box=False``; ``"full"`` returns the whole image as the box.
    """

    def __init__(self, jitter: float = 0.0, empty: str = "absent") -> None:
        if jitter < 0:
            raise ValueError(f"BoxPrompt: jitter must be >= 0, got {jitter}.")
        if empty not in ("absent", "full"):
            raise ValueError(f"BoxPrompt: empty must be 'absent' or 'full', got {empty!r}.")
        self.jitter = jitter
        self.empty = empty

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        h, w = mask.shape
        box = mask_to_box(mask)
        if box is None:
            if self.empty == "absent":
                return {}
            return {"box": torch.tensor([0.0, 0.0, w - 1.0, h - 1.0], dtype=_coord_dtype(mask))}
        if self.jitter > 0:
            side = (box[2:] - box[:2] + 1).repeat(2)  # (4,): w, h, w, h
            noise = (torch.rand(4, generator=generator, dtype=box.dtype) * 2 - 1) * self.jitter * side
            box = box + noise
            box[0::2] = box[0::2].clamp(0, w - 1)
            box[1::2] = box[1::2].clamp(0, h - 1)
            box = torch.cat([torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])])
        return {"box": box}

    def __repr__(self) -> str:
        return f"BoxPrompt(jitter={self.jitter}, empty={self.empty!r})"


def _draw_pixels(region: Tensor, count: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``count`` pixels of a bool region (H, W), uniform with replacement: xy (count, 2) of ``dtype``."""
    yx = region.nonzero()  # (n, 2) row, col
    pick = torch.randint(len(yx), (count,), generator=generator)
    return yx[pick].flip(-1).to(dtype)


class PointPrompt(PromptSampler):
    """Uniform random points (drawn with replacement): ``positive`` inside the mask, ``negative`` outside.

    Always returns ``positive + negative`` slots, positives first. An empty mask has no pixel to point
    at, so its positive slots become negatives (the whole image is background, which is the honest
    prompt). A mask that covers the whole image has no background, so its negative slots become
    padding (label -1, coordinates 0).

    Args:
        positive: number of points inside the mask.
        negative: number of points outside the mask.
    """

    def __init__(self, positive: int = 1, negative: int = 0) -> None:
        if positive < 0 or negative < 0 or positive + negative == 0:
            raise ValueError(
                f"PointPrompt: need positive >= 0, negative >= 0 and at least one point, "
                f"got positive={positive}, negative={negative}."
            )
        self.positive = positive
        self.negative = negative

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        n_pos, n_neg = self.positive, self.negative
        dtype = _coord_dtype(mask)
        mask = mask.bool()  # foreground: non-zero, as for mask_to_box
        has_fg = bool(mask.any())
        has_bg = not bool(mask.all())
        if not has_fg:
            n_pos, n_neg = 0, n_pos + n_neg
        points = [torch.zeros(0, 2, dtype=dtype)]
        labels = [torch.zeros(0, dtype=torch.long)]
        if n_pos:
            points.append(_draw_pixels(mask, n_pos, generator, dtype))
            labels.append(torch.ones(n_pos, dtype=torch.long))
        if n_neg and has_bg:
            points.append(_draw_pixels(~mask, n_neg, generator, dtype))
            labels.append(torch.zeros(n_neg, dtype=torch.long))
        elif n_neg:
            points.append(torch.zeros(n_neg, 2, dtype=dtype))
            labels.append(torch.full((n_neg,), -1, dtype=torch.long))
        return {"points": torch.cat(points), "point_labels": torch.cat(labels)}

    def __repr__(self) -> str:
        return f"PointPrompt(positive={self.positive}, negative={self.negative})"


def _max_filter(x: Tensor, radius: int) -> Tensor:
    """Separable square max filter of a float map (H, W) with window ``2 * radius + 1``."""
    k = 2 * radius + 1
    x = x[None, None]
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    x = F.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return x[0, 0]


class NoisyMaskPrompt(PromptSampler):
    """A degraded copy of the ground truth, as HQ-SAM feeds its mask prompt during training.

    Pixels in a band around the mask boundary get Gaussian noise and the result is thresholded:
    ``noisy = (gt + std * n * band) > 0.5`` with ``n ~ N(0, 1)``, so the interior stays right and the
    boundary turns ragged. The band is every pixel within ``band`` (a fraction of the longest image
    side, at least one pixel) of a pixel of the other class.

    Args:
        band: half-width of the boundary band as a fraction of the longest side.
        std: standard deviation of the noise (1.0 flips about 31% of band pixels).
    """

    def __init__(self, band: float = 0.02, std: float = 1.0) -> None:
        if band <= 0 or std < 0:
            raise ValueError(f"NoisyMaskPrompt: need band > 0 and std >= 0, got band={band}, std={std}.")
        self.band = band
        self.std = std

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        radius = max(1, round(self.band * max(mask.shape)))
        gt = mask.to(_coord_dtype(mask))
        dilated = _max_filter(gt, radius)
        eroded = 1 - _max_filter(1 - gt, radius)
        band = dilated - eroded  # (H, W): 1 near the boundary, 0 elsewhere
        noise = torch.randn(mask.shape, generator=generator, dtype=gt.dtype) * self.std
        return {"mask_prompt": (gt + noise * band) > 0.5}

    def __repr__(self) -> str:
        return f"NoisyMaskPrompt(band={self.band}, std={self.std})"


class MixedPrompt(PromptSampler):
    """One prompt type per image, drawn from ``samplers`` with probabilities proportional to ``weights``.

    HQ-SAM trains this way with boxes, points and noisy masks.

    Args:
        samplers: the samplers to choose from, each a prompt spec: a class_path spec, a short name or
            ``{name: ..., **init_args}`` (e.g. ``[box, {name: points, positive: 10}, noisy_mask]``).
        weights: one non-negative weight per sampler; ``None`` means equal weights.
    """

    def __init__(
        self,
        samplers: Sequence[PromptSpec],
        weights: Sequence[float] | None = None,
    ) -> None:
        if not samplers:
            raise ValueError("MixedPrompt: give at least one sampler.")
        self.samplers = [build_prompt(s, key=f"MixedPrompt.samplers[{i}]") for i, s in enumerate(samplers)]
        weights = [1.0] * len(self.samplers) if weights is None else list(weights)
        if len(weights) != len(self.samplers) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"MixedPrompt: need one non-negative weight per sampler with a positive sum, got "
                f"{len(self.samplers)} samplers and weights={weights}."
            )
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        choice = int(torch.multinomial(self.weights, 1, generator=generator))
        return self.samplers[choice](mask, generator)

    def __repr__(self) -> str:
        return f"MixedPrompt({self.samplers}, weights={self.weights.tolist()})"


class _FunctionSampler(PromptSampler):
    """A plain function ``f(mask, generator) -> PromptDict`` as a sampler."""

    def __init__(self, function: Callable[[Tensor, torch.Generator], PromptDict]) -> None:
        self.function = function

    def __call__(self, mask: Tensor, generator: torch.Generator) -> PromptDict:
        return self.function(mask, generator)

    def __repr__(self) -> str:
        return f"_FunctionSampler({self.function!r})"


PROMPTS: dict[str, type[PromptSampler]] = {
    "none": NoPrompt,
    "box": BoxPrompt,
    "points": PointPrompt,
    "noisy_mask": NoisyMaskPrompt,
    "mixed": MixedPrompt,
}


def build_prompt(
    spec: PromptSpec | str | Mapping[str, Any] | Callable[[Tensor, torch.Generator], PromptDict] | None,
    key: str = "prompt",
) -> PromptSampler:
    """Build a sampler from any prompt spec.

    Args:
        spec: one of

            - a class_path spec ``{"class_path": "BoxPrompt", "init_args": {"jitter": 0.1}}``, or a class
              path / class name alone (``"my_pkg.prompts.CenterPoint"``): any ``PromptSampler`` subclass;
            - a short name from ``PROMPTS`` (``"none"``, ``"box"``, ``"points"``, ``"noisy_mask"``,
              ``"mixed"``), or ``{"name": ..., **init_args}`` such as
              ``{"name": "points", "positive": 2, "negative": 1}`` or
              ``{"name": "mixed", "samplers": ["box", "points"], "weights": [0.5, 0.5]}``;
            - ``None`` (same as ``"none"``), or an already built sampler (returned as is; a plain
              function ``f(mask, generator) -> dict`` is wrapped in a ``PromptSampler``).
        key: the config key of the spec, named in errors.

    Returns:
        The sampler.
    """
    if spec is None:
        return NoPrompt()
    if isinstance(spec, PromptByName):
        spec = spec.spec
    if isinstance(spec, PromptSampler):
        return spec
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return _FunctionSampler(spec)
    if is_class_path_spec(spec):
        return instantiate(spec, PromptSampler, key)
    if isinstance(spec, str):
        name, kwargs = spec, {}
        if name not in PROMPTS:
            if "." in name or name[:1].isupper():  # a class path or class name
                return instantiate(name, PromptSampler, key)
            raise ValueError(
                f"{key}: Unknown prompt {name!r}; choose one of {sorted(PROMPTS)}, or give a PromptSampler "
                "class as class_path."
            )
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(
                f"{key}: prompt spec {dict(spec)} has no 'name' key and no 'class_path'; write "
                f"{{class_path: BoxPrompt, init_args: {{...}}}} or {{name: box, ...}} with a name from "
                f"{sorted(PROMPTS)}."
            )
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise TypeError(
            f"{key}: a prompt spec must be a name, a dict or a sampler, got {type(spec).__name__}."
        )
    if name not in PROMPTS:
        raise ValueError(f"{key}: Unknown prompt {name!r}; choose one of {sorted(PROMPTS)}.")
    try:
        return PROMPTS[name](**kwargs)
    except TypeError as exc:
        # ``from None``: the CLI reports the innermost cause, and this message holds it with the key.
        raise ValueError(
            f"{key}: prompt {name!r} ({PROMPTS[name].__name__}): bad arguments {kwargs} ({exc})."
        ) from None
