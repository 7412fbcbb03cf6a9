"""PA-SAM in one model with other plugins: extra tokens, decoder tuning, HQ-SAM, SAM-Adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch
from pa_sam_helpers import Probe, hooked

from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.tokens import ExtraTokens


def _train_step(model, batch, epoch=5):
    model.train()
    out, ctx = model.run(batch, model.context(batch, epoch=epoch))
    pred = F.interpolate(out.pred, size=batch.row_mask.shape[-2:], mode="bilinear", align_corners=False)
    terms = model.plugins.losses(out, batch, ctx)
    loss = F.binary_cross_entropy_with_logits(pred, batch.row_mask) + sum(terms.values())
    loss.backward()
    return out, terms, loss


def _all_reached(module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)


def test_composes_with_extra_tokens_and_decoder_tuning(tiny_sam):
    batch = random_batch(2, prompt="box")
    probe = Probe()
    plugins = {"tokens": ExtraTokens(), "pa": PASam(), "tuning": DecoderTuning(), "probe": probe}
    model = hooked(tiny_sam, plugins)
    out, terms, loss = _train_step(model, batch)
    assert torch.isfinite(loss)
    assert probe.states[1].queries.shape[1] == 5 + 1 + 2 + 8  # SAM's 5, one extra token, box, mined points
    assert probe.states[1].visible.all()  # every row has its box: no invisible slot, the mined points visible
    assert {"sam", "tokens/mask0", "pa/coarse", "pa/refined", "pa/uncertainty"} <= set(out.masks)
    assert torch.equal(out.pred, out.masks["tokens/mask0"])
    assert len([k for k in terms if k.startswith("pa/")]) == 5
    assert _all_reached(plugins["pa"]) and plugins["tokens"].tokens.weight.grad.abs().sum() > 0
    assert tiny_sam.mask_decoder.transformer.layers[1].mlp.lin1.weight.grad.abs().sum() > 0  # decoder tuning
    model.eval()
    with torch.no_grad():
        assert model(batch).pred.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("prompt", ["box", "none"])
def test_composes_with_hq_sam_and_sam_adapter(tiny_sam, prompt):
    batch = random_batch(2, prompt=prompt)
    probe = Probe()
    plugins = {"adapter": SamAdapter(), "hq": HQSam(), "pa": PASam(), "probe": probe}
    model = hooked(tiny_sam, plugins)
    out, terms, loss = _train_step(model, batch)
    assert torch.isfinite(loss)
    prompt_tokens = 2 if prompt == "box" else 0
    assert probe.states[1].queries.shape[1] == 5 + 1 + prompt_tokens + 8  # HQ-SAM's token, PA-SAM's points
    assert probe.states[1].visible.all()
    assert {"pa/coarse", "pa/refined", "pa/uncertainty"} <= set(out.masks)
    assert any(k.startswith("hq/") for k in out.masks)
    assert {k.split("/")[0] for k in terms} == {"hq", "pa"}  # both plugins' own losses, namespaced by key
    assert out.pred.shape == (2, 1, 32, 32)
    for key in ("adapter", "hq", "pa"):
        assert _all_reached(plugins[key]), key
