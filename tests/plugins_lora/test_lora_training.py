"""LoRA in training: owned by its plugin, trained in its optimizer group, saved in the slim checkpoint,
equal gradients with activation checkpointing, bf16, composition with HQ-SAM and PA-SAM, no encoder cache."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack
from samflow.sam import EncoderCache, EncoderCacheError, HookedSam
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.lora import LoRA
from samflow_plugins.pa_sam import PASam


def module_with(plugins: dict, **sam) -> SamflowModule:
    return SamflowModule(sam=SamSpec(variant="tiny", **sam), plugins=plugins, losses={"bce": 1.0})


def lora_names(module: SamflowModule, key: str = "lora") -> set[str]:
    """The LoRA factors in SAM, found by peft's prefix, as the stack names them."""
    return {
        f"sam.{n}"
        for n, _ in module.model.sam.named_parameters()
        if f".lora_A.{key}." in n or f".lora_B.{key}." in n
    }


def loss_of(module: SamflowModule, batch) -> torch.Tensor:
    out, ctx = module(batch)
    return module.compute_losses(out, ctx.batch, ctx)["total"]


def test_lora_parameters_are_owned_by_the_plugin_and_sam_stays_frozen():
    module = module_with({"lora": LoRA(targets=["qkv", "lin2"])})
    owned = module.plugins.owned["lora"]
    assert set(owned) == lora_names(module) and len(owned) == 4 * 2 * 2
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == set(owned)
    assert module.trainable_parameters() == {"lora": 4 * 4 * ((64 + 192) + (256 + 64))}
    qkv = module.model.sam.image_encoder.blocks[0].attn.qkv
    assert not qkv.base_layer.weight.requires_grad and not qkv.base_layer.bias.requires_grad
    assert "image_encoder.blocks.0.attn.qkv.base_layer.weight" in module.plugins.frozen_sam_keys


def test_lora_trains_under_its_plugin_group_and_nothing_else_moves():
    torch.manual_seed(0)
    module = module_with({"lora": LoRA(lr=1e-2)})
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["lora"]
    assert optimizer.param_groups[0]["lr"] == 1e-2
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in module.plugins.owned["lora"].values()
    }
    owned = module.plugins.owned["lora"]
    frozen_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in owned.items()}
    module.train()
    for step in range(2):  # B moves first; A's gradient is zero while B is zero
        optimizer.zero_grad()
        loss_of(module, random_batch(2)).backward()
        grads_b = [p.grad for n, p in owned.items() if ".lora_B." in n]
        grads_a = [p.grad for n, p in owned.items() if ".lora_A." in n]
        assert all(g is not None and g.abs().sum() > 0 for g in grads_b)
        assert all(g is not None for g in grads_a)
        if step == 1:
            assert all(g.abs().sum() > 0 for g in grads_a)
        optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in owned.items())
    for name, param in module.model.named_parameters():
        if name in frozen_before:
            assert param.grad is None, name
            assert torch.equal(param, frozen_before[name]), name


def test_lora_is_saved_in_the_slim_checkpoint_and_restored(tmp_path):
    torch.manual_seed(0)
    module = module_with({"lora": LoRA(targets=["qkv", "proj"])})
    with torch.no_grad():
        for p in module.plugins.owned["lora"].values():
            p.normal_(std=0.05)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = {k for k in checkpoint["state_dict"] if k.startswith("model.sam.")}
    assert saved == {"model." + n for n in module.plugins.owned["lora"]}  # LoRA only: no frozen SAM
    torch.save(checkpoint, tmp_path / "slim.ckpt")

    torch.manual_seed(1)  # other random A
    fresh = module_with({"lora": LoRA(targets=["qkv", "proj"])})
    fresh.load_state_dict(torch.load(tmp_path / "slim.ckpt", weights_only=True)["state_dict"])
    for name, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    batch = random_batch(2)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)[0].pred, module(batch)[0].pred, rtol=0, atol=0)


def test_pickled_model_keeps_peft_layers_and_outputs():
    module = module_with({"lora": LoRA(dropout=0.1)}).eval()
    with torch.no_grad():
        for p in module.plugins.owned["lora"].values():
            p.add_(0.05)
    clone = pickle.loads(pickle.dumps(module))
    assert type(clone.model.sam.image_encoder.blocks[0].attn.qkv).__name__ == "Linear"
    assert clone.plugins.owned["lora"].keys() == module.plugins.owned["lora"].keys()
    batch = random_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(clone(batch)[0].pred, module(batch)[0].pred, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_gives_the_same_gradients(dropout):
    grads = []
    for checkpoint_blocks in (False, True):
        torch.manual_seed(0)
        module = module_with(
            {"lora": LoRA(dropout=dropout, targets=["qkv", "lin1"])}, checkpoint_blocks=checkpoint_blocks
        ).train()
        with torch.no_grad():
            for p in module.plugins.owned["lora"].values():
                p.add_(0.02)  # B non-zero, so A gets a gradient too
        torch.manual_seed(5)  # the same dropout masks (checkpoint recomputes with the saved RNG state)
        loss_of(module, random_batch(2)).backward()
        grads.append({n: p.grad.clone() for n, p in module.plugins.owned["lora"].items()})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains_lora():
    module = module_with({"lora": LoRA()}).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(module, random_batch(2))
    loss.backward()
    assert torch.isfinite(loss)
    owned = module.plugins.owned["lora"].values()
    assert all(
        p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in owned
    )
    assert any(p.grad.abs().sum() > 0 for p in owned)


@pytest.mark.parametrize("other", [HQSam, PASam], ids=["hq_sam", "pa_sam"])
@pytest.mark.parametrize("lora_first", [True, False], ids=["lora_first", "lora_second"])
def test_composes_with_decoder_side_plugins(other, lora_first):
    plugins = {"lora": LoRA(), "other": other()}
    if not lora_first:
        plugins = {"other": plugins["other"], "lora": plugins["lora"]}
    module = module_with(plugins).train()
    with torch.no_grad():
        for p in module.plugins.owned["lora"].values():
            p.add_(0.02)
    loss = loss_of(module, random_batch(2))
    loss.backward()
    assert torch.isfinite(loss)
    owned = module.plugins.owned
    assert set(owned["lora"]) == lora_names(module)
    assert all(n.startswith("plugins.other.") for n in owned["other"])
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for params in owned.values() for p in params.values()}
    for key in ("lora", "other"):
        assert all(p.grad is not None for p in owned[key].values()), key
        assert sum(p.grad.abs().sum() for p in owned[key].values()) > 0, key
    assert all(p.grad.abs().sum() > 0 for p in owned["lora"].values())


def test_encoder_cache_is_refused_naming_the_plugin(tiny_sam):
    with pytest.raises(EncoderCacheError, match="lora"):
        HookedSam(tiny_sam, PluginStack({"lora": LoRA()}), encoder_cache=EncoderCache(2))(random_batch(1))
    with pytest.raises(EncoderCacheError, match="'encoder_lora'|encoder_lora"):
        module_with({"encoder_lora": LoRA()}, encoder_cache=4)
