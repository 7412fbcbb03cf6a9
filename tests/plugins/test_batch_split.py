"""A training step on a batch is the mean of the steps on its parts, for every built-in plugin and loss.

DDP averages the ranks' gradients: 2 ranks at batch b take the step of one process at batch 2b only
when the loss of a batch is the mean of its images' (rows') losses and nothing a row computes depends
on the rest of its batch (a batch statistic, a normalisation by the batch's total, a draw per batch).
Each case runs a plugin with its experiment's options (``experiments/*.yaml``) on the tiny SAM in
float64, in training mode with per-sample seeds (``ctx.rand``): every loss term of a batch of 4 images,
and its gradient, equals the mean of those of the halves (2 + 2); with one prompt row per image and
with two (other prompts on the same image, as COCO instances give). Evaluation too: the metrics and
the evaluation loss of the 4 images in one batch equal those of the two halves in two batches.

LoRA with dropout above 0 is no exception: each image's mask is drawn from its own seed.

The exceptions the README names are checked to be exceptions (so the README is told when they go):
``balanced_bce`` with ``per_image: false`` and SAPNet's negative term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import randomize

from samflow.batch import SamBatch
from samflow.metrics.registry import METRICS
from samflow.module import SamflowModule, SamSpec
from samflow.testing import random_batch
from samflow_plugins.ba_sam import BASam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.lora import LoRA
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.sapnet import SAPNet
from samflow_plugins.tokens import ExtraTokens
from samflow_plugins.wsi_sam import WSISam

SEEDS = [101, 202, 303, 404]
EPOCH = 5

# name -> (plugins, losses, prompt, SAM variant); the options of each plugin's experiment
CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any], str, str]] = {
    "quickstart": (
        lambda: {"decoder": DecoderTuning(), "tokens": ExtraTokens(lr=5e-3)},
        {"balanced_bce": {"weight": 1.0, "per_image": True}, "dice": 1.0},
        "box",
        "tiny",
    ),
    "sam_adapter": (  # sam_adapter_cod / _polyp (the shadow recipe's balanced_bce: below)
        lambda: {"adapter": SamAdapter(scale_factor=32, hfc="fft", freq_rate=0.25)},
        {"bce": 1.0, "soft_iou": 1.0},
        "none",
        "tiny",
    ),
    "hq_sam": (
        lambda: {"hq": HQSam(output="hq", point_loss=True, num_points=256)},
        {},
        "box",
        "tiny",
    ),
    "pa_sam": (  # mining from the start (the recipe: from epoch 5), Gumbel noise per row
        lambda: {"pa": PASam(layer=1, num_points=4, mining_start_epoch=-1)},
        {"bce": 1.0, "dice": 1.0},
        "box",
        "tiny",
    ),
    "wsi_sam": (
        lambda: {"wsi": WSISam(aggregation="sum", error_correction=True, correct_in_training=False)},
        {},
        "box",
        "tiny",
    ),
    "sapnet": (  # the negative term is left out here: see the exceptions below
        lambda: {"sapnet": SAPNet(num_classes=3, hidden=32, num_negatives=40)},
        {},
        "points",
        "tiny",
    ),
    "ba_sam": (
        lambda: {"ba": BASam(bias="distance", distance="euclidean", slopes="alibi", train_decoder=True)},
        {"bce": 1.0, "dice": 1.0},
        "points",
        "tiny",
    ),
    "lora": (  # lora_polyp: LoRA (dropout 0) with decoder tuning
        lambda: {
            "lora": LoRA(rank=4, alpha=4.0, dropout=0.0, targets=["qkv"]),
            "decoder": DecoderTuning(parts=["mask_decoder", "prompt_encoder"]),
        },
        {"bce": 1.0, "soft_iou": 1.0},
        "none",
        "tiny",
    ),
    "lora_dropout": (  # dropout above 0: each image's mask is its own draw (KeyedDropout)
        lambda: {"lora": LoRA(rank=4, alpha=4.0, dropout=0.25, targets=["qkv", "proj"])},
        {"bce": 1.0, "soft_iou": 1.0},
        "box",
        "tiny",
    ),
    "tokens": (lambda: {"tokens": ExtraTokens(num_tokens=2)}, {"bce": 1.0, "dice": 1.0}, "box", "tiny"),
    "decoder_tuning": (  # every other base loss term, with non-default options
        lambda: {"decoder": DecoderTuning()},
        {"focal": {"alpha": 0.25, "gamma": 2.0}, "dice": {"smooth": 0.0}, "soft_iou": {"eps": 1.0}},
        "box",
        "tiny",
    ),
    "mobile_sam": (  # MobileSAM's TinyViT trains too (its BatchNorm stays in eval mode)
        lambda: {"decoder": DecoderTuning(parts=["image_encoder.neck", "mask_decoder"])},
        {"bce": 1.0},
        "box",
        "mobile_sam",
    ),
    "efficient_sam": (
        lambda: {"hq": HQSam(num_points=256)},
        {"bce": 1.0},
        "box",
        "efficient_sam_vitt",
    ),
}
# float32 for MobileSAM: TinyViT's convolutions take a minute in float64 on a CPU
FLOAT32 = {"mobile_sam"}
# cases that differ from another only in training (dropout is the identity in evaluation)
TRAIN_ONLY = {"lora_dropout"}
# terms that are not a mean over the batch's rows, by their definition (README: where 2 ranks differ)
BATCH_TERMS = {"sapnet/neg"}


def _size(name: str) -> int:
    """The input side: 128 (the tiny SAM's), 64 with the other encoders (SAM ViT-B's decoder side)."""
    return 128 if CASES[name][3] == "tiny" else 64


def _module(name: str, losses: dict[str, Any] | None = None) -> SamflowModule:
    plugins, default_losses, _, variant = CASES[name]
    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant=variant, img_size=_size(name)),
        plugins=plugins(),
        losses=default_losses if losses is None else losses,
    )
    randomize(module.model.sam)
    return module.float() if name in FLOAT32 else module.double()


def _tolerance(name: str) -> float:
    return 1e-5 if name in FLOAT32 else 1e-9


def _batch(name: str, rows: int, seeds: list[int] | None = SEEDS) -> SamBatch:
    """4 images, ``rows`` prompt rows each (the second row of an image has another prompt)."""
    prompt = CASES[name][2]
    batch = random_batch(4, size=_size(name), prompt=prompt, seed=3, dtype=torch.float64)
    for i in range(4):  # objects of different areas: a normalisation by the batch's total would show
        batch.mask[i, :, :, : 10 * i] = 1
    batch.gt_original = [m[0].bool() for m in batch.mask]
    if name == "wsi_sam":  # the low-resolution view and its ground truth
        batch.context_image = batch.image.flip(-1)
        batch.context_mask = batch.mask.flip(-2)
    if rows == 2:
        batch = batch.select_rows([0, 0, 1, 1, 2, 2, 3, 3])
        other = torch.tensor([0.0, 1.0] * 4, dtype=torch.float64)
        if batch.box is not None:
            batch.box = batch.box + other[:, None] * torch.tensor([4.0, 3.0, -4.0, -2.0], dtype=torch.float64)
        if batch.points is not None:
            batch.points = batch.points + other[:, None, None] * 5
    batch = batch.to(torch.float32) if name in FLOAT32 else batch
    return batch.replace(sample_seed=list(seeds or []))


def _step(module: SamflowModule, batch: SamBatch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The loss terms of one training step (``compute_losses``) and the gradients of their sum, the
    terms of ``BATCH_TERMS`` left out, in the trainable parameters. The global generator is moved on
    first: a draw from it would differ in every call."""
    torch.rand(7)
    out, ctx = module.model.run(batch, module.model.context(batch, epoch=EPOCH))
    terms = module.compute_losses(out, batch, ctx)
    checked = sum(v for k, v in terms.items() if k != "total" and k not in BATCH_TERMS)
    params = [p for p in module.parameters() if p.requires_grad]
    got = torch.autograd.grad(checked, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
    return {k: v.detach() for k, v in terms.items()}, grads


def _halves(module: SamflowModule, batch: SamBatch) -> list[tuple[dict, list]]:
    return [_step(module, batch.select_images(part)) for part in ([0, 1, 2, 3], [0, 1], [2, 3])]


def _differences(whole, a, b) -> dict[str, float]:
    """The relative difference between the whole batch's and the mean of the halves': per loss term,
    and (``grad``) for the gradients, relative to the largest gradient entry: gradients that are 0 in
    exact arithmetic (SAM's attention key biases) hold rounding noise, which only a common scale ignores."""
    out = {}
    for term, value in whole[0].items():
        mean = (a[0][term] + b[0][term]) / 2
        out[term] = float((value - mean).abs() / mean.abs().clamp(min=1e-12))
    scale = max(float(g.abs().max()) for g in whole[1])
    gap = max(float((g - (ga + gb) / 2).abs().max()) for g, ga, gb in zip(*(x[1] for x in (whole, a, b))))
    out["grad"] = gap / max(scale, 1e-30)
    return out


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_training_step_on_four_images_is_the_mean_of_its_halves(name, rows):
    module = _module(name).train()
    if name == "mobile_sam":  # TinyViT's BatchNorm normalises with its running statistics
        norms = [m for m in module.model.sam.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
    whole, a, b = _halves(module, _batch(name, rows))
    assert len(whole[0]) > 1 and set(whole[0]) == set(a[0]) == set(b[0])
    assert any(g.abs().sum() > 0 for g in whole[1])
    differences = {k: v for k, v in _differences(whole, a, b).items() if k not in BATCH_TERMS}
    if BATCH_TERMS & set(whole[0]):
        del differences["total"]
    assert max(differences.values()) < _tolerance(name), differences


@pytest.mark.parametrize(
    ("name", "losses", "term"),
    [
        ("sam_adapter", {"balanced_bce": 1.0}, "balanced_bce"),  # sam_adapter_shadow
        ("sapnet", {}, "sapnet/neg"),
    ],
)
def test_the_readme_exceptions_are_not_batch_means(name, losses, term):
    """``balanced_bce`` with ``per_image: false`` counts N_pos and N_neg over the batch (SAM-Adapter's);
    SAPNet's negative term is scaled by the batch's mean instance weight (the reference's). The README
    names both as where 2 ranks differ from one process; if either becomes a mean of its rows, say so."""
    module = _module(name, losses).train()
    whole, a, b = _halves(module, _batch(name, 1))
    assert _differences(whole, a, b)[term] > 1e-6


def _eval_terms(module: SamflowModule, batch: SamBatch, seed: int) -> dict[str, float]:
    """The loss terms of an evaluation step, the global generator seeded with ``seed`` first; SAPNet's
    negative term divided by its batch factor c = 0.75 · mean_i(w_i) / N (w_i = Σ_j d⁰_ij), which
    leaves the sum of its images' negatives (README: the factor is the reference's)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out, ctx = module(batch)
        terms = {k: float(v) for k, v in module.compute_losses(out, batch, ctx).items() if k != "total"}
    if "sapnet/neg" in terms:
        score0 = out.extras["sapnet"].score0
        terms["sapnet/neg"] /= float(0.75 * score0.sum(1).mean() / score0.shape[0])
    return terms


@pytest.mark.parametrize("name", ["hq_sam", "sapnet"])
def test_evaluation_losses_draw_alike_in_any_batch_and_state(name):
    """HQ-SAM's loss points and SAPNet's random negatives in evaluation, where batches carry no sample
    seeds: one fixed draw, not the global generator's (which gave each batch, and each state of the
    generator, other points: HQ-SAM's evaluation loss of 4 images differed from its halves' by 1.5%)."""
    module = _module(name).eval()
    batch = _batch(name, 1, seeds=None)
    whole = _eval_terms(module, batch, seed=1)
    assert _eval_terms(module, batch, seed=2) == whole
    a, b = (_eval_terms(module, batch.select_images(part), seed=3) for part in ([0, 1], [2, 3]))
    assert len(whole) > 1
    for term, value in whole.items():
        halves = a[term] + b[term] if term == "sapnet/neg" else (a[term] + b[term]) / 2
        assert halves == pytest.approx(value, rel=1e-9), term


def _evaluate(module: SamflowModule, batches: list[SamBatch]) -> dict[str, float]:
    """One validation epoch over ``batches``: what it logs (metrics and the loss)."""
    logged: dict[str, float] = {}
    module.log_dict = lambda values, **_: logged.update(values)  # type: ignore[method-assign]
    module.on_validation_epoch_start()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            module.validation_step(batch, index)
    module.on_validation_epoch_end()
    return logged


@pytest.mark.parametrize(
    ("name", "rows", "metrics"),
    [(name, rows, ["iou", "dice", "mae"]) for name in sorted(CASES.keys() - TRAIN_ONLY) for rows in (1, 2)]
    + [("quickstart", rows, sorted(METRICS)) for rows in (1, 2)],
)
def test_evaluation_of_four_images_is_that_of_its_halves(name, rows, metrics):
    """Metrics and the evaluation loss of one batch of 4 equal those of the halves in two batches (as
    2 processes reduce them); every built-in metric once (a metric sees only the rows' outputs).
    Evaluation batches carry no sample seeds."""
    module = _module(name)
    module.metric_spec = metrics
    module.eval()
    batch = _batch(name, rows, seeds=None)
    whole = _evaluate(module, [batch])
    parts = _evaluate(module, [batch.select_images([0, 1]), batch.select_images([2, 3])])
    assert set(whole) == set(parts) and "val/loss" in whole and len(whole) > len(metrics)
    for key, value in whole.items():
        if key == "val/loss" and name == "sapnet":
            continue  # its negative term: the README's exception (test_the_readme_exceptions_...)
        assert parts[key] == pytest.approx(value, rel=_tolerance(name), abs=1e-12), key
