"""Trainable set: parameter counts on the real SAM sizes, gradients only where they should go."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch
from pa_sam_helpers import hooked

from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow_plugins.pa_sam import PASam


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_trainable_counts_match_the_paper_and_the_reference_code(variant):
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
        counts = {}
        for reference in (False, True):
            plugin = PASam(reference_trainable=reference)
            stack = PluginStack({"pa": plugin})
            HookedSam(sam, stack)
            own = sum(p.numel() for p in plugin.parameters())
            modules = [sam.get_submodule(part) for part in plugin.sam_modules_to_train()]
            parts = sum(p.numel() for module in modules for p in module.parameters())
            counts[reference] = (own, own + parts)
            assert stack.trainable_counts() == {"pa": own + parts}  # the stack's record of what trains
            assert sum(p.numel() for p in sam.parameters() if p.requires_grad) == parts
    assert sum(p.numel() for p in plugin.guiding.parameters()) == 133_312
    assert sum(p.numel() for p in plugin.adapter.parameters()) == 239_488
    assert counts[False] == (372_800, 372_800)  # adapter + guiding branch (the paper)
    assert counts[True] == (372_800, 1_007_008)  # + upscaling, hypernetworks, mask tokens (the code)


def _loss(out, batch, ctx, model):
    pred = F.interpolate(out.pred, size=batch.row_mask.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.binary_cross_entropy_with_logits(pred, batch.row_mask)
    return loss + sum(model.plugins.losses(out, batch, ctx).values())


@pytest.mark.parametrize("reference", [False, True], ids=["adapter_only", "reference_trainable"])
@pytest.mark.parametrize("epoch", [0, 5], ids=["no_mining", "mining"])
def test_gradients_reach_exactly_the_trainable_set(tiny_sam, reference, epoch):
    batch = random_batch(2, prompt="box")
    plugin = PASam(reference_trainable=reference)
    model = hooked(tiny_sam, {"pa": plugin}).train()
    out, ctx = model.run(batch, model.context(batch, epoch=epoch))
    assert set(model.plugins.losses(out, batch, ctx)) == {
        f"pa/{n}" for n in ("coarse_bce", "coarse_dice", "refined_bce", "refined_dice", "uncertainty_bce")
    }
    _loss(out, batch, ctx, model).backward()

    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"plugins.pa.{n}" for n, _ in plugin.named_parameters()}
    if reference:
        decoder = "sam.mask_decoder."
        expected |= {decoder + "mask_tokens.weight"}
        upscaling = tiny_sam.mask_decoder.output_upscaling
        expected |= {decoder + "output_upscaling." + n for n, _ in upscaling.named_parameters()}
        # single-mask output: only hypernetwork 0 is used; 1..3 are trainable but get zero gradient
        mlp0 = tiny_sam.mask_decoder.output_hypernetworks_mlps[0]
        expected |= {decoder + "output_hypernetworks_mlps.0." + n for n, _ in mlp0.named_parameters()}
    assert reached == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert reached <= trainable
    assert trainable == set(model.plugins.owned["pa"])  # PA-SAM owns exactly what trains
    assert not [n for n, p in tiny_sam.named_parameters() if not p.requires_grad and p.grad is not None]


def test_plugin_pickles_and_reloads_to_the_same_outputs(tiny_sam):
    batch = random_batch(2, prompt="box")
    model = hooked(tiny_sam, {"pa": PASam()}).eval()
    copy = hooked(tiny_sam, {"pa": pickle.loads(pickle.dumps(PASam()))}).eval()
    copy.plugins.load_state_dict(model.plugins.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(batch).pred, copy(batch).pred)


def test_bad_arguments_name_the_plugin():
    with pytest.raises(ValueError, match="pa_sam: edge_filter"):
        PASam(edge_filter="laplace")
    with pytest.raises(ValueError, match="pa_sam: num_points"):
        PASam(num_points=0)
