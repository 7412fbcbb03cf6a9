"""Evaluation: a prompt row's outputs with every built-in plugin equal that row alone (issue 8's
invariance, plugin by plugin).

The batch (``row_cases.ROWS``) holds two images of different sizes (different padding) with 4 and 3
rows of every prompt layout: 1 point next to 5 (4 padded point slots), boxes next to rows without,
mask prompts next to rows without, a row with no prompt. Each row's outputs -- every mask a plugin
gives (``<key>/...``), SAM's four masks and IoU predictions, the prediction, WSI-SAM's context rows,
PA-SAM's mined points -- equal those of a batch built from nothing but that row and its image.
SAPNet's decisions (``out.extras["sapnet"]``) and every evaluation loss term are compared per image:
SAPNet's Point Distance Guidance and negatives read the image's other rows by definition, and a row's
loss draws (HQ-SAM's points) are keyed by its image and its rank among the image's rows.

Tolerances: float64 1e-10 (only the order of sums differs; measured at most 2.3e-15), float32 1e-5
(measured at most 1.1e-6); loss terms relative 1e-9 (float64) and 1e-5 (float32). PA-SAM's evaluation top-k compares scores, so float32 rounding could in
principle flip a near-tie; the cases here have none.
"""

from __future__ import annotations

import pytest
import torch
from row_cases import (
    CASES,
    ROWS,
    build,
    make_module,
    max_differences,
    row_outputs,
    uses_context,
)

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOSS_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
#: float32 for the cases whose plugins round differently in it (an encoder plugin, the heads, mining).
FLOAT32 = ["sam_adapter", "hq_sam", "pa_sam", "wsi_sam"]
PARAMS = [(name, torch.float64) for name in CASES] + [(name, torch.float32) for name in FLOAT32]


def _run(module, batch):
    """Outputs, context and (with ground truth) the evaluation loss terms and SAPNet's decisions."""
    with torch.no_grad():
        out, ctx = module.model.run(batch, module.model.context(batch))
        terms = module.compute_losses(out, batch, ctx)
    return out, ctx, {k: v for k, v in terms.items() if k != "total"}


def _check(differences: dict[str, dict[str, float]], atol: float) -> None:
    bad = {row: {k: v for k, v in d.items() if v > atol} for row, d in differences.items()}
    bad = {row: d for row, d in bad.items() if d}
    assert not bad, f"outputs differ by more than {atol:g}: {bad}"


def _rows_of(out, ctx, rows) -> dict[str, torch.Tensor]:
    """The outputs of ``rows`` (stacked), PA-SAM's mined cells and SAPNet's decisions for them."""
    per_row = [row_outputs(out, r) for r in rows]
    got = {k: torch.stack([p[k] for p in per_row]) for k in per_row[0]}
    for key, state in ctx.state.items():  # PA-SAM's mined points, by their cells
        if "points" in state:
            got[f"{key} cells"] = state["points"][rows].double()
    result = out.extras.get("sapnet")
    if result is not None:
        fields = ("score0", "score1", "phi", "bag1", "pseudo_box", "pseudo_index", "mps_index")
        got.update({f"sapnet {f}": getattr(result, f)[rows].double() for f in fields})
    return got


@pytest.mark.parametrize(("name", "dtype"), PARAMS, ids=[f"{n}-{str(d)[6:]}" for n, d in PARAMS])
def test_each_row_alone_equals_it_in_a_mixed_batch(name, dtype):
    """Each row alone, then each image with its rows alone: the same outputs (SAPNet's decisions per
    image); every evaluation loss term of the batch is the row-weighted mean of the images' terms (a
    mean over the batch's rows), SAPNet's negative term after its batch factor (README: the exception)."""
    module = make_module(name, dtype).eval()
    context = uses_context(name)
    batch = build(range(len(ROWS)), dtype, context=context)
    assert batch.point_labels is not None and (batch.point_labels == -1).any()
    assert batch.has_box is not None and not batch.has_box.all()
    assert batch.has_mask_prompt is not None and not batch.has_mask_prompt.all()
    assert not torch.equal(batch.input_size[0], batch.input_size[1])
    out, ctx, terms = _run(module, batch)
    assert out.masks["sam"].shape[0] == len(ROWS) and terms
    assert (out.context is not None) == context
    differences = {}
    for r, (kind, _) in enumerate(ROWS):
        alone_out, alone_ctx, _ = _run(module, build([r], dtype, context=context))
        got, expected = _rows_of(out, ctx, [r]), _rows_of(alone_out, alone_ctx, [0])
        differences[f"row {r} ({kind})"] = max_differences(
            {k: v for k, v in got.items() if not k.startswith("sapnet")},
            {k: v for k, v in expected.items() if not k.startswith("sapnet")},
        )
    combined = dict.fromkeys(terms, 0.0)
    for image in (0, 1):
        rows = [r for r, (_, j) in enumerate(ROWS) if j == image]
        part_out, part_ctx, part_terms = _run(module, build(rows, dtype, context=context))
        differences[f"image {image}"] = max_differences(
            _rows_of(out, ctx, rows), _rows_of(part_out, part_ctx, list(range(len(rows))))
        )
        for term, value in part_terms.items():
            combined[term] += float(value) * _weight(term, part_out, len(rows))
    _check(differences, ATOL[dtype])
    for term, value in terms.items():
        expected_value = combined[term] / _weight(term, out, len(ROWS))
        assert float(value) == pytest.approx(expected_value, rel=LOSS_RTOL[dtype], abs=1e-12), term


def _weight(term: str, out, rows: int) -> float:
    """How a batch's term weighs a part: its rows (a mean over rows), or for SAPNet's negative term
    L = 0.75 · mean_i(w_i) · Σ / N, w_i = Σ_j d⁰_ij, the inverse of the batch factor 0.75 · mean(w) / N
    (L / factor is a sum over the batch's images and rows)."""
    if term.endswith("/neg"):
        score0 = out.extras["sapnet"].score0
        return 1.0 / float(0.75 * score0.sum(1).mean() / score0.shape[0])
    return float(rows)
