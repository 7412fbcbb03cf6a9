"""Training: a row's loss terms and the gradients it contributes are the same alone and in a mixed batch,
for every built-in plugin (LoRA: its own tests) and the combinations of ``row_cases.CASES``.

The batch (``row_cases.ROWS``) mixes prompt layouts (1 to 5 points, boxes, mask prompts, none), two
image sizes (padding) and 4 and 3 rows per image, each row with its own ground truth, as the HQSeg
recipes' prompt mix and COCO's instances give; each image carries its sample seed, so every draw
(PA-SAM's Gumbel noise, HQ-SAM's loss points, SAPNet's negatives) comes from ``ctx.rand``.

Reduction: every loss term is a mean over the batch's rows (SAMflow's losses and every plugin's),
so a part with n_j of the batch's N rows contributes n_j / N of its own term and gradient:
L = Σ_j (n_j / N) L_j. The exception (README): SAPNet's negative term L = 0.75 · mean_i(w_i) · Σ / N
(w_i = Σ_k d⁰_ik, detached), where L / (0.75 · mean(w) / N) is the sum over the parts.

Parts: each row alone where nothing is drawn; the draws of a row are keyed by its image's seed and its
rank among the image's rows (``ForwardContext.rand``), so where a plugin draws, the parts are the images
with their rows (a row alone would be rank 0 of its image). Each row's training-mode outputs (PA-SAM's
Gumbel top-k mining and its mined cells, WSI-SAM's uncorrected prediction) equal its part's to 1e-10.
Tolerance of terms and gradients: relative 1e-9 in float64 (gradients relative to their largest entry).
"""

from __future__ import annotations

import pytest
import torch
from row_cases import CASES, ROWS, build, make_module, max_differences, row_outputs, uses_context

EPOCH = 5
#: Cases that draw in their training step (``ctx.rand``).
DRAWS = {"hq_sam", "pa_sam", "sapnet", "hq_sam+pa_sam", "pa_sam+wsi_sam", "hq_sam+sapnet"}
#: Terms that are not means over rows: SAPNet's negative term (README), compared after its factor.
BATCH_FACTOR = "/neg"


def _step(module, batch):
    """Loss terms, per group (means / the negative term) the gradients in every trainable parameter,
    the negative term's batch factor, and each row's outputs (with PA-SAM's mined cells)."""
    torch.rand(7)  # the global generator moves on: a draw from it would differ in every call
    out, ctx = module.model.run(batch, module.model.context(batch, epoch=EPOCH))
    rows = []
    for r in range(batch.num_rows):
        got = row_outputs(out, r)
        for key, state in ctx.state.items():
            if "points" in state:
                got[f"{key} cells"] = state["points"][r].double()
        rows.append({k: v.detach() for k, v in got.items()})
    terms = {k: v for k, v in module.compute_losses(out, batch, ctx).items() if k != "total"}
    params = [p for p in module.parameters() if p.requires_grad]
    grads = {}
    for group in ("mean", "neg"):
        chosen = [v for k, v in terms.items() if k.endswith(BATCH_FACTOR) == (group == "neg")]
        total = sum(chosen)
        if chosen and total.requires_grad:
            got = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            grads[group] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
    factor = 1.0
    if "sapnet" in out.extras:
        score0 = out.extras["sapnet"].score0
        factor = float(0.75 * score0.sum(1).mean() / score0.shape[0])
    return {k: v.detach() for k, v in terms.items()}, grads, factor, rows


def _units(name: str) -> list[list[int]]:
    by_image = [[r for r, (_, j) in enumerate(ROWS) if j == image] for image in (0, 1)]
    if name in DRAWS:
        return by_image
    return [[r] for r in range(len(ROWS))]


@pytest.mark.parametrize("name", list(CASES))
def test_a_mixed_training_batch_is_its_rows_put_together(name):
    module = make_module(name).train()
    context = uses_context(name)
    terms, grads, factor, outputs = _step(module, build(range(len(ROWS)), seeds=True, context=context))
    assert terms and "mean" in grads
    assert any(g.abs().sum() > 0 for g in grads["mean"])
    n = len(ROWS)
    joined_terms = dict.fromkeys(terms, 0.0)
    joined_grads = {group: [torch.zeros_like(g) for g in gs] for group, gs in grads.items()}
    differences = {}
    for rows in _units(name):
        part_terms, part_grads, part_factor, part_outputs = _step(
            module, build(rows, seeds=True, context=context)
        )
        assert part_terms.keys() == terms.keys()
        for i, r in enumerate(rows):
            differences[f"row {r}"] = max(max_differences(outputs[r], part_outputs[i]).values())
        weights = {"mean": len(rows) / n, "neg": factor / part_factor}
        for term, value in part_terms.items():
            joined_terms[term] += weights["neg" if term.endswith(BATCH_FACTOR) else "mean"] * value
        for group, gs in part_grads.items():
            for total, g in zip(joined_grads[group], gs):
                total += weights[group] * g
    assert max(differences.values()) < 1e-10, differences
    for term, value in terms.items():
        torch.testing.assert_close(value, joined_terms[term], rtol=1e-9, atol=1e-12, msg=term)
    for group, gs in grads.items():
        scale = max(float(g.abs().max()) for g in gs)
        gap = max(float((g - j).abs().max()) for g, j in zip(gs, joined_grads[group]))
        assert gap <= 1e-9 * scale, f"{group} gradients: {gap:.3g} of {scale:.3g}"
