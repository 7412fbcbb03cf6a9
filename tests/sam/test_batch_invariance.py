"""A prompt row's output never depends on its batch-mates (issue 8, part 1).

Rows of a batch are padded to the batch's prompt layout (empty point slots with label -1, rows
without a box or mask prompt flagged False); that padding must be invisible. Proofs:

1. every ordered pair of prompt kinds (none, box, 1..5 points, box+points, mask, mask+box) on two
   different non-square images: each row of the pair's batch equals segment-anything's own
   ``Sam.forward`` on that row alone (all four mask tokens, IoU predictions, the selected mask), with
   single- and multimask output, in float64 (1e-12) and float32 (1e-5);
2. with the HQ-SAM and PA-SAM plugins on, each row of a mixed batch equals its run alone (every
   ``out.masks`` entry, ``iou_pred``, ``pred``); PA-SAM also in float32, where its top-k mining
   sees rounding differences;
3. several prompt rows per image (``image_index``) equal SAM's single-row calls and single-row runs;
4. ``select_rows`` / ``select_images`` give batches whose outputs are the corresponding rows.

float64 needs segment-anything's positional encoding to run in float64: it casts coordinates to
float32 (see ``prompt_cases.float64_positional_encoding``, the same arithmetic in the matrix's dtype).
The float32 cases use segment-anything unchanged.
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from prompt_cases import (
    KINDS,
    Prompt,
    float64_positional_encoding,
    make_batch,
    make_images,
    make_prompt,
    make_single,
    sam_forward,
)
from segment_anything.modeling import Sam

from samflow.batch import SamBatch
from samflow.plugins import PluginStack
from samflow.sam import EncoderCache, HookedSam, SamOutput, build_sam
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam

#: float64: only the order of floating-point sums differs (measured: below 1e-15);
#: float32: SDPA vs SAM's explicit softmax and other batch shapes (measured: below 1e-6).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
MULTIMASK = pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])

#: A batch of every kind over two images: 1 point next to 5, boxes and masks next to rows without.
MIXED = [
    ("points1", 0),
    ("points5", 1),
    ("box", 0),
    ("box+points", 1),
    ("none", 0),
    ("mask+box", 1),
    ("points3", 0),
    ("mask", 1),
    ("points2", 1),
    ("points4", 0),
]
assert sorted(k for k, _ in MIXED) == sorted(KINDS)


@pytest.fixture(scope="module")
def sams() -> dict[torch.dtype, Sam]:
    """The tiny random SAM (non-zero position tables) in float32 and, separately, in float64."""
    sam32 = randomize(build_sam("tiny", seed=0))
    sam64 = float64_positional_encoding(randomize(build_sam("tiny", seed=0)).double())
    return {torch.float32: sam32, torch.float64: sam64}


@pytest.fixture(scope="module")
def encoder_caches() -> dict[torch.dtype, EncoderCache]:
    """Test 1 runs 200 batches of the same two images per dtype: their embeddings are computed once."""
    return {torch.float32: EncoderCache(2), torch.float64: EncoderCache(2)}


@pytest.fixture(scope="module")
def reference(sams):
    """segment-anything's ``Sam.forward`` on one (kind, image) row, cached: (logits (M, h, w), iou (M,))."""
    cache: dict = {}

    def get(prompt: Prompt, dtype: torch.dtype, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (prompt.kind, prompt.image, dtype, multimask)
        if key not in cache:
            image, input_size = make_images(dtype)
            cache[key] = sam_forward(sams[dtype], image, input_size, prompt.to(dtype), multimask)
        return cache[key]

    return get


def run(model: HookedSam, batch: SamBatch) -> SamOutput:
    with torch.no_grad():
        return model(batch)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def diffs_to_sam(
    out: SamOutput, row: int, prompt: Prompt, dtype, multimask: bool, reference
) -> dict[str, float]:
    """Max |difference| of one output row to segment-anything on that row alone, per quantity."""
    single, single_iou = reference(prompt, dtype, False)
    multi, multi_iou = reference(prompt, dtype, True)
    if multimask:
        chosen = multi[multi_iou.argmax()][None]
    else:
        chosen = single
    return {
        "token0": max_diff(out.masks["sam"][row, :1], single),
        "tokens1-3": max_diff(out.masks["sam"][row, 1:], multi),
        "iou0": max_diff(out.iou_pred[row, :1], single_iou),
        "iou1-3": max_diff(out.iou_pred[row, 1:], multi_iou),
        "pred": max_diff(out.pred[row], chosen),
    }


def diffs_between(out: SamOutput, row: int, alone: SamOutput) -> dict[str, float]:
    """Max |difference| of row ``row`` of ``out`` to the single row of ``alone``: every mask, IoU, pred."""
    assert out.masks.keys() == alone.masks.keys()
    result = {name: max_diff(out.masks[name][row], alone.masks[name][0]) for name in out.masks}
    result["iou_pred"] = max_diff(out.iou_pred[row], alone.iou_pred[0])
    result["pred"] = max_diff(out.pred[row], alone.pred[0])
    return result


def check(failures: dict[str, dict[str, float]], atol: float) -> None:
    """Fail listing every row (with its quantities) whose difference exceeds ``atol``."""
    bad = {case: d for case, d in failures.items() if max(d.values()) > atol}
    worst = max((max(d.values()) for d in failures.values()), default=0.0)
    if bad:
        lines = [
            f"  {case}: " + ", ".join(f"{k} {v:.3g}" for k, v in d.items() if v > atol)
            for case, d in bad.items()
        ]
        pytest.fail(
            f"{len(bad)} of {len(failures)} rows differ by more than {atol:g} (worst {worst:.3g}):\n"
            + "\n".join(lines)
        )


# ---- 1. every pair of prompt kinds equals segment-anything row by row ----
@DTYPES
@MULTIMASK
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_row_of_a_pair_equals_sam_forward_alone(sams, encoder_caches, reference, kind, multimask, dtype):
    """Row 0 (``kind`` on image 0, 96 x 128) next to row 1 (every kind on image 1, 128 x 112).

    The image embeddings come from the encoder cache (the decoder is under test; tests 2 to 4 run the
    encoder every time)."""
    model = HookedSam(
        sams[dtype], PluginStack(), multimask_output=multimask, encoder_cache=encoder_caches[dtype]
    )
    model.eval()
    image, input_size = make_images(dtype)
    results = {}
    for other in KINDS:
        rows = [make_prompt(kind, 0).to(dtype), make_prompt(other, 1).to(dtype)]
        out = run(model, make_batch(image, input_size, rows))
        assert out.masks["sam"].shape == (2, 4, 32, 32)
        for r, prompt in enumerate(rows):
            results[f"[{kind}, {other}] row {r} ({prompt.kind})"] = diffs_to_sam(
                out, r, prompt, dtype, multimask, reference
            )
    check(results, ATOL[dtype])


# ---- 2. with plugins: a row in a mixed batch equals the row alone ----
def plugin_model(sams, plugin: str, dtype, multimask: bool) -> HookedSam:
    torch.manual_seed(0)
    stack = PluginStack({"hq": HQSam()} if plugin == "hq" else {"pa": PASam()})
    return HookedSam(sams[dtype], stack, multimask_output=multimask).to(dtype).eval()


@MULTIMASK
@pytest.mark.parametrize(
    ("plugin", "dtype"),
    [("hq", torch.float64), ("pa", torch.float64), ("pa", torch.float32)],
    ids=["hq_sam-float64", "pa_sam-float64", "pa_sam-float32"],
)
def test_row_in_a_mixed_batch_equals_the_row_alone_with_plugins(sams, plugin, dtype, multimask):
    """Every kind in one batch over two images (1 point next to 5, boxes next to none, ...): each row
    equals the batch of only its image and its own prompt."""
    model = plugin_model(sams, plugin, dtype, multimask)
    image, input_size = make_images(dtype)
    rows = [make_prompt(kind, j).to(dtype) for kind, j in MIXED]
    out = run(model, make_batch(image, input_size, rows))
    expected = (
        {"sam", f"{plugin}/hq", f"{plugin}/sam_hq"}
        if plugin == "hq"
        else {"sam"} | {f"pa/{m}" for m in ("coarse", "refined", "uncertainty")}
    )
    assert set(out.masks) == expected
    results = {}
    for r, prompt in enumerate(rows):
        alone = run(model, make_single(image, input_size, prompt))
        results[f"row {r} ({prompt.kind}, image {prompt.image})"] = diffs_between(out, r, alone)
    check(results, ATOL[dtype])


# ---- 3. several prompt rows per image ----
@DTYPES
def test_several_rows_per_image_equal_sam_and_single_row_runs(sams, reference, dtype):
    """image_index [0, 0, 1, 0]: each row equals segment-anything and its own single-row run."""
    model = HookedSam(sams[dtype], PluginStack()).eval()
    image, input_size = make_images(dtype)
    rows = [make_prompt(k, j).to(dtype) for k, j in (("box", 0), ("points3", 0), ("points1", 1), ("mask", 0))]
    batch = make_batch(image, input_size, rows)
    assert batch.image_index.tolist() == [0, 0, 1, 0]
    out = run(model, batch)
    to_sam, to_single = {}, {}
    for r, prompt in enumerate(rows):
        to_sam[f"row {r} ({prompt.kind})"] = diffs_to_sam(out, r, prompt, dtype, False, reference)
        single = run(model, make_single(image, input_size, prompt))
        to_single[f"row {r} ({prompt.kind})"] = diffs_between(out, r, single)
    check(to_sam, ATOL[dtype])
    check(to_single, ATOL[dtype])


# ---- 4. row and image selection ----
@pytest.mark.parametrize(
    "select",
    [
        ("rows", [3]),
        ("rows", [4, 0]),
        ("rows", [1, 2, 5, 7]),
        ("images", [1]),
        ("images", [0]),
        ("images", [1, 0]),
    ],
    ids=lambda s: f"{s[0]}{s[1]}" if isinstance(s, tuple) else str(s),
)
def test_selected_rows_and_images_give_the_full_batch_rows(sams, select):
    dtype = torch.float64
    model = HookedSam(sams[dtype], PluginStack()).eval()
    image, input_size = make_images(dtype)
    batch = make_batch(image, input_size, [make_prompt(kind, j).to(dtype) for kind, j in MIXED])
    out = run(model, batch)
    how, which = select
    if how == "rows":
        sub = batch.select_rows(which)
        expected_rows = which
        assert torch.equal(sub.image, batch.image)
        assert sub.image_index.tolist() == [batch.image_index[r].item() for r in which]
    else:
        sub = batch.select_images(which)
        expected_rows = [r for r in range(batch.num_rows) if batch.image_index[r].item() in which]
        assert torch.equal(sub.image, batch.image[which])
        assert torch.equal(sub.input_size, batch.input_size[which])
        assert sub.image_index.tolist() == [which.index(batch.image_index[r].item()) for r in expected_rows]
    assert sub.num_rows == len(expected_rows)
    part = run(model, sub)
    results = {}
    for i, r in enumerate(expected_rows):
        d = {name: max_diff(part.masks[name][i], out.masks[name][r]) for name in out.masks}
        d["iou_pred"] = max_diff(part.iou_pred[i], out.iou_pred[r])
        d["pred"] = max_diff(part.pred[i], out.pred[r])
        results[f"row {r} ({MIXED[r][0]}) -> {i}"] = d
    check(results, ATOL[dtype])
