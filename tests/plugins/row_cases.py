"""Mixed prompt rows for the row-invariance tests of the built-in plugins (``test_row_invariance_*.py``).

A batch of two non-square images of different sizes (96 x 128 and 128 x 112 inside the tiny SAM's
128 x 128 input, so both are padded, differently) and seven prompt rows of every kind, 4 on image 0
and 3 on image 1: 1 point next to 5 (padded point slots), boxes next to rows without, mask prompts
next to rows without, a row with no prompt at all. The rows come from ``tests/sam/prompt_cases.py``
(whole-pixel coordinates inside each image); this module adds what the plugins read besides prompts:
each row's own ground truth (``instance_mask``, as COCO instances give), a class and six proposal
boxes (SAPNet), each image's id, sample seed and a context view with its ground truth (WSI-SAM).

``build`` makes the batch of any subset of the rows directly, without ``select_rows`` /
``select_images``: a row "alone" is a batch built from nothing but its image and its prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sam"))

from prompt_cases import INPUT_SIZES, Prompt, make_batch, make_images, make_prompt

from samflow.data.coco_batch import CocoBatch
from samflow.module import SamflowModule, SamSpec
from samflow.sam import SamOutput
from samflow_plugins.ba_sam import BASam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.sapnet import SAPNet
from samflow_plugins.tokens import ExtraTokens
from samflow_plugins.wsi_sam import WSISam

S = 128
#: (kind, image): 4 rows on image 0, 3 on image 1, every prompt layout the padding has to hide.
ROWS: list[tuple[str, int]] = [
    ("points1", 0),
    ("box+points", 1),
    ("none", 0),
    ("mask+box", 1),
    ("points5", 0),
    ("mask", 1),
    ("box", 0),
]
SEEDS = (101, 202)  # each image's sample seed (training batches)
NUM_CLASSES = 3

#: Every built-in but LoRA (its own helper's) with its experiment's options, and the combinations
#: the experiments use (quickstart: decoder tuning + extra tokens) or that share a hook site: PA-SAM's
#: mined tokens next to HQ-SAM's / WSI-SAM's tokens, encoder and decoder plugins at once, SAPNet's
#: loss next to another head. PA-SAM mines from the start (its recipe: from epoch 5); the losses are
#: each experiment's (``experiments/*.yaml``).
CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any]]] = {
    "sam_adapter": (
        lambda: {"adapter": SamAdapter(scale_factor=32, hfc="fft", freq_rate=0.25)},
        {"bce": 1.0, "soft_iou": 1.0},
    ),
    "ba_sam": (
        lambda: {"ba": BASam(bias="distance", distance="euclidean", slopes="alibi", train_decoder=True)},
        {"bce": 1.0, "dice": 1.0},
    ),
    "ba_sam-reference_code": (lambda: {"ba": BASam(bias="reference_code")}, {"bce": 1.0}),
    "hq_sam": (lambda: {"hq": HQSam(output="hq", point_loss=True, num_points=256)}, {}),
    "pa_sam": (
        lambda: {"pa": PASam(layer=1, num_points=4, mining_start_epoch=-1)},
        {"bce": 1.0, "dice": 1.0},
    ),
    "wsi_sam": (
        lambda: {"wsi": WSISam(aggregation="sum", error_correction=True, correct_in_training=False)},
        {},
    ),
    "sapnet": (lambda: {"sapnet": SAPNet(num_classes=NUM_CLASSES, hidden=32, num_negatives=40)}, {}),
    "tokens": (lambda: {"tokens": ExtraTokens(num_tokens=2)}, {"bce": 1.0, "dice": 1.0}),
    "decoder_tuning": (
        lambda: {"decoder": DecoderTuning()},
        {"focal": {"alpha": 0.25, "gamma": 2.0}, "dice": 1.0, "soft_iou": 1.0},
    ),
    "quickstart": (
        lambda: {"decoder": DecoderTuning(), "tokens": ExtraTokens(lr=5e-3)},
        {"balanced_bce": {"weight": 1.0, "per_image": True}, "dice": 1.0},
    ),
    "hq_sam+pa_sam": (
        lambda: {"pa": PASam(mining_start_epoch=-1), "hq": HQSam(num_points=256)},
        {"bce": 1.0},
    ),
    "pa_sam+wsi_sam": (lambda: {"pa": PASam(mining_start_epoch=-1), "wsi": WSISam()}, {"dice": 1.0}),
    "ba_sam+sam_adapter+tokens": (
        lambda: {"ba": BASam(), "adapter": SamAdapter(train_decoder=False), "tokens": ExtraTokens()},
        {"bce": 1.0},
    ),
    "hq_sam+sapnet": (
        lambda: {
            "hq": HQSam(num_points=256),
            "sapnet": SAPNet(num_classes=NUM_CLASSES, hidden=32, num_negatives=40),
        },
        {},
    ),
}
#: Cases whose rows of one image depend on each other by the method's definition: SAPNet's Point
#: Distance Guidance reads the other points of the image, and its random negatives are refused where
#: they overlap any proposal of the image. Their unit is the image with all its rows.
IMAGE_UNIT = {"sapnet", "hq_sam+sapnet"}


def _prompts(dtype: torch.dtype) -> list[Prompt]:
    return [make_prompt(kind, image).to(dtype) for kind, image in ROWS]


def _images(dtype: torch.dtype) -> dict[str, Tensor]:
    """Per image (2 of them): the padded image, input size, ground truth, context view and its truth."""
    image, input_size = make_images(dtype)
    gen = torch.Generator().manual_seed(77)
    mask = torch.zeros(2, 1, S, S, dtype=dtype)
    for j, (h, w) in enumerate(INPUT_SIZES):  # objects of different areas, inside each image
        mask[j, 0, 10 + 7 * j : h // 2 + 20, 5 : w // 2 + 15 * j] = 1
    context = torch.rand(2, 3, S, S, generator=gen, dtype=torch.float64).to(dtype)
    return {
        "image": image,
        "input_size": input_size,
        "mask": mask,
        "context_image": context,
        "context_mask": mask.flip(-1),
    }


def _row_fields(r: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """Row ``r``'s own ground truth (its image's object, cropped differently per row), class and six
    proposals: large nested boxes, so the other points of its image and class lie inside them (SAPNet's
    Point Distance Guidance then reads them: φ < 1). Rows of an image share a class, but row 2 (class 2)."""
    image = ROWS[r][1]
    h, w = INPUT_SIZES[image]
    instance = torch.zeros(1, S, S, dtype=dtype)
    instance[0, 4 * r : h - 3 * r, 2 + 5 * r : w - 2 * r] = 1
    base = torch.tensor([16.0 + r, 14.0 + 2 * r, w - 18.0 - r, h - 15.0 - r], dtype=dtype)
    grow = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=dtype)
    proposals = torch.stack([base + d * grow for d in (0.0, 3.0, 6.0, 9.0, 12.0, 15.0)])
    label = 2 if r == 2 else image
    return {"instance_mask": instance, "classes": torch.tensor(label), "proposals": proposals}


def build(
    rows: Sequence[int],
    dtype: torch.dtype = torch.float64,
    *,
    seeds: bool = False,
    context: bool = False,
    permute_points: Sequence[int] | None = None,
) -> CocoBatch:
    """The batch of ``rows`` (indices into ``ROWS``) and only their images, in the order they first appear.

    ``seeds``: each image's sample seed (a training batch); ``context``: the images' context views
    (WSI-SAM). ``permute_points``: reorder the point slots of every row (after padding, so invisible
    slots may land between points).
    """
    prompts, data = _prompts(dtype), _images(dtype)
    images = list(dict.fromkeys(ROWS[r][1] for r in rows))
    mapped = [
        Prompt(p.kind, images.index(p.image), p.points, p.labels, p.box, p.mask)
        for p in (prompts[r] for r in rows)
    ]
    batch = make_batch(data["image"][images], data["input_size"][images], mapped)
    if permute_points is not None and batch.points is not None:
        order = torch.as_tensor(permute_points)
        batch = batch.replace(points=batch.points[:, order], point_labels=batch.point_labels[:, order])
    fields = [_row_fields(r, dtype) for r in rows]
    extra: dict[str, Any] = {name: torch.stack([f[name] for f in fields]) for name in fields[0]}
    if seeds:
        extra["sample_seed"] = [SEEDS[j] for j in images]
    if context:
        extra.update(context_image=data["context_image"][images], context_mask=data["context_mask"][images])
    fields_of_batch = {n: getattr(batch, n) for n in batch.__dataclass_fields__ if not n.startswith("_")}
    return CocoBatch(**{**fields_of_batch, **extra}).replace(
        mask=data["mask"][images],
        gt_original=[data["mask"][j, 0].bool() for j in images],
        id=[f"img{j}" for j in images],
    )


def perturb(module: nn.Module, seed: int = 5, std: float = 0.05) -> None:
    """Add N(0, std²) to every parameter of ``module``: no zero-initialised weight hides a dependence."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype) * std)


def make_module(name: str, dtype: torch.dtype = torch.float64) -> SamflowModule:
    """``SamflowModule`` of case ``name`` on the tiny SAM (random position tables), plugins perturbed."""
    from helpers import randomize

    plugins, losses = CASES[name]
    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny", img_size=S), plugins=plugins(), losses=losses)
    randomize(module.model.sam)
    perturb(module.model.plugins)
    return module.to(dtype)


def uses_context(name: str) -> bool:
    return "wsi_sam" in name


def row_outputs(out: SamOutput, row: int) -> dict[str, Tensor]:
    """Everything the model gives for one row: every mask, the IoU predictions, the prediction and,
    with context views, the context rows' masks and prediction."""
    got = {f"mask {k}": v[row] for k, v in out.masks.items()}
    got["iou_pred"] = out.iou_pred[row]
    got["pred"] = out.pred[row]
    if out.context is not None:
        got.update({f"context {k}": v[row] for k, v in out.context.masks.items()})
        got["context pred"] = out.context.pred[row]
    return got


def max_differences(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    out = {}
    for key, value in a.items():
        assert value.shape == b[key].shape, (key, value.shape, b[key].shape)
        out[key] = float((value.double() - b[key].double()).abs().max()) if value.numel() else 0.0
    return out
