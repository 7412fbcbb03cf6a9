"""Merging for export: LoRA folded into SAM's weights gives a plain segment-anything state dict whose
encoder equals the unmerged LoRA encoder."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, randomize
from peft.tuners.lora import LoraLayer
from segment_anything.modeling import Sam

from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow_plugins.lora import LoRA, merged_sam_state_dict

ALL = ["qkv", "proj", "lin1", "lin2"]


def trained_lora(sam: Sam, **options) -> tuple[HookedSam, LoRA]:
    """A LoRA model whose deltas are non-zero, as after training."""
    plugin = LoRA(**options)
    model = HookedSam(sam, PluginStack({"lora": plugin})).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.plugins.owned["lora"].values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, plugin


@pytest.mark.parametrize(
    ("variant", "img_size", "options"),
    [
        ("tiny", None, {}),
        ("tiny", None, {"targets": ALL, "rank": 3, "alpha": 12.0, "blocks": [0, 2, 3]}),
        ("vit_b", 128, {"targets": ALL}),
    ],
    ids=["tiny-qkv", "tiny-all", "vit_b-all"],
)
def test_merged_state_dict_loads_strictly_into_plain_sam_and_equals_the_lora_encoder(
    variant, img_size, options
):
    model, plugin = trained_lora(randomize(build_sam(variant, img_size=img_size, seed=0)), **options)
    frozen = randomize(build_sam(variant, img_size=img_size, seed=0))  # the same SAM without LoRA
    merged = plugin.merged_sam_state_dict(model.sam)
    plain = build_sam(variant, img_size=img_size, seed=7)  # other random weights, all replaced
    assert type(plain) is Sam
    plain.load_state_dict(merged, strict=True)
    assert set(merged) == set(frozen.state_dict())
    batch = random_batch(1, size=plain.image_encoder.img_size)
    x = model.preprocess(batch.image, None)
    with torch.no_grad():
        expected = model.sam.image_encoder(x)  # segment-anything's forward through peft's layers, unmerged
        got = plain.image_encoder(x)
        base = frozen.image_encoder(x)
        # samflow's own encoder pass (SDPA) with LoRA; one vit_b forward costs seconds on 2 cores
        hooked = model.run_encoder(x, model.context(batch))[0] if variant == "tiny" else expected
    assert (expected - base).abs().max() > 1e-3  # the deltas are not zero
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, hooked, rtol=0, atol=1e-5)


def test_merged_weights_are_w_plus_the_delta_and_sam_is_unchanged(tiny_sam):
    model, plugin = trained_lora(tiny_sam, rank=2, alpha=4.0, targets=["qkv", "lin1"])
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    merged = merged_sam_state_dict(model.sam)
    for name in plugin.adapted:
        layer = model.sam.get_submodule(name)
        a, b = layer.lora_A["lora"].weight, layer.lora_B["lora"].weight
        expected = layer.base_layer.weight + (4.0 / 2) * b @ a
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
        assert torch.equal(merged[f"{name}.bias"], layer.base_layer.bias)
        assert isinstance(layer, LoraLayer) and not layer.merged  # still LoRA, still training
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    for key, value in model.sam.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_two_lora_plugins_are_both_folded(tiny_sam):
    first, second = LoRA(blocks=[0, 1]), LoRA(targets=["lin2"], rank=2)
    model = HookedSam(tiny_sam, PluginStack({"a": first, "b": second})).eval()
    with torch.no_grad():
        for params in model.plugins.owned.values():
            for p in params.values():
                p.add_(0.03)
    plain = build_sam("tiny", seed=3)
    plain.load_state_dict(second.merged_sam_state_dict(model.sam), strict=True)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(plain.image_encoder(x), model.sam.image_encoder(x), rtol=0, atol=1e-5)


def test_merging_a_sam_without_the_plugins_layers_is_refused(tiny_sam):
    plugin = LoRA()
    with pytest.raises(ValueError, match="does not carry its LoRA layers"):
        plugin.merged_sam_state_dict(tiny_sam)  # never set up
    HookedSam(tiny_sam, PluginStack({"lora": plugin}))
    with pytest.raises(ValueError, match="does not carry its LoRA layers"):
        plugin.merged_sam_state_dict(build_sam("tiny"))
