"""SAPNet's option defaults documented as the reference's, against the reference's own config.

The ``sapnet`` plugin documents ``num_classes`` 80 (COCO), ``hidden`` (reference: 1024) and
``num_negatives`` (reference: 500), and its PSM and PRM terms weigh 0.25 each "as the reference". Here they
are read from the reference's training config, ``TOV_mmdetection/configs2/COCO/SAPNet/SAPNet_r50_fpn_1x_coco.py``
of zhaoyangwei123/SAPNet (with ``SAMFLOW_SAPNET_SRC``, the folder holding ``TOV_mmdetection``), with ``ast``
(nothing of the config runs): the RoI head's ``num_classes`` and ``fc_out_channels``, the negatives
``train_cfg.fine_proposal.gen_num_neg`` (the second stage's, where ``SAPNet.forward_train`` draws them),
and the ``loss_weight`` of ``loss_mil1`` / ``loss_mil2``. Without the checkout, the values recorded in
``tests/reference_outputs/sapnet_defaults.pt`` (``official_code.ReferenceOutputs``).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from official_code import ReferenceOutputs, config_value, fingerprint

from samflow_plugins.sapnet import SAPNet
from samflow_plugins.sapnet.mil import prm_loss, psm_loss

REF = ReferenceOutputs("sapnet_defaults", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
CONFIG = Path("TOV_mmdetection") / "configs2" / "COCO" / "SAPNet" / "SAPNet_r50_fpn_1x_coco.py"


def model_config(path: Path) -> dict[str, Any]:
    """The config's ``model`` dict (the names bound before it resolved; ``_base_`` is not read)."""
    names: dict[str, Any] = {}
    for stmt in ast.parse(path.read_text()).body:
        if not (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)):
            continue
        if stmt.targets[0].id == "model":
            return config_value(stmt.value, names)
        try:
            names[stmt.targets[0].id] = config_value(stmt.value, names)
        except (ValueError, KeyError, TypeError):
            pass  # not a literal: not needed here
    raise AssertionError(f"{path}: no model = dict(...)")


def reference_values() -> dict[str, Any]:
    model = model_config(Path(REF.src or ".") / CONFIG)
    head = model["roi_head"]["bbox_head"]
    return {
        "num_classes": head["num_classes"],
        "fc_out_channels": head["fc_out_channels"],
        "gen_num_neg": model["train_cfg"]["fine_proposal"]["gen_num_neg"],
        "mil1_weight": head["loss_mil1"]["loss_weight"],
        "mil2_weight": head["loss_mil2"]["loss_weight"],
    }


def default(fn: Any, name: str) -> Any:
    return inspect.signature(fn).parameters[name].default


@official
def test_documented_defaults_are_the_reference_configs():
    expected = REF.get("config", fingerprint(str(CONFIG)), reference_values)
    assert default(SAPNet, "num_classes") == expected["num_classes"] == 80
    assert default(SAPNet, "hidden") == expected["fc_out_channels"]
    assert default(SAPNet, "num_negatives") == expected["gen_num_neg"]
    assert default(psm_loss, "weight") == expected["mil1_weight"]  # PSM: stage 0, loss_mil1
    assert default(prm_loss, "weight") == expected["mil2_weight"]  # PRM: stage 1, loss_mil2
