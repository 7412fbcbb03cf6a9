"""SAPNet's box rules and MIL loss against the reference's own functions (zhaoyangwei123/SAPNet).

With SAMFLOW_SAPNET_SRC naming a checkout of the reference repository (the folder holding
``TOV_mmdetection``) the reference's functions run; without it, their outputs recorded in
``tests/reference_outputs/sapnet.pt`` (``official_code.ReferenceOutputs``) on the same inputs. The
reference needs mmdet/mmcv, which do not install on current PyTorch, so only functions that run
standalone are loaded: their source is cut out of the reference files with ``ast`` and executed
with torch (and torchvision's ``box_iou`` in place of mmdet's ``bbox_overlaps``, the same IoU).
"""

from __future__ import annotations

import ast
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from official_code import ReferenceOutputs, fingerprint
from torchvision.ops import box_iou

from samflow_plugins.sapnet.boxes import hard_negatives, pnpg_positives, random_negatives
from samflow_plugins.sapnet.mil import prm_loss, psm_loss, qfl

REF = ReferenceOutputs("sapnet", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())


def models() -> Path:
    """The reference's ``mmdet/models`` folder (only with the checkout)."""
    return Path(REF.src or ".") / "TOV_mmdetection" / "mmdet" / "models"


def load(path: Path, name: str, cls: str | None = None, **namespace: Any) -> Any:
    """The function ``name`` (top level, nested, or a method of class ``cls``) from ``path``, run in ``namespace``."""
    tree: ast.AST = ast.parse(path.read_text())
    if cls is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict[str, Any] = {"torch": torch, **namespace}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)  # noqa: S102  (the reference, opted into by the env var)
    return scope[name]


class _Rand:
    """A ``torch`` stand-in whose ``rand`` hands out prepared draws in order."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws = list(draws)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def rand(self, n: int) -> torch.Tensor:
        return self.draws.pop(0)


@official
def test_pnpg_boxes_equal_the_reference_generate_coordinates():
    props = torch.tensor([[[3.0, 7.5, 41.0, 90.25], [0, 0, 1, 1]]])
    phis = (1.0, 0.7)
    # the reference's growth steps and rates: 1..15 at 0.01, then 16..20 at 0.005 (phi 1)
    # or 1..5 at -0.005 / phi
    steps = ((1, 16, 0.01), (16, 21, 0.005), (1, 6, -0.005))

    def reference() -> dict[str, torch.Tensor]:
        # a closure in the reference: it casts to the enclosing ``proposals``
        gen = load(models() / "roi_heads" / "SAP_head.py", "generate_coordinates", proposals=props)
        x1, y1, x2, y2 = props[0, 0]
        args = (x1 + x2, y1 + y2, x2 - x1, y2 - y1)
        out = {}
        for phi in phis:
            grow = gen(*args, torch.arange(1, 16).float(), 0.01)
            last = (
                gen(*args, torch.arange(16, 21).float(), 0.005)
                if phi == 1
                else gen(*args, torch.arange(1, 6).float(), -0.005 / torch.tensor(phi))
            )
            out[str(phi)] = torch.cat([grow, last])
        return out

    expected = REF.get("pnpg_boxes", fingerprint(props, phis, steps), reference)
    for phi in phis:
        bag = pnpg_positives(props, torch.tensor([0]), torch.tensor([[phi, 1.0]]))
        assert torch.allclose(bag[0, 2:], expected[str(phi)].clamp(min=0), atol=1e-5)


@official
def test_negatives_equal_the_reference_gen_negative_proposals():
    g = torch.Generator().manual_seed(3)
    num, h, w = 200, 48, 80
    # point 0's best proposal is small (no hard negative), point 1's is large (one, weight 1)
    props = torch.tensor([[[2.0, 3, 60, 40], [10, 10, 30, 30]], [[4, 5, 79, 75], [0, 0, 100, 80]]])
    score = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    draws = [torch.rand(num, generator=g) for _ in range(4)]

    def reference() -> dict[str, torch.Tensor]:
        gen = load(models() / "detectors" / "SAPNet.py", "gen_negative_proposals", bbox_overlaps=box_iou)
        scope = gen.__globals__
        scope["torch"] = _Rand(draws)
        try:
            ref_boxes, ref_valid = gen(
                [torch.zeros(2, 2)],
                {"gen_num_neg": num},
                [props.reshape(-1, 4)],
                [{"img_shape": (h, w, 3)}],
                [score],
                1,
            )
        finally:
            scope["torch"] = torch
        return {"boxes": ref_boxes[0], "valid": ref_valid[0]}

    expected = REF.get("negatives", fingerprint(props, score, draws, num, h, w), reference)
    uniforms = torch.stack(draws)[:, None]  # (4, 1, num)
    neg, _, valid = random_negatives(
        props, torch.tensor([0, 0]), torch.tensor([[h, w]]), num, uniforms=uniforms
    )
    hard, hard_valid = hard_negatives(props, score.argmax(1))
    keep = hard_valid > 0
    assert keep.tolist() == [False, True]
    # the reference scales by Python floats (1.2 * w in double), samflow in the tensor's dtype
    assert torch.allclose(torch.cat([neg, hard[keep]]), expected["boxes"], atol=1e-4)
    assert torch.equal(torch.cat([valid, hard_valid[keep]]), expected["valid"].float())


@official
def test_qfl_equals_the_reference_gfocal_loss():
    p, q = torch.rand(5, 7), (torch.rand(5, 7) > 0.5).float()

    def reference() -> dict[str, torch.Tensor]:
        gfocal = load(models() / "losses" / "multi_instance_learning_loss.py", "gfocal_loss")
        return {"loss": gfocal(types.SimpleNamespace(eps=1e-6), p, q)}

    expected = REF.get("qfl", fingerprint(p, q, 1e-6), reference)
    assert torch.allclose(qfl(p, q).sum(-1), expected["loss"])


MIL_OPTIONS = {"binary_ins": False, "loss_weight": 0.25, "eps": 1e-6}


def _mil_loss(loss_type: str) -> Any:
    """The reference's ``MILLoss.forward`` with mmdet's three helpers given by their definitions."""
    path = models() / "losses" / "multi_instance_learning_loss.py"

    def weight_reduce_loss(
        loss, weight=None, reduction="mean", avg_factor=None
    ):  # mmdet: multiply, sum / avg
        return (loss * weight if weight is not None else loss).sum() / avg_factor

    forward = load(
        path,
        "forward",
        "MILLoss",
        F=torch.nn.functional,
        accuracy=lambda pred, target: torch.tensor(0.0),
        _expand_onehot_labels=lambda labels, w, c: (torch.nn.functional.one_hot(labels, c), None, None),
        weight_reduce_loss=weight_reduce_loss,
    )
    owner = types.SimpleNamespace(**MIL_OPTIONS, loss_type=loss_type)
    owner.gfocal_loss = types.MethodType(load(path, "gfocal_loss", "MILLoss"), owner)
    return types.MethodType(forward, owner)


@official
def test_psm_and_prm_losses_equal_the_reference_mil_loss():
    torch.manual_seed(0)
    n, p, c = 4, 6, 5
    labels = torch.tensor([0, 3, 3, 1])
    valid = torch.ones(n, p, 1)
    c0, s0 = torch.randn(n, p, c + 1), torch.randn(n, p, c + 1)
    phi = torch.rand(n, p) * 0.5 + 0.5
    c1, s1 = torch.randn(n, p + 20, c), torch.randn(n, p + 20, c)
    w = torch.rand(n)

    def reference() -> dict[str, torch.Tensor]:
        scaled = c0 * phi[..., None].pow(1 / 64)  # the reference rescales the logits before its loss
        psm, _, _ = _mil_loss("binary_cross_entropy")(scaled.softmax(-1), s0, labels, valid, torch.ones(n, 1))
        prm, _, _ = _mil_loss("gfocal_loss")(c1.sigmoid(), s1, labels, torch.ones(n, p + 20, 1), w[:, None])
        return {"psm": psm, "prm": prm}

    inputs = fingerprint(labels, valid, c0, s0, phi, c1, s1, w, MIL_OPTIONS)
    expected = REF.get("mil_loss", inputs, reference)
    assert torch.allclose(psm_loss(c0, s0, labels, phi), expected["psm"], atol=1e-6)
    assert torch.allclose(prm_loss(c1, s1, labels, w), expected["prm"], atol=1e-6)
