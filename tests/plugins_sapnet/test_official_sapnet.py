"""SAPNet's selection pass with its three reference quirks on, against the reference's own training code.

``pdg_box_centres``, ``fallback_last_proposal`` and ``plus_one`` claim to reproduce the reference
(zhaoyangwei123/SAPNet). Here the reference's own ``SAPNet.forward_train`` runs (both MIL stages, PDG,
PNPG, BMS, the negatives, the pseudo-mask matching and the MPS ranking), with its ``SAPHead.forward_train``,
``_bbox_forward_train``, ``merge_box``, ``merge_box_single`` and ``gen_negative_proposals``, each cut
out of the checkout with ``ast`` (``official_code.official_function``; mmdet/mmcv do not install on
current PyTorch). Given by their definitions: mmdet's ``bbox_overlaps``, ``bbox2roi``, ``multi_apply``
and ``bbox_xyxy_to_cxcywh``. Shared with samflow, so that any difference is the box rules' or the RoI
features': the RoI head's FC weights and the U(0, 1) draws of the random negatives. The reference's
``_bbox_forward`` reads its RoI features with ``mmcv_roi_align`` (mmcv's ``RoIAlign`` with the
reference's settings: adaptive sampling, aligned; ``test_roi_sampling.py``), not samflow's, and runs
samflow's FCs on them. The MIL losses and the mask head are not run (their inputs are kept; the losses
are compared in ``test_reference.py``).

With ``SAMFLOW_SAPNET_SRC`` (a checkout, the folder holding ``TOV_mmdetection``) the reference runs;
without it its outputs recorded in ``tests/reference_outputs/sapnet_pipeline.pt`` are used, under a
fingerprint of the weights and inputs. The inputs exercise every quirk: the annotated points are not
the box centres, BMS moves stage 0's pseudo box off every proposal, and the test checks that each
quirk turned off moves samflow away from the reference.
"""

from __future__ import annotations

import types
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from mmcv_roi_align import MMCV_DEFAULTS, mmcv_roi_align
from official_code import ReferenceOutputs, fingerprint, largest_difference, official_function

from samflow_plugins.sapnet.net import SapnetResult, SelectionNet

REF = ReferenceOutputs("sapnet_pipeline", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())

SIZE, CLASSES, NEGATIVES, MASK = 128, 3, 40, 8
# two images: the ground-truth boxes of the points (the reference's ``gt_true_bboxes``) and classes
TRUE_BOXES = (
    [[20, 20, 70, 70], [35, 30, 85, 80], [10, 60, 110, 120], [50, 10, 90, 60], [5, 5, 45, 45]],
    [[10, 10, 110, 100], [40, 40, 90, 90], [70, 20, 120, 70]],
)
LABELS = ([0, 0, 1, 0, 2], [1, 1, 2])
# the six SAM proposals of a point: its box scaled about its centre (the first the largest, the
# others inside it with IoU > 0.3, so BMS moves any other top-1 toward it), one shifted by 2 px
SCALES = (1.0, 0.8, 0.7, 0.75, 0.85, 0.6)
SHIFT = torch.tensor([0.0, 0, 0, 2, 0, 0])
OFFSET = torch.tensor([2.5, -1.5])  # annotated point = box centre + OFFSET
ROI_LAYER = {k: MMCV_DEFAULTS[k] for k in ("sampling_ratio", "aligned")}  # the reference's RoIAlign


def inputs() -> dict[str, Any]:
    true = torch.tensor([box for image in TRUE_BOXES for box in image], dtype=torch.float64)
    centre, wh = (true[:, :2] + true[:, 2:]) / 2, true[:, 2:] - true[:, :2]
    s = torch.tensor(SCALES, dtype=torch.float64)[None, :, None]
    half = wh[:, None] * s / 2
    shift = SHIFT.double()[None, :, None]
    proposals = torch.cat([centre[:, None] - half + shift, centre[:, None] + half + shift], -1)
    gen = torch.Generator().manual_seed(11)
    n = true.shape[0]
    return {
        "true": true,
        "labels": torch.tensor([label for image in LABELS for label in image]),
        "image_index": torch.tensor([i for i, b in enumerate(TRUE_BOXES) for _ in b]),
        "points": centre + OFFSET.double(),
        "proposals": proposals,  # (N, 6, 4)
        "masks": torch.rand(n, 6, MASK, MASK, generator=gen) > 0.5,
        "features": torch.randn(len(TRUE_BOXES), 4, 16, 16, generator=gen, dtype=torch.float64),
        "draws": torch.rand(4, len(TRUE_BOXES), NEGATIVES, generator=gen, dtype=torch.float64),
    }


def network() -> SelectionNet:
    """The head with PyTorch's default Linear draws (seed 5), not the reference's N(0, 0.01) init: logits
    of that init are nearly equal across proposals, where the selections compared here would be ties."""
    net = SelectionNet(in_channels=4, num_classes=CLASSES, hidden=16, num_negatives=NEGATIVES)
    torch.manual_seed(5)
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    return net.double()


def samflow(net: SelectionNet, x: dict[str, Any], **quirks: bool) -> SapnetResult:
    net.pdg_box_centres = quirks.get("pdg_box_centres", True)
    net.fallback_last_proposal = quirks.get("fallback_last_proposal", True)
    net.plus_one = quirks.get("plus_one", True)
    return net(
        x["features"],
        SIZE,
        x["proposals"],
        x["labels"],
        x["points"],
        x["image_index"],
        centre_boxes=x["true"],
        negative_draws=x["draws"],
    )


# ---- mmdet's helpers, by their definitions (mmdet/core) ----
def bbox_overlaps(
    a: torch.Tensor, b: torch.Tensor, is_aligned: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """IoU of boxes (..., m, 4) and (..., n, 4): (..., m, n), or (..., m) aligned."""
    area = lambda t: (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])
    if not is_aligned:
        a, b = a[..., :, None, :], b[..., None, :, :]
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    return overlap / (area(a) + area(b) - overlap).clamp(min=eps)


def bbox2roi(boxes: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], -1) for i, b in enumerate(boxes)])


def multi_apply(func: Any, *args: Any, **kwargs: Any) -> tuple[list, ...]:
    return tuple(map(list, zip(*map(partial(func, **kwargs), *args), strict=False)))


def bbox_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)


class _Draws:
    """A ``torch`` stand-in whose ``rand`` hands out the shared U(0, 1) draws in the reference's order."""

    def __init__(self, draws: torch.Tensor) -> None:  # (4, B, num): per image x1, y1, x2, y2
        self.queue = [draws[k, i] for i in range(draws.shape[1]) for k in range(4)]

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def rand(self, n: int) -> torch.Tensor:
        return self.queue.pop(0)


def reference(net: SelectionNet, x: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the reference's ``SAPNet.forward_train`` on ``x``; what it hands its mask head and losses."""
    models = Path(REF.src or ".") / "TOV_mmdetection" / "mmdet" / "models"
    head_file, net_file = models / "roi_heads" / "SAP_head.py", models / "detectors" / "SAPNet.py"
    helpers = {
        "F": torch.nn.functional,
        "bbox2roi": bbox2roi,
        "multi_apply": multi_apply,
        "bbox_overlaps": bbox_overlaps,
        "bbox_xyxy_to_cxcywh": bbox_xyxy_to_cxcywh,
    }
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its L_scores go to the GPU
    seen: dict[str, Any] = {"raw": {}, "loss": {}}

    def bbox_forward(x_, rois, gt_points, stage, proposals_list):  # samflow's FCs on mmcv's RoI features
        scale = x["features"].shape[-1] / SIZE  # one level: SingleRoIExtractor runs its one RoIAlign
        h = net.shared(mmcv_roi_align(x["features"], rois, net.roi_size, scale, **ROI_LAYER))
        cls, ins = net.fc_cls[stage](h), net.fc_ins[stage](h)
        if gt_points is not None:
            num = torch.cat(gt_points).shape[0]
            cls, ins = cls.view(num, -1, cls.shape[-1]), ins.view(num, -1, ins.shape[-1])
            seen["raw"][stage] = (rois, cls)
        return {
            "cls_score": cls,
            "ins_score": ins,
            "bbox_pred": None,
            "bbox_feats": None,
            "num_instance": None,
        }

    def loss_mil(stage, cls_score, *args, label_weights, **kwargs):
        seen["loss"][stage] = (cls_score, label_weights)
        return {}

    head = types.SimpleNamespace(with_bbox=True, num_stages=2, topk1=1, topk2=1, test_mean_iou=False)
    head._bbox_forward = bbox_forward
    head.bbox_head = types.SimpleNamespace(loss_mil=loss_mil)
    for name in ("forward_train", "_bbox_forward_train", "merge_box", "merge_box_single"):
        setattr(head, name, types.MethodType(official_function(head_file, name, "SAPHead", **helpers), head))
    outputs: list[tuple] = []
    forward = head.forward_train
    head.forward_train = lambda *a, **k: outputs.append(forward(*a, **k)) or outputs[-1]

    mask_head = types.SimpleNamespace()
    mask_head.forward_train = lambda *a, **k: seen.update(mask=a, mask_kw=k) or {}
    negatives = official_function(net_file, "gen_negative_proposals", torch=_Draws(x["draws"]), **helpers)
    detector = types.SimpleNamespace(
        num_stages=2,
        roi_head=head,
        mask_head=mask_head,
        extract_feat=lambda img: x["features"],
        train_cfg={"base_proposal": {"gen_num_neg": 0}, "fine_proposal": {"gen_num_neg": NEGATIVES}},
        test_cfg=types.SimpleNamespace(rpn=None),
    )
    forward_train = official_function(
        net_file, "forward_train", "SAPNet", gen_negative_proposals=negatives, **helpers
    )
    per_image = [x["image_index"] == i for i in range(len(TRUE_BOXES))]
    masks = [
        types.SimpleNamespace(to_tensor=lambda dtype, device, m=x["masks"][k]: m.flatten(0, 1))
        for k in per_image
    ]
    forward_train(
        detector,
        x["features"],
        [{"img_shape": (SIZE, SIZE, 3)} for _ in per_image],
        [x["proposals"][k].reshape(-1, 4) for k in per_image],
        masks,
        [x["true"][k] for k in per_image],
        [x["labels"][k] for k in per_image],
    )
    n = x["true"].shape[0]
    raw0 = seen["raw"][0][1]
    pseudo_masks, mask_list = seen["mask"][3], seen["mask"][5]  # (epoch, x, labels, masks, img, list, ...)
    return {
        "d0": outputs[0][3],  # per-proposal selection scores of the stages
        "d1": outputs[1][3],
        "pdg_factor": seen["loss"][0][0] / raw0,  # what PDG multiplied the stage-0 logits by
        "weight": seen["loss"][1][1],  # the stage-1 instance weights
        "bag1": seen["raw"][1][0][:, 1:].reshape(n, -1, 4),  # the PNPG bag
        "pseudo_box": torch.cat(seen["mask_kw"]["gt_bboxes"]),
        "pseudo_mask": torch.cat(pseudo_masks),
        "sorted_masks": torch.cat(mask_list, 1),  # (6, N, h, w): the masks by stage-1 score
    }


def compare(result: SapnetResult, expected: dict[str, Any], x: dict[str, Any]) -> None:
    torch.testing.assert_close(result.score0, expected["d0"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(result.score1, expected["d1"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(result.score0.sum(1), expected["weight"].double(), atol=1e-7, rtol=1e-6)
    factor = result.phi[..., None].pow(1 / 64).expand_as(expected["pdg_factor"])
    torch.testing.assert_close(factor, expected["pdg_factor"], atol=1e-6, rtol=0)  # its L_scores are float32
    # boxes: the reference's top-1 is the proposal times d / (d + 1e-8)
    torch.testing.assert_close(result.bag1, expected["bag1"], atol=1e-3, rtol=0)
    torch.testing.assert_close(result.pseudo_box, expected["pseudo_box"], atol=1e-3, rtol=0)
    rows = torch.arange(x["masks"].shape[0])
    assert torch.equal(x["masks"][rows, result.pseudo_index], expected["pseudo_mask"])
    for col, rank in enumerate((2, 4, 6)):
        assert torch.equal(x["masks"][rows, result.mps_index[:, col]], expected["sorted_masks"][rank - 1]), (
            rank
        )


@official
def test_the_three_quirks_on_equal_the_reference_forward_train(monkeypatch):
    x, net = inputs(), network()
    digest = fingerprint(net, x, SIZE, NEGATIVES, ROI_LAYER)
    expected = REF.get("forward_train", digest, lambda: reference(net, x, monkeypatch))
    with torch.no_grad():
        compare(samflow(net, x), expected, x)
        # each quirk off moves samflow off the reference on these inputs (they exercise it)
        off = samflow(net, x, pdg_box_centres=False)
        assert largest_difference(off.phi[..., None].pow(1 / 64), expected["pdg_factor"][..., :1]) > 1e-4
        off = samflow(net, x, fallback_last_proposal=False)
        assert largest_difference(off.bag1, expected["bag1"]) > 1.0
        off = samflow(net, x, plus_one=False)
        assert largest_difference(off.pseudo_box, expected["pseudo_box"]) > 0.99
