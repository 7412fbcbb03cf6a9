"""README, "A real SAM checkpoint": the table "Options of `model.sam`" states each option's default as
``SamSpec`` has it, lists every option, and ``multimask_output`` means what the table says (SAM's own
mask: token 0, or the best of tokens 1-3 by predicted IoU)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from samflow.plugins import PluginStack
from samflow.sam.hooked import HookedSam
from samflow.sam_spec import SamSpec
from samflow.testing import random_batch

README = Path(__file__).resolve().parents[2] / "README.md"
# The README's words for a default that is not a literal value.
WORDS = {"none": None, "the variant's": None}


def readme_sam_options() -> dict[str, str]:
    """option -> default cell of the README's table under "Options of `model.sam`"."""
    text = README.read_text(encoding="utf-8").split("Options of `model.sam`:", 1)[1]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text.split("\n\n", 2)[1], flags=re.MULTILINE)
    return {name: cell.strip() for name, cell in rows}


def test_the_readme_table_lists_every_option_with_its_default():
    table = readme_sam_options()
    fields = {f.name: f.default for f in dataclasses.fields(SamSpec)}
    assert list(table) == list(fields)
    for name, cell in table.items():
        stated = WORDS[cell] if cell in WORDS else yaml.safe_load(cell.strip("`"))
        default = list(fields[name]) if isinstance(fields[name], tuple) else fields[name]
        assert stated == default, (name, cell, fields[name])


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("favoured", [None, 0, 1, 3])
def test_multimask_output_is_token_0_or_the_best_of_tokens_1_to_3(tiny_sam, multimask, favoured):
    """``favoured``: a token whose predicted IoU is raised by 1 (the masks stay as they are), so the
    choice is seen to follow the IoU of tokens 1-3 only (token 0 favoured is still not chosen)."""
    sam_model = copy.deepcopy(tiny_sam)
    if favoured is not None:
        with torch.no_grad():
            sam_model.mask_decoder.iou_prediction_head.layers[-1].bias[favoured] += 1.0
    model = HookedSam(sam_model, PluginStack({}), multimask_output=multimask).eval()
    with torch.no_grad():
        out = model(random_batch(6, 128, prompt="points", seed=4))
    sam, iou = out.masks["sam"], out.iou_pred
    assert sam.shape[1] == 4 and iou.shape == (6, 4)
    for row in range(6):
        best = 1 + max(range(3), key=lambda k: float(iou[row, 1 + k]))
        assert favoured in (None, 0) or best == favoured
        token = best if multimask else 0
        assert torch.equal(out.pred[row, 0], sam[row, token]), (row, token)
        others = [t for t in range(4) if t != token]
        assert not any(torch.equal(sam[row, token], sam[row, t]) for t in others)  # only that token
