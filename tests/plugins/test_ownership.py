"""One owner of what trains: a plugin that wraps a SAM module owns, trains, saves and restores it."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch
from torch import Tensor, nn

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack, SamPlugin
from samflow.sam import EncoderCache, EncoderCacheError, HookedSam


class DeltaLinear(nn.Module):
    """A frozen linear layer plus a learnable low-rank delta (zero at the start, like LoRA)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))


class WrapQkv(SamPlugin):
    """Wraps ``attn.qkv`` of one encoder block; holds no parameter of its own."""

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block

    def setup(self, sam):
        attn = sam.image_encoder.blocks[self.block].attn
        attn.qkv = DeltaLinear(attn.qkv)


def module_with(plugins: dict) -> SamflowModule:
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins=plugins, losses={"bce": 1.0})


def test_injected_module_is_owned_by_its_plugin_and_the_rest_stays_frozen():
    module = module_with({"wrap": WrapQkv(1)})
    owned = module.plugins.owned["wrap"]
    prefix = "sam.image_encoder.blocks.1.attn.qkv."
    assert set(owned) == {prefix + "down.weight", prefix + "up.weight"}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == set(owned)
    assert module.trainable_parameters() == {"wrap": 2 * 64 + 3 * 64 * 2}
    # the wrapped base layer is SAM's own, frozen
    assert not module.model.sam.image_encoder.blocks[1].attn.qkv.base.weight.requires_grad


def test_injected_module_trains_under_its_plugin_group():
    torch.manual_seed(0)
    module = module_with({"wrap": WrapQkv(1)})
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["wrap"]
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {
        id(p) for p in module.plugins.owned["wrap"].values()
    }
    frozen_before = {
        n: p.detach().clone() for n, p in module.model.sam.named_parameters() if not p.requires_grad
    }
    up = module.model.sam.image_encoder.blocks[1].attn.qkv.up.weight
    down = module.model.sam.image_encoder.blocks[1].attn.qkv.down.weight
    up_before, down_before = up.detach().clone(), down.detach().clone()
    module.train()
    for _ in range(2):  # two steps: up moves first, then down (its gradient is zero while up is zero)
        out, ctx = module(random_batch(2))
        loss = module.compute_losses(out, ctx.batch, ctx)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(up, up_before) and not torch.equal(down, down_before)
    for name, param in module.model.sam.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name


def test_injected_module_is_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    module = module_with({"wrap": WrapQkv(1)})
    with torch.no_grad():
        for p in module.plugins.owned["wrap"].values():
            p.normal_()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = set(checkpoint["state_dict"])
    assert "model.sam.image_encoder.blocks.1.attn.qkv.up.weight" in saved
    assert "model.sam.image_encoder.blocks.1.attn.qkv.down.weight" in saved
    assert not any(k.startswith("model.sam.") and ".qkv." not in k for k in saved)  # frozen SAM left out
    assert "model.sam.image_encoder.blocks.1.attn.qkv.base.weight" not in saved
    torch.save(checkpoint, tmp_path / "slim.ckpt")

    fresh = module_with({"wrap": WrapQkv(1)})
    fresh.load_state_dict(torch.load(tmp_path / "slim.ckpt", weights_only=True)["state_dict"])
    for name, value in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    batch = random_batch(1)
    module.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)[0].pred, module(batch)[0].pred)


def test_first_plugin_to_name_a_sam_part_owns_it():
    from samflow_plugins.decoder_tuning import DecoderTuning

    stack = PluginStack(
        {"a": DecoderTuning(["mask_decoder.iou_token"]), "b": DecoderTuning(["mask_decoder"])}
    )
    model = HookedSam(module_with({}).model.sam, stack)
    assert set(stack.owned["a"]) == {"sam.mask_decoder.iou_token.weight"}
    assert "sam.mask_decoder.iou_token.weight" not in stack.owned["b"]
    assert "sam.mask_decoder.mask_tokens.weight" in stack.owned["b"]
    assert stack.owner_of("sam.mask_decoder.mask_tokens.weight") == "b"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(stack.owned["a"]) | set(stack.owned["b"])


def test_encoder_cache_refusal_names_the_plugin_that_trains_the_encoder(tiny_sam):
    model = HookedSam(tiny_sam, PluginStack({"wrap": WrapQkv(0)}), encoder_cache=EncoderCache(2))
    with pytest.raises(EncoderCacheError, match="plugin 'wrap' trains .*blocks.0.attn.qkv"):
        model(random_batch(1))


class ReplaceIouToken(SamPlugin):
    """Replaces the decoder's IoU token with a trainable parameter of its own (``del``, then a new
    ``nn.Parameter``: the freed parameter's memory, hence its ``id``, usually goes to the new one)."""

    def setup(self, sam):
        embedding = sam.mask_decoder.iou_token
        values = embedding.weight.detach() + 1.0
        del embedding.weight
        embedding.weight = nn.Parameter(values)


def test_a_sam_parameter_a_plugin_replaces_is_its_own_and_is_saved():
    """Ownership is told by the parameter objects, not by ids a freed parameter leaves for reuse (the
    new parameter was taken for SAM's frozen one and owned by none: "nothing to train")."""
    module = module_with({"token": ReplaceIouToken()})
    key = "sam.mask_decoder.iou_token.weight"
    assert set(module.plugins.owned["token"]) == {key}
    assert module.model.sam.mask_decoder.iou_token.weight.requires_grad
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]["model." + key]  # the slim checkpoint keeps it
    assert torch.equal(saved, module.model.sam.mask_decoder.iou_token.weight)
    optimizer = module.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["token"]
    assert optimizer.param_groups[0]["params"] == [module.model.sam.mask_decoder.iou_token.weight]
