"""SAPNet's FPN against the reference config (``configs2/COCO/SAPNet/SAPNet_r50_fpn_1x_coco.py``).

The reference (zhaoyangwei123/SAPNet, an mmdetection fork; mmdet/mmcv do not install here) configures
mmdetection's ``FPN`` neck and a ``SingleRoIExtractor``. With ``SAMFLOW_SAPNET_SRC`` (a checkout, the
folder holding ``TOV_mmdetection``) the config is read with ``ast`` (the ``neck`` and
``bbox_roi_extractor`` dicts, names such as ``norm_cfg`` resolved) and so are the defaults of the
checkout's ``FPN.__init__`` and ``SingleRoIExtractor.__init__`` (``act_cfg``, ``upsample_cfg``,
``init_cfg``, ``no_norm_on_lateral``, ``finest_scale``...); without it, those facts recorded in
``tests/reference_outputs/sapnet_fpn.pt`` (``official_code.ReferenceOutputs``). They are turned into
the network mmdetection builds from them (``expected_network``: its semantics, mmdet 2.25 / mmcv 1.5:
a ``ConvModule`` with a norm has no conv bias, ``on_input`` puts the first extra conv on the last
backbone map) and compared with samflow's ``FPN`` as built (``described``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from official_code import ReferenceOutputs, config_value, fingerprint
from torch import nn

from samflow_plugins.sapnet.fpn import FPN, ResNet50FPN
from samflow_plugins.sapnet.net import roi_levels

REF = ReferenceOutputs("sapnet_fpn", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
CONFIG = Path("TOV_mmdetection") / "configs2" / "COCO" / "SAPNet" / "SAPNet_r50_fpn_1x_coco.py"
NECK = Path("TOV_mmdetection") / "mmdet" / "models" / "necks" / "fpn.py"
EXTRACTOR = (
    Path("TOV_mmdetection")
    / "mmdet"
    / "models"
    / "roi_heads"
    / "roi_extractors"
    / "single_level_roi_extractor.py"
)


def config_dicts(path: Path) -> dict[str, Any]:
    """The ``neck`` and ``bbox_roi_extractor`` dicts of the config's ``model``."""
    names: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for stmt in ast.parse(path.read_text()).body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)):
            continue
        target = stmt.targets[0].id
        if target != "model":
            try:
                names[target] = config_value(stmt.value, names)
            except (ValueError, KeyError, TypeError):
                pass  # not a literal (e.g. built from a function call): not needed here
            continue
        for call in ast.walk(stmt.value):
            if isinstance(call, ast.Call):
                for kw in call.keywords:
                    if kw.arg in ("neck", "bbox_roi_extractor"):
                        found[kw.arg] = config_value(kw.value, names)
    return found


def init_defaults(path: Path, cls: str) -> dict[str, Any]:
    """The literal keyword defaults of ``cls.__init__`` in ``path``."""
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    positional = init.args.args[len(init.args.args) - len(init.args.defaults) :]
    return {a.arg: config_value(d, {}) for a, d in zip(positional, init.args.defaults, strict=True)}


def official_facts() -> dict[str, Any]:
    """What the checkout configures (only with ``SAMFLOW_SAPNET_SRC``)."""
    src = Path(REF.src or ".")
    found = config_dicts(src / CONFIG)
    return {
        "neck": {**init_defaults(src / NECK, "FPN"), **found["neck"]},
        "extractor": {**init_defaults(src / EXTRACTOR, "SingleRoIExtractor"), **found["bbox_roi_extractor"]},
    }


def expected_network(neck: dict[str, Any]) -> dict[str, Any]:
    """The FPN mmdetection 2.25 builds from ``neck`` (with ``ConvModule``'s ``bias='auto'``: no conv bias
    under a norm; ``act_cfg=None``: no activation)."""
    assert neck["type"] == "FPN"
    ins, out, start = neck["in_channels"], neck["out_channels"], neck["start_level"]
    end = len(ins) if neck["end_level"] == -1 else neck["end_level"]
    used = ins[start:end]
    extra = neck["num_outs"] - len(used)
    mode = neck["add_extra_convs"]
    assert mode in ("on_input", "on_lateral", "on_output"), mode  # a bool or False: other nets
    extras = [(ins[end - 1] if i == 0 and mode == "on_input" else out, out, 3, 2) for i in range(extra)]
    norm = neck["norm_cfg"]
    return {
        "lateral": [(c, out, 1, 1) for c in used],
        "output": [(out, out, 3, 1) for _ in used],
        "extra": extras,
        "extra_source": "input" if mode == "on_input" else mode.removeprefix("on_"),
        "norm": (norm["type"], norm.get("num_groups")),
        "norm_on_lateral": not neck["no_norm_on_lateral"],
        "conv_bias": norm is None,
        "activation": neck["act_cfg"],
        "upsample": neck["upsample_cfg"]["mode"],
        "init": (neck["init_cfg"]["type"], neck["init_cfg"]["distribution"], neck["init_cfg"]["layer"]),
    }


def conv_kind(block: nn.Module) -> tuple[int, int, int, int]:
    conv = block.conv
    return (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])


def described(fpn: FPN) -> dict[str, Any]:
    """samflow's FPN in the terms of ``expected_network``, read off the modules."""
    blocks = [*fpn.lateral, *fpn.output, fpn.extra]
    norms = [m for b in blocks for m in b.modules() if isinstance(m, nn.modules.normalization.GroupNorm)]
    assert len(norms) == len(blocks)  # one norm per conv, laterals and the extra conv included
    activations = [m for m in fpn.modules() if isinstance(m, (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU))]
    return {
        "lateral": [conv_kind(b) for b in fpn.lateral],
        "output": [conv_kind(b) for b in fpn.output],
        "extra": [conv_kind(fpn.extra)],
        "extra_source": "input",  # FPN.forward: the extra conv reads inputs[-1] (test_fpn_forward checks it)
        "norm": ("GN", norms[0].num_groups),
        "norm_on_lateral": all(isinstance(b.norm, nn.GroupNorm) for b in fpn.lateral),
        "conv_bias": any(b.conv.bias is not None for b in blocks),
        "activation": None if not activations else type(activations[0]).__name__,
        "upsample": "nearest",  # FPN.forward (test_fpn_forward checks it against index arithmetic)
        "init": ("Xavier", "uniform", "Conv2d"),  # test_fpn_forward checks the law
    }


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    if not REF.available:
        pytest.skip(REF.skip_reason())
    return REF.get("config", fingerprint(str(CONFIG), str(NECK), str(EXTRACTOR)), official_facts)


@official
def test_the_reference_config_is_gn_fpn_with_p6_on_c5(facts):
    """The facts themselves, so a recording or a parser that went wrong shows here first."""
    neck = facts["neck"]
    assert neck["in_channels"] == [256, 512, 1024, 2048] and neck["out_channels"] == 256
    assert (neck["start_level"], neck["num_outs"], neck["add_extra_convs"]) == (0, 5, "on_input")
    assert neck["norm_cfg"] == {"type": "GN", "num_groups": 32, "requires_grad": True}
    assert neck["act_cfg"] is None and neck["upsample_cfg"] == {"mode": "nearest"}
    assert facts["extractor"]["featmap_strides"] == [4, 8, 16, 32, 64]
    assert facts["extractor"]["finest_scale"] == 56
    # no sampling_ratio, no aligned: mmcv 1.5's RoIAlign defaults, 0 (adaptive) and True (test_roi_sampling)
    assert facts["extractor"]["roi_layer"] == {"type": "RoIAlign", "output_size": 7}


@official
def test_samflow_fpn_is_the_reference_network(facts):
    fpn = FPN()
    assert described(fpn) == expected_network(facts["neck"])
    assert all(p.requires_grad for p in fpn.parameters())  # GN requires_grad=True: the norms train


@official
def test_levels_strides_and_roi_mapping_are_the_extractors(facts):
    strides = facts["extractor"]["featmap_strides"]
    torch.manual_seed(0)
    backbone = ResNet50FPN().eval()
    size = 256
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, size, size))
    assert [size // lvl.shape[-1] for lvl in levels] == strides
    assert {lvl.shape[1] for lvl in levels} == {facts["extractor"]["out_channels"]}
    # each RoI's level: floor(log2(sqrt(wh) / finest_scale + 1e-6)) clamped to the extractor's levels
    finest = facts["extractor"]["finest_scale"]
    sides = torch.tensor([50.0, 112.0, 224.0, 448.0, 896.0, 1024.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    want = [min(max(int(torch.floor(torch.log2(s / finest + 1e-6))), 0), len(strides) - 1) for s in sides]
    assert roi_levels(boxes, len(levels), finest).tolist() == want == [0, 1, 2, 3, 4, 4]
