"""Prompt order inside a row: SAM takes a row's points as a set, and so does every built-in plugin but
SAPNet, whose row point is the row's first point (the annotated one; ``sapnet.plugin.row_points``).

Reordering the point slots of every row of the mixed batch (``row_cases.ROWS``: 1 to 5 points, so
the padded, invisible slots land between the points) changes no row's outputs (every mask, the IoU
predictions, the prediction, WSI-SAM's context rows, PA-SAM's mined cells) nor any evaluation loss
term, to 1e-10 in float64. SAPNet's decisions stay the same under a reordering that keeps each row's
first point first, and change when another point comes first (its documented rule).
"""

from __future__ import annotations

import pytest
import torch
from row_cases import CASES, ROWS, build, make_module, max_differences, row_outputs, uses_context

#: Slot orders of the batch's 5 point slots: reversed (another point first), and one that keeps
#: every row's first point first but moves the others and the padding.
REVERSED = [4, 3, 2, 1, 0]
FIRST_KEPT = [0, 3, 1, 4, 2]
SAPNET_FIELDS = ("score0", "score1", "phi", "bag1", "pseudo_box", "pseudo_index", "mps_index")


def _run(module, batch):
    with torch.no_grad():
        out, ctx = module.model.run(batch, module.model.context(batch))
        terms = {k: v for k, v in module.compute_losses(out, batch, ctx).items() if k != "total"}
    got = {}
    for r in range(len(ROWS)):
        got.update({f"row {r} {k}": v for k, v in row_outputs(out, r).items()})
    for key, state in ctx.state.items():
        if "points" in state:
            got[f"{key} cells"] = state["points"].double()
    got.update({f"loss {k}": v.reshape(1) for k, v in terms.items() if not k.startswith("sapnet/")})
    sapnet = (
        {f: getattr(out.extras["sapnet"], f).double() for f in SAPNET_FIELDS}
        if "sapnet" in out.extras
        else {}
    )
    return got, sapnet, {k: v for k, v in terms.items() if k.startswith("sapnet/")}


@pytest.mark.parametrize("name", list(CASES))
def test_reordered_points_change_no_output(name):
    module = make_module(name).eval()
    context = uses_context(name)
    base, base_sap, base_sap_terms = _run(module, build(range(len(ROWS)), context=context))
    for order in (REVERSED, FIRST_KEPT):
        batch = build(range(len(ROWS)), context=context, permute_points=order)
        labels = batch.point_labels
        assert labels is not None and labels.shape[1] == 5
        assert ((labels[:, :-1] == -1) & (labels[:, 1:] != -1)).any()  # padding between points
        got, sap, sap_terms = _run(module, batch)
        differences = max_differences(got, base)
        assert max(differences.values()) < 1e-10, {k: v for k, v in differences.items() if v >= 1e-10}
        if base_sap and order == FIRST_KEPT:
            differences = max_differences(sap, base_sap) | max_differences(sap_terms, base_sap_terms)
            assert max(differences.values()) < 1e-10, differences
        elif base_sap:  # another first point: another PDG point for the rows with several points
            assert not torch.equal(sap["phi"], base_sap["phi"]) or not torch.equal(
                sap["bag1"], base_sap["bag1"]
            )
