"""samflow's SOLOv2 student against SAPNet's own SOLOv2 (zhaoyangwei123/SAPNet, its mmdetection fork).

With ``SAMFLOW_SAPNET_SRC`` (a checkout, the folder holding ``TOV_mmdetection``) the reference's functions
run: ``SOLOV2Head._get_targets_single``, ``loss``, ``get_results`` / ``_get_results_single``,
``mask_matrix_nms``, ``center_of_mass``, ``dice_loss``, ``py_sigmoid_focal_loss``, cut out of their files
with ``ast`` (mmcv does not install here) and run on samflow's head outputs, in float64; the SAPNet
config (``mask_head``, ``test_cfg``) and the heads' ``init_cfg`` and layers are read the same way.
Without it, those outputs recorded in ``tests/reference_outputs/solov2.pt``.

Stand-ins for mmcv: ``multi_apply`` and ``force_fp32`` (mmdetection's semantics), ``ConvModule`` (a
recorder of its arguments), ``InstanceData`` (its meta fields), the DiceLoss / FocalLoss modules around
the file's own functions (weights and ``avg_factor`` as the config), and ``mmcv.imrescale``: samflow's
mask target (8 x 8 block average >= 0.5) instead of cv2's bilinear resize, so the targets compare
cell for cell; the reference measures the centre of mass in pixel indices (the first pixel's centre at
0), samflow in pixel-area coordinates (at 0.5, the frame of the grid cells), so the reference's
``center_of_mass`` is called + 0.5. Where two instances share a cell the two differ on purpose (samflow:
the smaller instance takes it; the reference: the later one's category, every instance's mask):
``test_overlaps_are_the_documented_difference``.
"""

from __future__ import annotations

import ast
import math
import types
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_code import ReferenceOutputs, assert_close, config_value, fingerprint, official_function
from torch import Tensor, nn

from samflow.instance import SOLOv2Head, matrix_nms
from samflow.instance.solov2 import mask_boxes

REF = ReferenceOutputs("solov2", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
TOV = Path("TOV_mmdetection")
V2 = TOV / "mmdet" / "models" / "dense_heads" / "solov2_head.py"
V1 = TOV / "mmdet" / "models" / "dense_heads" / "solo_head.py"
NMS = TOV / "mmdet" / "core" / "post_processing" / "matrix_nms.py"
MISC = TOV / "mmdet" / "core" / "utils" / "misc.py"
DICE = TOV / "mmdet" / "models" / "losses" / "dice_loss.py"
FOCAL = TOV / "mmdet" / "models" / "losses" / "focal_loss.py"
CONFIG = TOV / "configs2" / "COCO" / "SAPNet" / "SAPNet_r50_fpn_1x_coco.py"
SIDE = 128  # input side; the grids below divide it into cells of 32, 16 and 8 px... (4, 8, 16 cells)
GRIDS, STRIDES = (4, 8, 16), (32, 16, 8)
RANGES_PX = ((48.0, 256.0), (16.0, 64.0), (0.0, 24.0))  # powers-of-two fractions of SIDE: exact


def src(path: Path) -> Path:
    return Path(REF.src or ".") / path


# ---- the config and the heads' defaults, read with ast ----
def _init_default(path: Path, cls: str, arg: str) -> Any:
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = [*init.args.args[len(init.args.args) - len(init.args.defaults) :], *init.args.kwonlyargs]
    defaults = [*init.args.defaults, *init.args.kw_defaults]
    return config_value(dict(zip([a.arg for a in args], defaults, strict=True))[arg], {})


def _config() -> dict[str, Any]:
    names: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for stmt in ast.parse(src(CONFIG).read_text()).body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            if stmt.targets[0].id != "model":
                try:
                    names[stmt.targets[0].id] = config_value(stmt.value, names)
                except (ValueError, KeyError, TypeError):
                    pass
                continue
            for call in ast.walk(stmt.value):
                if isinstance(call, ast.Call):
                    for kw in call.keywords:
                        if kw.arg in ("mask_head", "test_cfg"):
                            found[kw.arg] = config_value(kw.value, names)
    return found


class _Recorder:
    """mmcv's ``ConvModule`` as its arguments: conv (cin, cout, k), bias ('auto': none under a norm),
    norm, activation (ReLU by default)."""

    def __init__(self, cin: int, cout: int, k: int, **kw: Any) -> None:
        norm = kw.get("norm_cfg")
        bias = kw.get("bias", "auto")
        self.spec = {
            "conv": [cin, cout, k],
            "bias": (norm is None) if bias == "auto" else bool(bias),
            "norm": None if norm is None else [norm["type"], norm["num_groups"]],
            "act": kw.get("act_cfg", {"type": "ReLU"})["type"] if kw.get("act_cfg", 1) is not None else None,
        }


def _official_layers(mask_head: dict[str, Any], norm: dict[str, Any]) -> dict[str, Any]:
    """``SOLOV2Head._init_layers`` and ``MaskFeatModule``'s ``conv_pred`` as the config builds them."""
    mf = mask_head["mask_feature_head"]
    head = types.SimpleNamespace(
        in_channels=mask_head["in_channels"],
        feat_channels=mask_head["feat_channels"],
        stacked_convs=mask_head["stacked_convs"],
        norm_cfg=norm,
        with_dcn=False,
        dcn_apply_to_all_conv=True,
        dcn_cfg=None,
        cls_out_channels=5,
        kernel_out_channels=mf["out_channels"],
    )
    conv = lambda cin, cout, k, padding=0: [cin, cout, k]
    official_function(
        src(V2),
        "_init_layers",
        "SOLOV2Head",
        nn=types.SimpleNamespace(ModuleList=list, Conv2d=conv),
        ConvModule=_Recorder,
    )(head)
    return {
        "kernel_convs": [m.spec for m in head.kernel_convs],
        "cls_convs": [m.spec for m in head.cls_convs],
        "conv_kernel": head.conv_kernel,
        "conv_cls": head.conv_cls,
        "conv_pred": _Recorder(mf["feat_channels"], mf["out_channels"], 1, norm_cfg=mf["norm_cfg"]).spec,
    }


def facts() -> dict[str, Any]:
    cfg = _config()
    norm = _init_default(src(V1), "SOLOHead", "norm_cfg")
    return {
        **cfg,
        "head_norm": norm,
        "head_init": _init_default(src(V2), "SOLOV2Head", "init_cfg"),
        "mask_feat_init": _init_default(src(V2), "MaskFeatModule", "init_cfg"),
        "layers": _official_layers(cfg["mask_head"], norm),
    }


@pytest.fixture(scope="module")
def reference_facts() -> dict[str, Any]:
    if not REF.available:
        pytest.skip(REF.skip_reason())
    return REF.get("facts", fingerprint(str(CONFIG), str(V2), str(V1)), facts)


def _specs(seq: nn.Sequential) -> list[dict[str, Any]]:
    """samflow's conv + GN + ReLU stacks in ``_Recorder``'s terms."""
    mods, out = list(seq), []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1 : i + 3]
            gn = next((n for n in nxt if isinstance(n, nn.GroupNorm)), None)
            out.append(
                {
                    "conv": [m.in_channels, m.out_channels, m.kernel_size[0]],
                    "bias": m.bias is not None,
                    "norm": None if gn is None else ["GN", gn.num_groups],
                    "act": "ReLU" if any(isinstance(n, nn.ReLU) for n in nxt) else None,
                }
            )
    return out


@official
def test_defaults_and_layers_are_the_sapnet_config(reference_facts):
    """Widths, norms, loss weights and test settings of the config's SOLOV2Head; the levels (3 made
    from one embedding, the reference 5 FPN levels) are the documented difference."""
    mh, test_cfg, layers = (
        reference_facts["mask_head"],
        reference_facts["test_cfg"],
        reference_facts["layers"],
    )
    head = SOLOv2Head(5)
    assert (head.score_thr, head.mask_thr, head.filter_thr) == (
        test_cfg["score_thr"],
        test_cfg["mask_thr"],
        test_cfg["filter_thr"],
    )
    assert (head.nms_pre, head.max_per_img, head.nms_kernel, head.nms_sigma) == (
        test_cfg["nms_pre"],
        test_cfg["max_per_img"],
        test_cfg["kernel"],
        test_cfg["sigma"],
    )
    assert head.sigma == mh["pos_scale"]
    assert (head.focal_alpha, head.focal_gamma) == (mh["loss_cls"]["alpha"], mh["loss_cls"]["gamma"])
    assert mh["loss_cls"]["loss_weight"] == 1.0 and mh["loss_cls"]["use_sigmoid"]
    assert head.dice_weight == mh["loss_mask"]["loss_weight"] and mh["loss_mask"]["use_sigmoid"]
    assert head.num_grids == tuple(mh["num_grids"][1:4])  # the reference's middle three grids
    assert _specs(head.kernel_convs) == layers["kernel_convs"]
    assert _specs(head.cate_convs) == layers["cls_convs"]
    out = head.kernel_out
    assert [out.in_channels, out.out_channels, out.kernel_size[0]] == layers["conv_kernel"]
    assert [head.cate_out.in_channels, 5, head.cate_out.kernel_size[0]] == layers["conv_cls"]
    # the mask features end in the reference's conv_pred: 1x1 conv, GN, ReLU (non-negative features)
    assert _specs(head.mask_branch)[-1] == layers["conv_pred"]
    mf = mh["mask_feature_head"]
    assert _specs(head.mask_branch)[0]["conv"][1] == mf["feat_channels"]


def _normal_ks(values: Tensor, std: float) -> float:
    """Kolmogorov-Smirnov distance of ``values`` to N(0, std^2)."""
    x = values.double().sort().values
    cdf = 0.5 * (1 + torch.erf(x / (std * math.sqrt(2))))
    n = x.numel()
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(k / n - cdf, cdf - (k - 1) / n).max())


@official
def test_initial_values_are_the_official_init_cfg(reference_facts):
    """Every conv of the branches N(0, 0.01^2) (KS against the exact law), conv biases 0, the category
    bias -ln(99) bit for bit, GroupNorm 1 / 0: mmdetection's init_cfg as mmcv applies it."""
    head_init, mf_init = reference_facts["head_init"], reference_facts["mask_feat_init"]
    assert head_init[0] == {"type": "Normal", "layer": "Conv2d", "std": 0.01}
    assert head_init[1]["override"] == {"name": "conv_cls"} and head_init[1]["bias_prob"] == 0.01
    assert mf_init == [{"type": "Normal", "layer": "Conv2d", "std": 0.01}]
    prior = float(torch.tensor(-math.log((1 - 0.01) / 0.01), dtype=torch.float32))
    pools: dict[str, list[Tensor]] = {}
    for seed in range(4):
        torch.manual_seed(seed)
        head = SOLOv2Head(
            3,
            in_channels=32,
            feat_channels=32,
            mask_feat_channels=16,
            mask_channels=16,
            num_convs=2,
            gn_groups=8,
        )
        for name, p in head.named_parameters():
            if name.split(".")[0] in ("up", "lat", "down"):
                continue  # samflow's pyramid: the reference's FPN, not its head
            pools.setdefault(name, []).append(p.detach().reshape(-1))
    assert len(pools) == 6 + 6 + 2 + 2 + 6  # two branches of 2 conv + GN, two outputs, the mask branch
    for name, draws in pools.items():
        values = torch.cat(draws)
        module = name.rsplit(".", 1)[0]
        if name == "cate_out.bias":
            assert bool((values == prior).all()), name
        elif name.endswith("bias"):
            assert bool((values == 0).all()), name
        elif isinstance(head.get_submodule(module), nn.GroupNorm):
            assert bool((values == 1).all()), name
        else:
            assert values.numel() >= 1024, name
            assert _normal_ks(values, 0.01) < 2.0 / math.sqrt(values.numel()) + 0.01, name


# ---- the reference's functions, on samflow's inputs ----
def _multi_apply(func, *args, **kwargs):  # mmdetection's multi_apply
    return tuple(map(list, zip(*map(partial(func, **kwargs), *args), strict=True)))


def _area_targets(mask: np.ndarray, scale: float) -> np.ndarray:
    """``mmcv.imrescale`` stand-in: samflow's mask target (8 x 8 block mean >= 0.5)."""
    t = torch.from_numpy(mask).float()[None, None]
    size = (round(mask.shape[0] * scale), round(mask.shape[1] * scale))
    return (F.interpolate(t, size=size, mode="area")[0, 0] >= 0.5).numpy().astype(np.uint8)


def _reference_head(head: SOLOv2Head) -> types.SimpleNamespace:
    """A ``self`` for the reference's SOLOV2Head methods with ``head``'s settings."""
    center = official_function(src(MISC), "center_of_mass")
    dice = official_function(src(DICE), "dice_loss", weight_reduce_loss=_weight_reduce)
    focal = official_function(src(FOCAL), "py_sigmoid_focal_loss", F=F, weight_reduce_loss=_weight_reduce)
    ns = types.SimpleNamespace(
        num_classes=head.num_classes,
        cls_out_channels=head.num_classes,
        kernel_out_channels=head.kernel_out.out_channels,
        scale_ranges=[(lo * SIDE, hi * SIDE) for lo, hi in head.scale_ranges],
        num_grids=list(head.num_grids),
        strides=list(head.strides),
        num_levels=len(head.num_grids),
        pos_scale=head.sigma,
        mask_stride=head.mask_stride,
        dynamic_conv_size=1,
        loss_mask=lambda pred, target, reduction_override=None: (
            head.dice_weight * dice(pred.sigmoid(), target, reduction=reduction_override)
        ),
        loss_cls=lambda pred, target, avg_factor=None: focal(
            pred,
            F.one_hot(target, head.num_classes + 1)[:, : head.num_classes],
            gamma=head.focal_gamma,
            alpha=head.focal_alpha,
            avg_factor=avg_factor,
        ),
        test_cfg=types.SimpleNamespace(
            score_thr=head.score_thr,
            mask_thr=head.mask_thr,
            filter_thr=head.filter_thr,
            nms_pre=head.nms_pre,
            max_per_img=head.max_per_img,
            kernel=head.nms_kernel,
            sigma=head.nms_sigma,
        ),
    )
    mmcv = types.SimpleNamespace(imrescale=_area_targets)
    for name in ("_get_targets_single", "loss", "get_results", "_get_results_single"):
        fn = official_function(
            src(V2),
            name,
            "SOLOV2Head",
            np=np,
            mmcv=mmcv,
            F=F,
            multi_apply=_multi_apply,
            force_fp32=lambda **kw: lambda f: f,
            InstanceData=_InstanceData,
            mask_matrix_nms=official_function(src(NMS), "mask_matrix_nms"),
            center_of_mass=lambda m: tuple(c + 0.5 for c in center(m)),
        )
        setattr(ns, name, types.MethodType(fn, ns))
    return ns


def _weight_reduce(loss, weight=None, reduction="mean", avg_factor=None):  # mmdetection's
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    return loss.sum() / avg_factor if reduction == "mean" else loss


class _InstanceData:
    """mmdetection's ``InstanceData``: the image meta as attributes."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.__dict__.update(meta)


def _head(**kw: Any) -> SOLOv2Head:
    torch.manual_seed(0)
    args = {
        "in_channels": 16,
        "feat_channels": 16,
        "mask_feat_channels": 16,
        "mask_channels": 8,
        "num_convs": 1,
        "gn_groups": 4,
        "strides": STRIDES[::-1],
        "num_grids": GRIDS[::-1],
        "scale_ranges": [(lo / SIDE, hi / SIDE) for lo, hi in RANGES_PX[::-1]],
    }
    return SOLOv2Head(3, **(args | kw)).double()


def _instances(seed: int, n: int) -> tuple[Tensor, Tensor]:
    """``n`` blobs (rectangles with a corner cut) of sizes over every level, apart from each other."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(4, 90, (2,), generator=g))
        y, x = (
            int(torch.randint(0, SIDE - h, (1,), generator=g)),
            int(torch.randint(0, SIDE - w, (1,), generator=g)),
        )
        masks[i, y : y + h, x : x + w] = True
        masks[i, y : y + h // 3, x : x + w // 2] = False
    return masks, torch.randint(0, 3, (n,), generator=g)


def _cells(head: SOLOv2Head, masks: Tensor, labels: Tensor, boxes: Tensor | None) -> int:
    return sum(int(p.sum()) for _, p, _ in head.assign(masks, labels, (SIDE, SIDE), boxes))


def _apart(head: SOLOv2Head, masks: Tensor, labels: Tensor, boxes: Tensor | None = None) -> list[int]:
    """The instances (in order, greedily) whose centre regions share no cell with another's."""
    keep: list[int] = []
    for i in range(len(masks)):
        sub = lambda ids: _cells(head, masks[ids], labels[ids], None if boxes is None else boxes[ids])
        if sub([*keep, i]) == sub([i]) + (sub(keep) if keep else 0):
            keep.append(i)
    return keep


def _reference_targets(head, boxes, labels, masks) -> dict:
    """The reference head's ``_get_targets_single`` on one image, by name."""
    targets = _reference_head(head)._get_targets_single(
        boxes, labels, masks, featmap_size=(SIDE // 8, SIDE // 8)
    )
    return dict(zip(("masks", "labels", "pos", "index"), targets, strict=True))


def _targets_case(seed: int, sigma: float = 0.2) -> tuple[Tensor, Tensor]:
    """Instances of ``seed`` whose centre regions share no cell on any level (kept in order)."""
    masks, labels = _instances(seed, 16)
    keep = _apart(_head(sigma=sigma), masks, labels)
    return masks[keep], labels[keep]


@official
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_are_the_reference_targets(seed):
    """Cells (scale ranges, centre region, the 3 x 3 cap), categories and mask targets per level."""
    head = _head(sigma=0.2 if seed < 2 else 1.0)  # sigma 1: the 3 x 3 cap binds
    masks, labels = _targets_case(seed, head.sigma)
    assert len(masks) >= 4
    boxes = mask_boxes(masks).double()
    got = REF.get(
        f"targets_{seed}",
        fingerprint(masks, labels, boxes, head.sigma),
        lambda: _reference_targets(head, boxes, labels, masks),
    )
    small = (F.interpolate(masks[None].double(), size=(SIDE // 8,) * 2, mode="area")[0] >= 0.5).to(
        torch.uint8
    )
    ours = head.assign(masks, labels, (SIDE, SIDE))
    assert sum(int(p.sum()) for _, p, _ in ours) > len(masks)  # several cells per instance somewhere
    for lvl, (cate, pos, idx) in enumerate(ours):
        assert torch.equal(cate, got["labels"][lvl]), lvl
        assert torch.equal(pos.flatten(), got["pos"][lvl]), lvl
        order = torch.as_tensor(got["index"][lvl], dtype=torch.long)
        assert sorted(order.tolist()) == torch.nonzero(pos.flatten())[:, 0].tolist()
        if order.numel():
            assert_close(small[idx.flatten()[order]], got["masks"][lvl], rtol=0, atol=0)


def _loss_case() -> tuple[SOLOv2Head, dict[str, Any], list[dict[str, Tensor]]]:
    head = _head()
    torch.manual_seed(1)
    outputs = head(torch.randn(2, 16, SIDE // 16, SIDE // 16, dtype=torch.float64))
    targets = []
    for seed in (0, 1):
        masks, labels = _targets_case(seed)
        targets.append({"masks": masks, "labels": labels})
    return head, outputs, targets


def _reference_loss(head: SOLOv2Head, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict:
    ref = _reference_head(head)
    return ref.loss(
        [k.detach() for k in outputs["kernel"]],
        [c.detach() for c in outputs["cate"]],
        outputs["mask_feat"].detach(),
        None,
        None,
        gt_labels=[t["labels"] for t in targets],
        gt_masks=[t["masks"] for t in targets],
        img=None,
        img_metas=None,
        gt_bboxes=[t.get("boxes", mask_boxes(t["masks"])).double() for t in targets],
    )


@official
def test_loss_is_the_reference_loss():
    """Focal (alpha 0.25, gamma 2, / (positives + 1)) and dice (eps 1e-3 on both sums, x 3, / positives)."""
    head, outputs, targets = _loss_case()
    got = REF.get(
        "loss", fingerprint(head, outputs, targets), lambda: _reference_loss(head, outputs, targets)
    )
    ours = head.loss(outputs, targets)
    torch.testing.assert_close(ours["loss_cls"], got["loss_cls"], rtol=1e-12, atol=0)
    torch.testing.assert_close(ours["loss_mask"], got["loss_mask"], rtol=1e-12, atol=0)


@official
def test_mps_loss_keeps_the_pseudo_boxes():
    """SAPNet's MPS terms: the MPS masks as targets with the pseudo masks' boxes (scale, centre region)."""
    head, outputs, targets = _loss_case()
    mps = []
    for t in targets:
        boxes = mask_boxes(t["masks"])
        half = t["masks"].clone()  # the upper half of each pseudo mask: its own box would change levels
        for i, (_, y0, _, y1) in enumerate(boxes.long().tolist()):
            half[i, (y0 + y1) // 2 :] = False
        keep = _apart(head, half, t["labels"], boxes)  # their moved centres may meet: leave those out
        mps.append({"masks": half[keep], "labels": t["labels"][keep], "boxes": boxes[keep]})
    assert sum(len(t["masks"]) for t in mps) >= 5
    got = REF.get("mps", fingerprint(head, outputs, mps), lambda: _reference_loss(head, outputs, mps))
    torch.testing.assert_close(head.loss(outputs, mps)["loss_mask"], got["loss_mask"], rtol=1e-12, atol=0)
    own = [{k: v for k, v in t.items() if k != "boxes"} for t in mps]
    assert (head.loss(outputs, own)["loss_mask"] - got["loss_mask"]).abs() > 1e-3  # the boxes matter here


def _nms_case() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    masks = torch.zeros(12, 24, 24, dtype=torch.bool)
    for i in range(12):
        y, x = (int(v) for v in torch.randint(0, 12, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(4, 12, (2,), generator=g))
        masks[i, y : y + h, x : x + w] = True
    scores = torch.rand(12, generator=g, dtype=torch.float64).sort(descending=True).values
    return masks, torch.randint(0, 2, (12,), generator=g), scores


@official
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_matrix_nms_is_the_reference(kernel):
    masks, labels, scores = _nms_case()
    nms = lambda: official_function(src(NMS), "mask_matrix_nms")
    got = REF.get(
        f"nms_{kernel}",
        fingerprint(masks, labels, scores, kernel),
        lambda: dict(
            zip(
                ("scores", "labels", "masks", "keep"),
                nms()(masks, labels, scores, kernel=kernel, sigma=2.0),
                strict=True,
            )
        ),
    )
    ours = matrix_nms(masks, labels, scores, kernel=kernel, sigma=2.0)
    assert (ours < scores).any()  # some decay
    torch.testing.assert_close(ours[got["keep"]], got["scores"], rtol=1e-12, atol=0)


def _predict_case() -> tuple[SOLOv2Head, dict[str, Any]]:
    head = _head()
    torch.manual_seed(2)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.3)
        head.cate_out.bias.fill_(-1.0)  # scores around 0.27: many above score_thr
    return head, head(torch.randn(2, 16, SIDE // 16, SIDE // 16, dtype=torch.float64))


def _reference_results(head: SOLOv2Head, outputs: dict[str, Any], metas: list[dict[str, Any]]) -> list:
    ref = _reference_head(head)
    res = ref.get_results(
        None,
        [k.detach() for k in outputs["kernel"]],
        [c.detach().clone() for c in outputs["cate"]],
        outputs["mask_feat"].detach(),
        None,
        metas,
    )
    return [{"masks": r.masks, "scores": r.scores, "labels": r.labels} for r in res]


@official
def test_inference_is_the_reference_post_processing():
    """Score threshold, 2 x 2 local maxima, masks above mask_thr with more pixels than their level's
    stride, maskness, Matrix NMS, filter_thr, max_per_img, the probabilities cropped and resized to the
    original size before the threshold."""
    head, outputs = _predict_case()
    head.max_per_img = 6  # binds: more detections pass
    metas = [
        {"img_shape": (112, 96, 3), "ori_shape": (150, 131, 3)},
        {"img_shape": (128, 80, 3), "ori_shape": (64, 40, 3)},
    ]
    got = REF.get(
        "predict", fingerprint(head, outputs, metas), lambda: _reference_results(head, outputs, metas)
    )
    ours = head.predict(outputs, [m["img_shape"][:2] for m in metas], [m["ori_shape"][:2] for m in metas])
    for (masks, scores, labels), want in zip(ours, got, strict=True):
        assert 0 < len(scores) <= 6
        torch.testing.assert_close(scores, want["scores"], rtol=1e-12, atol=0)
        assert torch.equal(labels, want["labels"])
        assert_close(masks, want["masks"], rtol=0, atol=0)
    # the stride rule is exercised: some candidates have pixels, but no more than their level's stride
    cand = torch.sigmoid(
        torch.einsum("ec,ehw->chw", outputs["kernel"][0][0].flatten(1), outputs["mask_feat"][0])
    )
    area = (cand > head.mask_thr).flatten(1).sum(1)
    assert bool(((area > 0) & (area <= head.strides[0])).any())


@official
def test_overlaps_are_the_documented_difference():
    """Two instances whose centre regions share cells: the reference gives a shared cell the later
    instance's category and trains its kernel on both masks; samflow gives it to the smaller one."""
    head = _head()
    masks = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    masks[0, 24:60, 20:60] = True  # the smaller (36 x 40), first
    masks[1, 20:66, 16:66] = True  # 46 x 50 around it, later
    labels = torch.tensor([0, 2])
    boxes = mask_boxes(masks).double()
    got = REF.get(
        "overlap",
        fingerprint(masks, labels, boxes),
        lambda: _reference_targets(head, boxes, labels, masks),
    )
    levels = head.assign(masks, labels, (SIDE, SIDE))
    shared = [i for i, (_, p, _) in enumerate(levels) if p.any()]
    assert shared, "the case must put both on one level"
    lvl = shared[0]
    cate, pos, _ = levels[lvl]
    index = list(got["index"][lvl])
    assert len(index) > int(pos.sum())  # the reference lists the shared cells twice
    assert set(cate[pos].tolist()) == {0}  # samflow: the smaller instance (class 0) everywhere
    assert 2 in got["labels"][lvl][pos].tolist()  # the reference: the later instance's class
