"""LoRA plugin: peft's layers where asked, identity at initialisation, the formula, counts, options."""

from __future__ import annotations

import peft
import pytest
import torch
from helpers import random_batch, randomize
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from samflow.plugins import PluginConfigError, PluginStack, SamPlugin
from samflow.sam import HookedSam, build_sam
from samflow_plugins.lora import TARGETS, LoRA

ALL = ["qkv", "proj", "lin1", "lin2"]


def lora_sam(sam, **options) -> tuple[HookedSam, LoRA]:
    plugin = LoRA(**options)
    return HookedSam(sam, PluginStack({"lora": plugin})), plugin


def linears(sam, blocks, targets) -> dict[str, nn.Linear]:
    """SAM's own linear layers (before any injection) by the name the plugin adapts."""
    return {
        f"image_encoder.blocks.{i}.{TARGETS[t]}": sam.image_encoder.blocks[i].get_submodule(TARGETS[t])
        for i in blocks
        for t in targets
    }


def formula(layers: dict[str, nn.Linear], rank: int) -> int:
    return sum(rank * (layer.in_features + layer.out_features) for layer in layers.values())


def perturb(plugin_owned: dict, std: float = 0.05, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in plugin_owned.values():
            p.add_(torch.randn(p.shape, generator=gen) * std)


# ---- structure ----
def test_qkv_of_every_block_becomes_a_peft_lora_layer_around_sams_linear(tiny_sam):
    originals = linears(tiny_sam, range(4), ["qkv"])
    model, plugin = lora_sam(tiny_sam)
    assert plugin.adapted == list(originals)
    for name, original in originals.items():
        layer = model.sam.get_submodule(name)
        assert isinstance(layer, PeftLoraLinear)
        assert layer.base_layer is original  # SAM's own weights, not a copy
        assert layer.lora_A["lora"].weight.shape == (4, original.in_features)  # A: (r, in)
        assert layer.lora_B["lora"].weight.shape == (original.out_features, 4)  # B: (out, r)
        assert torch.equal(layer.lora_B["lora"].weight, torch.zeros_like(layer.lora_B["lora"].weight))
        assert layer.lora_A["lora"].weight.abs().sum() > 0
        assert layer.scaling["lora"] == 1.0  # alpha defaults to r: SAMed's scale
    for block in tiny_sam.image_encoder.blocks:  # proj and the MLP untouched by default
        assert type(block.attn.proj) is nn.Linear and type(block.mlp.lin1) is nn.Linear
    assert set(tiny_sam.image_encoder.peft_config) == {"lora"}


def test_chosen_blocks_and_targets_only(tiny_sam):
    _, plugin = lora_sam(tiny_sam, blocks=[1, 3], targets=["attn.proj", "lin2"])
    assert plugin.adapted == [
        "image_encoder.blocks.1.attn.proj",
        "image_encoder.blocks.1.mlp.lin2",
        "image_encoder.blocks.3.attn.proj",
        "image_encoder.blocks.3.mlp.lin2",
    ]
    adapted = {n for n, m in tiny_sam.named_modules() if isinstance(m, PeftLoraLinear)}
    assert adapted == set(plugin.adapted)


@pytest.mark.parametrize("targets", [["qkv"], ALL])
def test_identity_at_initialisation(targets):
    batch = random_batch(3, prompt="box")
    frozen = HookedSam(randomize(build_sam("tiny", seed=0))).eval()
    model, _ = lora_sam(randomize(build_sam("tiny", seed=0)), targets=targets)
    model.eval()
    with torch.no_grad():
        expected, ectx = frozen.run(batch)
        got, gctx = model.run(batch)
    torch.testing.assert_close(gctx.encoded.embeddings, ectx.encoded.embeddings, rtol=0, atol=0)
    torch.testing.assert_close(got.pred, expected.pred, rtol=0, atol=0)
    torch.testing.assert_close(got.iou_pred, expected.iou_pred, rtol=0, atol=0)


def test_adapted_layer_computes_w_plus_alpha_over_r_b_a(tiny_sam):
    """h = W x + b + (alpha / r) B A x, written out against peft's layer."""
    model, plugin = lora_sam(tiny_sam, rank=2, alpha=6.0, targets=["lin1"])
    stack = model.plugins
    perturb(stack.owned["lora"])
    layer = model.sam.image_encoder.blocks[2].mlp.lin1
    a, b = layer.lora_A["lora"].weight, layer.lora_B["lora"].weight
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    x = torch.randn(2, 5, 5, w.shape[1])
    with torch.no_grad():
        expected = x @ w.T + bias + (6.0 / 2) * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert plugin.scaling == 3.0


# ---- counts: the formula, peft's own count, the stack's record ----
@pytest.mark.parametrize(
    ("rank", "targets", "blocks", "expected"),
    [
        (4, ["qkv"], None, 4 * 4 * (64 + 192)),  # 4,096
        (4, ALL, None, 4 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))),  # 16,384
        (8, ["qkv", "proj"], [0, 3], 2 * 8 * ((64 + 192) + (64 + 64))),  # 6,144
    ],
)
def test_trainable_count_on_tiny_matches_the_formula_and_peft(rank, targets, blocks, expected):
    sam = build_sam("tiny", seed=0)
    layers = linears(sam, blocks if blocks is not None else range(4), targets)
    model, plugin = lora_sam(sam, rank=rank, targets=targets, blocks=blocks)
    assert formula(layers, rank) == expected
    assert model.plugins.trainable_counts() == {"lora": expected}
    assert peft.get_model_status(sam.image_encoder).trainable_params == expected  # peft's own count
    fresh = build_sam("tiny", seed=0).image_encoder
    peft_model = peft.get_peft_model(fresh, plugin.lora_config(4))  # peft alone, on a fresh encoder
    assert peft_model.get_nb_trainable_parameters()[0] == expected


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (["qkv"], 12 * 4 * (768 + 2304)),  # 147,456: SAMed's count (2 x 4 x (768 + 768) per block)
        (ALL, 12 * 4 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))),  # 589,824
    ],
)
def test_trainable_count_on_vit_b_matches_the_formula_and_peft(targets, expected):
    sam = build_sam("vit_b", img_size=128)
    layers = linears(sam, range(12), targets)
    assert formula(layers, 4) == expected
    if targets == ["qkv"]:  # per block as many values as SAMed's two deltas on q and v: 2 r (C + C)
        assert expected // 12 == 2 * 4 * (768 + 768)
    model, _ = lora_sam(sam, targets=targets)
    assert model.plugins.trainable_counts() == {"lora": expected}
    assert peft.get_model_status(sam.image_encoder).trainable_params == expected
    assert sum(p.numel() for p in sam.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize(("variant", "expected"), [("vit_l", 24 * 4 * 4096), ("vit_h", 32 * 4 * 5120)])
def test_trainable_count_on_large_variants(variant, expected):
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
        model, _ = lora_sam(sam)
    assert model.plugins.trainable_counts() == {"lora": expected}  # 393,216 and 655,360


# ---- options and errors ----
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "rank must be at least 1"),
        ({"alpha": 0.0}, "alpha must be positive"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
        ({"blocks": []}, "`blocks` is empty"),
        ({"targets": []}, "`targets` is empty"),
        ({"targets": ["qkv", "mlp"]}, r"unknown target\(s\) \['mlp'\]"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LoRA(**options)


def test_a_block_outside_the_encoder_is_refused_naming_the_plugin(tiny_sam):
    with pytest.raises(ValueError, match=r"'lora' \(lora\): block\(s\) \[4\] do not exist.*0\.\.3"):
        lora_sam(tiny_sam, blocks=[0, 4])


def test_two_lora_plugins_on_disjoint_layers_keep_their_own_adapters(tiny_sam):
    first, second = LoRA(blocks=[0, 1]), LoRA(rank=2, targets=["lin1"])
    model = HookedSam(tiny_sam, PluginStack({"enc": first, "mlp": second}))
    owned = model.plugins.owned
    assert all(".lora_A.enc." in n or ".lora_B.enc." in n for n in owned["enc"])
    assert all(".mlp.lin1.lora_" in n and ".mlp." in n for n in owned["mlp"])
    assert model.plugins.trainable_counts() == {"enc": 2 * 4 * 256, "mlp": 4 * 2 * (64 + 256)}
    assert set(tiny_sam.image_encoder.peft_config) == {"enc", "mlp"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(owned["enc"]) | set(owned["mlp"])


def test_the_same_layer_twice_is_refused(tiny_sam):
    with pytest.raises(
        ValueError, match=r"'b' \(lora\): already adapted by peft: image_encoder.blocks.0.attn.qkv;"
    ):
        HookedSam(tiny_sam, PluginStack({"a": LoRA(), "b": LoRA(blocks=[0])}))


class WrapProj(SamPlugin):
    """Wraps ``attn.proj`` of block 1 in a module of its own (as a home-made adapter would)."""

    def setup(self, sam):
        attn = sam.image_encoder.blocks[1].attn
        attn.proj = nn.Sequential(attn.proj)


def test_a_layer_another_plugin_wrapped_is_refused(tiny_sam):
    with pytest.raises(
        PluginConfigError, match=r"not an nn.Linear .*image_encoder.blocks.1.attn.proj \(Sequential\)"
    ):
        HookedSam(tiny_sam, PluginStack({"wrap": WrapProj(), "lora": LoRA(targets=["proj"])}))


def test_sam_parts_another_plugin_trains_stay_trainable(tiny_sam):
    """peft freezes what it injects into; the flags set before lora's setup are kept."""
    from samflow_plugins.decoder_tuning import DecoderTuning

    model = HookedSam(tiny_sam, PluginStack({"neck": DecoderTuning(["image_encoder.neck"]), "lora": LoRA()}))
    assert all(p.requires_grad for p in tiny_sam.image_encoder.neck.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.plugins.owned["neck"]) | set(model.plugins.owned["lora"])


# ---- dropout follows the model's mode, although SAM stays in eval mode ----
def test_dropout_is_active_in_training_only(tiny_sam):
    model, _ = lora_sam(tiny_sam, dropout=0.5)
    perturb(model.plugins.owned["lora"])
    batch = random_batch(1)
    dropout = model.sam.image_encoder.blocks[0].attn.qkv.lora_dropout["lora"]
    model.train()
    assert not model.sam.training and dropout.training  # injected modules follow the model's mode
    assert not model.sam.image_encoder.blocks[0].attn.qkv.base_layer.training  # SAM's own layer does not
    with torch.no_grad():
        first = model.run(batch, model.context(batch, epoch=0))[1].encoded.embeddings
        second = model.run(batch, model.context(batch, epoch=1))[1].encoded.embeddings
    # a new dropout mask each epoch (the image's key: its id, the run's seed and the epoch)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        third, fourth = model.run(batch)[1].encoded.embeddings, model.run(batch)[1].encoded.embeddings
    assert not dropout.training
    torch.testing.assert_close(third, fourth, rtol=0, atol=0)
