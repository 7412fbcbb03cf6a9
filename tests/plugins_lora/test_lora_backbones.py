"""LoRA on the other frozen backbones: MobileSAM's TinyViT and EfficientSAM's ViT.

LoRA adapts any linear layer; these encoders have the ViT block's ``attn.qkv`` and ``attn.proj`` and
name the MLP's layers ``mlp.fc1``/``mlp.fc2`` (``lin1``/``lin2`` adapt them), TinyViT's under
``layers.s.blocks.j`` and only in its attention blocks (hook units 2-11). For each backbone: peft's
layers around the backbone's own linears, the trainable count, the frozen model exactly at
initialisation, gradients only in LoRA's parameters, the merged export into a plain model of the same
variant, the per-image dropout on their (B', L, C) token inputs, and the error for a block without them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch
from official_code import randomize_all
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginConfigError, PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.backbones import TinyViT
from samflow_plugins.lora import LoRA

SIZE = 128
VARIANTS = ["mobile_sam", "efficient_sam_vitt"]
ALL = ["qkv", "proj", "lin1", "lin2"]
BLOCK_NAMES = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.fc1", "lin2": "mlp.fc2"}


def frozen_sam(variant: str):
    """``variant`` at SIZE with every encoder weight drawn (BatchNorm statistics included)."""
    sam = build_sam(variant, img_size=SIZE, seed=0)
    randomize_all(sam.image_encoder, seed=0)
    return sam


def expected_layers(sam, targets: list[str]) -> dict[str, nn.Linear]:
    """The backbone's own linears the plugin should adapt, found from the blocks the hooks see: every
    block that has the targets (TinyViT's MBConv blocks have none), by its path in the model."""
    paths = {id(m): n for n, m in sam.named_modules()}
    layers = {}
    for block in sam.image_encoder.blocks:
        if not hasattr(block, "attn"):
            continue
        for name in sorted(BLOCK_NAMES[t] for t in targets):
            layers[f"{paths[id(block)]}.{name}"] = block.get_submodule(name)
    return layers


def with_deltas(plugin_params: dict, seed: int = 3) -> None:
    """Non-zero B (and moved A), as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin_params.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("targets", [["qkv"], ALL])
def test_the_backbones_own_linears_become_peft_lora_layers(variant, targets):
    sam = frozen_sam(variant)
    layers = expected_layers(sam, targets)
    plugin = LoRA(targets=targets)
    model = HookedSam(sam, PluginStack({"lora": plugin}))
    assert plugin.adapted == list(layers)
    if variant == "mobile_sam":  # the 10 attention blocks of TinyViT, none of its MBConv blocks
        assert isinstance(sam.image_encoder, TinyViT)
        assert len(layers) == 10 * len(targets)
        assert all(n.startswith("image_encoder.layers.") for n in layers)
    else:
        assert len(layers) == 12 * len(targets)
    for name, original in layers.items():
        layer = model.sam.get_submodule(name)
        assert isinstance(layer, PeftLoraLinear) and layer.base_layer is original
        assert layer.lora_A["lora"].weight.shape == (4, original.in_features)
        assert layer.lora_B["lora"].weight.shape == (original.out_features, 4)
    adapted = {n for n, m in sam.named_modules() if isinstance(m, PeftLoraLinear)}
    assert adapted == set(layers)
    count = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert model.plugins.trainable_counts() == {"lora": count}
    if targets == ["qkv"]:  # the docstring's counts: 4 r C per attention block of width C
        widths = {"mobile_sam": [128] * 2 + [160] * 6 + [320] * 2, "efficient_sam_vitt": [192] * 12}
        assert count == sum(4 * 4 * c for c in widths[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_at_initialisation(variant):
    batch = random_batch(2, size=SIZE, prompt="box")
    frozen = HookedSam(frozen_sam(variant)).eval()
    model = HookedSam(frozen_sam(variant), PluginStack({"lora": LoRA(targets=ALL)})).eval()
    with torch.no_grad():
        expected = frozen.run(batch)[0]
        got = model.run(batch)[0]
    torch.testing.assert_close(got.pred, expected.pred, rtol=0, atol=0)
    torch.testing.assert_close(got.masks["sam"], expected.masks["sam"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_loras_parameters_train(variant):
    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant=variant, img_size=SIZE), plugins={"lora": LoRA(targets=ALL)}, losses={"bce": 1.0}
    ).train()
    owned = module.plugins.owned["lora"]
    with_deltas(owned)  # B non-zero, so A gets a gradient too
    batch = random_batch(2, size=SIZE)
    out, ctx = module(batch)
    module.compute_losses(out, batch, ctx)["total"].backward()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == set(owned)  # LoRA's A and B of every adapted layer, nothing else
    assert all(".lora_A.lora." in n or ".lora_B.lora." in n for n in owned)
    assert module.trainable_parameters() == {"lora": sum(p.numel() for p in owned.values())}
    for name, param in module.model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_export_loads_strictly_into_the_plain_variant(variant):
    plugin = LoRA(targets=ALL, rank=3, alpha=6.0)
    model = HookedSam(frozen_sam(variant), PluginStack({"lora": plugin})).eval()
    with_deltas(model.plugins.owned["lora"])
    merged = plugin.merged_sam_state_dict(model.sam)
    plain = build_sam(variant, img_size=SIZE, seed=7)  # other weights, all replaced
    plain.load_state_dict(merged, strict=True)
    assert set(merged) == set(frozen_sam(variant).state_dict())
    batch = random_batch(1, size=SIZE)
    x = model.preprocess(batch.image, None)
    with torch.no_grad():
        lora = model.run_encoder(x, model.context(batch))[0]
        got = plain.eval().image_encoder(x)
        base = frozen_sam(variant).eval().image_encoder(x)
    assert (lora - base).abs().max() > 1e-3  # the deltas are not zero
    torch.testing.assert_close(got, lora, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_masks_follow_each_image_on_token_inputs(variant):
    """TinyViT's qkv and proj and EfficientSAM's qkv take (B', L, C) tokens: their masks too come from
    the image's seed, so an image's prediction is the same alone, in a pair, and whatever the global
    generator drew before."""
    model = HookedSam(frozen_sam(variant), PluginStack({"lora": LoRA(targets=["qkv"], dropout=0.5)}))
    with_deltas(model.plugins.owned["lora"])
    model.train()
    pair = random_batch(2, size=SIZE).replace(sample_seed=[11, 12])
    with torch.no_grad():
        torch.manual_seed(0)
        together = model.run(pair)[0].pred
        torch.manual_seed(1)
        alone = [model.run(pair.select_images([i]))[0].pred for i in range(2)]
        model.eval()
        plain = model.run(pair)[0].pred
    for i in range(2):
        torch.testing.assert_close(alone[i][0], together[i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, together)  # the masks do drop


def test_blocks_without_the_targets_are_refused_naming_the_plugin_and_the_blocks_that_have_them():
    with pytest.raises(
        PluginConfigError,
        match=r"Plugin 'lora' \(lora\): block\(s\) \[0, 1\] of this SAM's TinyViT encoder have no \['qkv'\] "
        r"layers to adapt; the blocks that have them: \[2, 3, 4, 5, 6, 7, 8, 9, 10, 11\]",
    ):
        HookedSam(build_sam("mobile_sam", img_size=SIZE), PluginStack({"lora": LoRA(blocks=[0, 1, 2])}))


def test_chosen_blocks_and_the_official_mlp_names():
    plugin = LoRA(blocks=[2, 11], targets=["mlp.fc1", "lin2"])
    HookedSam(build_sam("mobile_sam", img_size=SIZE), PluginStack({"lora": plugin}))
    assert plugin.adapted == [
        "image_encoder.layers.1.blocks.0.mlp.fc1",
        "image_encoder.layers.1.blocks.0.mlp.fc2",
        "image_encoder.layers.3.blocks.1.mlp.fc1",
        "image_encoder.layers.3.blocks.1.mlp.fc2",
    ]
