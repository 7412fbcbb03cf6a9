"""Decoder-side plugins run on MobileSAM and EfficientSAM: the decoder side is SAM's.

For each backbone and each built-in decoder-side plugin: the output shapes, gradients only in what
the plugin owns (nothing in the frozen image encoder), and HQ-SAM's early feature of that encoder.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin

SIZE = 128
PLUGINS = ("decoder_tuning", "hq_sam", "pa_sam", "tokens")


@pytest.mark.parametrize("variant", ["efficient_sam_vitt", "mobile_sam"])  # ViT-S is ViT-T wider
@pytest.mark.parametrize("name", PLUGINS)
def test_decoder_plugin_on_backbone(variant, name):
    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant=variant, img_size=SIZE), plugins={name: create_plugin(name)}
    ).train()
    batch = random_batch(2, size=SIZE)
    out, ctx = module(batch)
    low = SIZE // 4  # the decoder's mask resolution: 4x the 1/16 embedding grid
    assert out.pred.shape == (2, 1, low, low)
    assert out.masks["sam"].shape == (2, 4, low, low)
    assert all(m.shape[0] == 2 and m.shape[-2:] == (low, low) for m in out.masks.values())
    assert any(k.startswith(f"{name}/") for k in out.masks) or name == "decoder_tuning"

    module.compute_losses(out, batch, ctx)["total"].backward()
    owned = set(module.plugins.owned[name])
    assert owned and sum(module.trainable_parameters().values()) > 0
    for pname, param in module.model.named_parameters():
        assert param.requires_grad == (pname in owned), pname
        if not param.requires_grad:
            assert param.grad is None, pname
        assert "image_encoder" not in pname or not param.requires_grad, pname
    grads = [module.model.get_parameter(p).grad for p in owned]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if name == "hq_sam":  # the early feature: TinyViT's stage 1 (160 ch), EfficientSAM's block 2 (its width)
        plugin = module.plugins[name]
        width = 160 if variant == "mobile_sam" else module.model.sam.image_encoder.embed_dim
        assert plugin.compress_vit_feat[0].in_channels == width
        assert ctx.encoded.features[plugin.early_block].shape == (2, SIZE // 16, SIZE // 16, width)


@pytest.mark.parametrize("name", ["sam_adapter", "ba_sam"])  # lora: tests/plugins_lora/test_lora_backbones.py
def test_encoder_plugins_are_refused_on_other_backbones_by_name(name):
    from samflow.plugins.registry import PluginError

    with pytest.raises(
        PluginError, match=rf"Plugin {name!r} \(\w+\) adapts SAM's ViT image encoder.*TinyViT"
    ):
        SamflowModule(sam=SamSpec(variant="mobile_sam", img_size=SIZE), plugins={name: create_plugin(name)})
