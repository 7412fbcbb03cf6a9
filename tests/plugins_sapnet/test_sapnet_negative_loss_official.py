"""SAPNet's negative loss against the reference's own ``loss_mil`` (zhaoyangwei123/SAPNet).

The reference's negative term is computed in ``Shared2FCInstanceMILHead.loss_mil``
(``roi_heads/bbox_heads/MIL_bbox_head.py``). In stage 1 (the only stage that gets negatives:
``SAPNet.forward_train`` hands stage 0 ``None``) it is

    neg_loss = 0.75 · mean(label_weights) · Σ_m Σ_c w_m · QFL(σ(x_mc), 0) / num_sample

with ``gfocal_loss`` (QFL) of ``MILLoss`` against all-zero targets (every class, no background
output in stage 1), w_m the negative's 0/1 weight, ``label_weights`` the stage-0 instance weights
Σ_j d⁰_ij of the points, num_sample the number of points in the batch (not of negatives), 0.75
written into ``loss_mil`` (not ``loss_mil2.loss_weight``). The reference's stage-0 branch (softmax,
BCE against the background class, weight 1.0, averaged over negatives) never runs.

Here ``loss_mil`` itself runs (cut out of the checkout with ``ast``, ``official_code.official_function``,
with the checkout's ``MILLoss.forward`` / ``gfocal_loss`` as its ``loss_mil2`` and the checkout's
``weight_reduce_loss``, ``reduce_loss``, ``_expand_onehot_labels`` and ``accuracy``; mmcv's
``force_fp32`` / ``jit`` decorators as identities), in float64, on the inputs samflow's
``negative_loss`` gets: the values and the gradients with respect to the negatives' logits are
compared, on shared random inputs and on a ``SelectionNet`` pass (its own stage-1 logits of its own
negatives, and the gradients on its parameters). The reference's negatives list holds every random
box (weight 0 or 1) and a hard box only where it is kept; samflow's holds every hard box, weight 0
where the reference drops it: the official loss gets the reference's rows.

With ``SAMFLOW_SAPNET_SRC`` (the folder holding ``TOV_mmdetection``) the reference runs; without it
its outputs recorded in ``tests/reference_outputs/sapnet_negative_loss.pt`` are used. The pass's
recording holds the reference's loss on samflow's own negatives and logits of that pass (fingerprinted by
the head's weights and the inputs): a change upstream of the loss (the negatives' boxes, the RoI head)
fails it from the recording until it is recorded again with the checkout (``test_official_sapnet.py``
compares the negatives themselves).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from official_code import ReferenceOutputs, fingerprint, official_function
from test_official_sapnet import network  # the head with PyTorch's default Linear draws (seed 5)

import samflow_plugins.sapnet.net as sapnet_net
from samflow_plugins.sapnet.mil import negative_loss, prm_loss

REF = ReferenceOutputs("sapnet_negative_loss", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())

MIL_OPTIONS = {"binary_ins": False, "loss_weight": 0.25, "eps": 1e-6, "loss_type": "gfocal_loss"}  # loss_mil2
# the value and gradient of a float64 loss; the reference casts label_weights to float32 (``.float()``)
TOL = {"atol": 1e-12, "rtol": 1e-6}


def _identity_decorator(*args: Any, **kwargs: Any) -> Any:
    return lambda f: f


def reference_loss_mil(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The reference's ``Shared2FCInstanceMILHead.loss_mil``, bound to a head of the reference's config."""
    models = Path(REF.src or ".") / "TOV_mmdetection" / "mmdet" / "models"
    losses = models / "losses"
    mmcv = types.SimpleNamespace(jit=_identity_decorator)
    reduce_loss = official_function(losses / "utils.py", "reduce_loss", F=F)
    weight_reduce_loss = official_function(
        losses / "utils.py", "weight_reduce_loss", reduce_loss=reduce_loss, mmcv=mmcv
    )
    helpers = {
        "F": F,
        "accuracy": official_function(losses / "accuracy.py", "accuracy", mmcv=mmcv),
        "_expand_onehot_labels": official_function(losses / "cross_entropy_loss.py", "_expand_onehot_labels"),
        "weight_reduce_loss": weight_reduce_loss,
    }
    # ``loss_mil`` imports weight_reduce_loss from mmdet.models.losses.utils in its body
    for name in ("mmdet", "mmdet.models", "mmdet.models.losses", "mmdet.models.losses.utils"):
        module = types.ModuleType(name)
        module.__path__ = []  # type: ignore[attr-defined]
        module.weight_reduce_loss = weight_reduce_loss  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, name, module)
    mil_file = losses / "multi_instance_learning_loss.py"
    mil2 = types.SimpleNamespace(**MIL_OPTIONS)
    mil2.gfocal_loss = types.MethodType(official_function(mil_file, "gfocal_loss", "MILLoss"), mil2)
    mil2_forward = types.MethodType(official_function(mil_file, "forward", "MILLoss", **helpers), mil2)
    head = types.SimpleNamespace(num_stages=2, with_loss_pseudo=False, loss_mil1=None)  # the SAPNet config's
    head.loss_mil2 = _Callable(mil2_forward, mil2.gfocal_loss)
    loss_mil = official_function(
        models / "roi_heads" / "bbox_heads" / "MIL_bbox_head.py",
        "loss_mil",
        "Shared2FCInstanceMILHead",
        force_fp32=_identity_decorator,
        **helpers,
    )
    return types.MethodType(loss_mil, head)


class _Callable:
    """``MILLoss`` as the head holds it: called for the bag loss, ``gfocal_loss`` for the negatives."""

    def __init__(self, forward: Any, gfocal_loss: Any) -> None:
        self.forward, self.gfocal_loss = forward, gfocal_loss

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)


def run_reference(
    monkeypatch: pytest.MonkeyPatch,
    c1: torch.Tensor,
    s1: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    c_neg: torch.Tensor,
    neg_valid: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The reference's stage-1 losses on these logits, and the negative loss's gradient on ``c_neg``."""
    c_neg = c_neg.detach().clone().requires_grad_(True)
    out = reference_loss_mil(monkeypatch)(
        1,
        c1.detach(),
        s1.detach(),
        torch.ones(*c1.shape[:2], 1, dtype=torch.long),  # proposals_valid_list: every bag box
        c_neg,
        neg_valid.bool(),
        None,  # reg_box
        labels,
        None,  # gt_boxes
        label_weights=weight.detach(),
        retrain_weights=None,
    )
    (grad,) = torch.autograd.grad(out["neg_loss"], c_neg)
    return {"neg": out["neg_loss"].detach(), "neg_grad": grad, "prm": out["loss_instance_mil"].detach()}


def reference_rows(num_random: int, valid: torch.Tensor) -> torch.Tensor:
    """The rows of samflow's negatives (random, then hard) in the reference's list: every random one,
    a hard one only with weight 1."""
    keep = valid.clone().bool()
    keep[:num_random] = True
    return keep


def shared_inputs() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    n, q, c, images, per_image = 5, 26, 4, 2, 30
    m = images * per_image
    hard_valid = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    random_valid = (torch.rand(m, generator=gen) < 0.7).double()
    return {
        "c1": torch.randn(n, q, c, generator=gen, dtype=torch.float64),
        "s1": torch.randn(n, q, c, generator=gen, dtype=torch.float64),
        "labels": torch.tensor([0, 3, 3, 1, 2]),
        "weight": torch.rand(n, generator=gen, dtype=torch.float64) * 0.9 + 0.1,  # Σ_j d⁰_ij
        # logits spread so that σ covers (0, 1), where QFL's factor p² matters
        "c_neg": torch.randn(m + n, c, generator=gen, dtype=torch.float64) * 3 - 1,
        "valid": torch.cat([random_valid, hard_valid]),
        "num_random": m,
    }


@official
def test_negative_loss_equals_the_reference_loss_mil(monkeypatch):
    x = shared_inputs()
    keep = reference_rows(x["num_random"], x["valid"])
    assert 0 < int((~keep).sum()) and 0 < int((x["valid"][: x["num_random"]] == 0).sum())  # both kinds occur

    def reference() -> dict[str, torch.Tensor]:
        return run_reference(
            monkeypatch, x["c1"], x["s1"], x["labels"], x["weight"], x["c_neg"][keep], x["valid"][keep]
        )

    expected = REF.get("shared_inputs", fingerprint(x, MIL_OPTIONS), reference)
    c_neg = x["c_neg"].clone().requires_grad_(True)
    n = len(x["labels"])
    loss = negative_loss(c_neg, x["valid"], x["weight"], n)
    (grad,) = torch.autograd.grad(loss, c_neg)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected["neg"], **TOL)
    torch.testing.assert_close(grad[keep], expected["neg_grad"], **TOL)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))  # the reference has no such rows
    # the same call's bag term, samflow's PRM (in float64 here; test_reference.py compares it in float32)
    torch.testing.assert_close(prm_loss(x["c1"], x["s1"], x["labels"], x["weight"]), expected["prm"], **TOL)
    # the inputs tell the reduction apart: the sum over negatives and classes over the number of points,
    # times the mean instance weight, differs from the other readings (over the negatives, over the
    # kept negatives, without the weight, a mean over the classes)
    total = float(expected["neg"]) / (0.75 * float(x["weight"].mean()) / n)
    w = float(x["weight"].mean())
    for other in (
        0.75 * w * total / len(x["valid"]),
        0.75 * w * total / float(x["valid"].sum()),
        0.75 * total / n,
        0.75 * w * total / n / x["c_neg"].shape[1],
    ):
        assert abs(other - float(expected["neg"])) > 1e-3 * float(expected["neg"])


SIZE, CLASSES, NEGATIVES = 128, 3, 40


def pass_inputs() -> dict[str, Any]:
    """Two images, 5 points with 6 proposals each; some best proposals are above 64² (hard negatives)."""
    gen = torch.Generator().manual_seed(13)
    n, p = 5, 6
    centre = torch.rand(n, 1, 2, generator=gen, dtype=torch.float64) * 60 + 34
    half = torch.rand(n, p, 2, generator=gen, dtype=torch.float64) * 40 + 8
    return {
        "features": torch.randn(2, 4, 16, 16, generator=gen, dtype=torch.float64),
        "proposals": torch.cat([centre - half, centre + half], -1),
        "labels": torch.tensor([0, 2, 1, 1, 0]),
        "points": centre[:, 0],
        "image_index": torch.tensor([0, 0, 1, 1, 1]),
        "draws": torch.rand(4, 2, NEGATIVES, generator=gen, dtype=torch.float64),
    }


@official
def test_selection_pass_negative_term_equals_the_reference_loss_mil(monkeypatch):
    """The ``neg`` loss of a ``SelectionNet`` pass is the reference's on what the pass hands it: stage-1
    logits of its negatives (not stage 0's), the stage-0 instance weights, the number of points."""
    x, net = pass_inputs(), network()
    calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    head = net.head

    def spy_head(features, boxes, image_index, image_size, stage):
        cls, ins = head(features, boxes, image_index, image_size, stage)
        calls.append((stage, boxes, cls, ins))
        return cls, ins

    seen: dict[str, Any] = {}

    def spy_loss(c_neg, valid, inst_weight, num_points, *args, **kwargs):
        seen.update(c_neg=c_neg, valid=valid, weight=inst_weight, n=num_points)
        return negative_loss(c_neg, valid, inst_weight, num_points, *args, **kwargs)

    monkeypatch.setattr(net, "head", spy_head)
    monkeypatch.setattr(sapnet_net, "negative_loss", spy_loss)
    result = net(
        x["features"],
        SIZE,
        x["proposals"],
        x["labels"],
        x["points"],
        x["image_index"],
        negative_draws=x["draws"],
    )
    n = len(x["labels"])
    num_random = 2 * NEGATIVES
    assert [call[0] for call in calls] == [0, 1, 1]
    assert seen["c_neg"] is calls[2][2] and calls[2][1].shape[0] == num_random + n  # stage 1's head
    assert seen["n"] == n
    torch.testing.assert_close(seen["weight"], result.score0.sum(1))
    valid = seen["valid"]
    keep = reference_rows(num_random, valid)
    assert 0 < int(valid[:num_random].sum()) < num_random and 0 < int(valid[num_random:].sum())
    c1, s1 = calls[1][2], calls[1][3]  # the PNPG bag's stage-1 logits

    def reference() -> dict[str, torch.Tensor]:
        return run_reference(
            monkeypatch, c1, s1, x["labels"], seen["weight"], seen["c_neg"][keep], valid[keep]
        )

    expected = REF.get("selection_pass", fingerprint(net, x, SIZE, NEGATIVES, MIL_OPTIONS), reference)
    torch.testing.assert_close(result.losses["neg"], expected["neg"], **TOL)
    torch.testing.assert_close(result.losses["prm"], expected["prm"], **TOL)
    # gradients on the head's parameters: samflow's loss, and the reference's gradient on the logits
    # carried back through the same head
    params = [p for p in net.parameters() if p.requires_grad]
    ours = torch.autograd.grad(result.losses["neg"], params, retain_graph=True, allow_unused=True)
    upstream = torch.zeros_like(seen["c_neg"])
    upstream[keep] = expected["neg_grad"]
    theirs = torch.autograd.grad(seen["c_neg"], params, grad_outputs=upstream, allow_unused=True)
    assert sum(g is not None for g in ours) >= 4  # the shared FCs and stage 1's classifier
    for mine, ref in zip(ours, theirs, strict=True):
        assert (mine is None) == (ref is None)
        if mine is not None:
            torch.testing.assert_close(mine, ref, **TOL)
