"""Encoder-output cache and activation checkpointing of the encoder blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack
from samflow.sam import HookedSam
from samflow.sam.cache import EncoderCache
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.sam_adapter import SamAdapter


class Recorder:
    """A fake encoder: embedding = image summed over channels; records the rows it was given."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return x.sum(1, keepdim=True), {2: x.permute(0, 2, 3, 1) * 2}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_only_new_images_reach_the_encoder_and_results_match():
    cache, encoder = EncoderCache(capacity=10), Recorder()
    a, b = images(2), images(2, seed=1)
    first, feats = cache.encode(a, (2,), encoder)
    torch.testing.assert_close(first, a.sum(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(feats[2], a.permute(0, 2, 3, 1) * 2, rtol=0, atol=0)
    mixed = torch.cat([b[:1], a[1:], a[:1]])  # one new image, two seen ones
    out, feats = cache.encode(mixed, (2,), encoder)
    assert encoder.calls == [2, 1]
    torch.testing.assert_close(out, mixed.sum(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(feats[2], mixed.permute(0, 2, 3, 1) * 2, rtol=0, atol=0)
    assert cache.counts["all"] == [2, 3]
    assert cache.hit_rate("all") == pytest.approx(2 / 5)
    assert cache.hit_rate("eval") is None


def test_an_image_twice_in_one_batch_runs_once():
    cache, encoder = EncoderCache(capacity=10), Recorder()
    x = images(1).repeat(3, 1, 1, 1)
    out, _ = cache.encode(x, (), encoder)
    assert encoder.calls == [1] and len(cache) == 1
    torch.testing.assert_close(out, x.sum(1, keepdim=True), rtol=0, atol=0)


def test_a_changed_pixel_is_a_new_image():
    cache, encoder = EncoderCache(capacity=10), Recorder()
    x = images(1)
    cache.encode(x, (), encoder)
    y = x.clone()
    y[0, 1, 3, 3] = torch.nextafter(y[0, 1, 3, 3], torch.tensor(2.0))
    cache.encode(y, (), encoder)
    assert encoder.calls == [1, 1]


def test_least_recently_used_goes_first_and_a_batch_larger_than_the_cache_works():
    cache, encoder = EncoderCache(capacity=2), Recorder()
    x = images(3)
    cache.encode(x[:2], (), encoder)  # holds 0, 1
    cache.encode(x[:1], (), encoder)  # 0 used again: 1 is now the oldest
    cache.encode(x[2:], (), encoder)  # 2 evicts 1
    encoder.calls.clear()
    cache.encode(x[:1], (), encoder)
    assert encoder.calls == []
    cache.encode(x[1:2], (), encoder)
    assert encoder.calls == [1]
    out, _ = cache.encode(images(5, seed=7), (), Recorder())
    torch.testing.assert_close(out, images(5, seed=7).sum(1, keepdim=True), rtol=0, atol=0)
    assert len(cache) == 2


def test_autocast_and_feature_blocks_are_part_of_the_key():
    cache, encoder = EncoderCache(capacity=10), Recorder()
    x = images(1)
    cache.encode(x, (), encoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.encode(x, (), encoder)
    cache.encode(x, (2,), encoder)
    assert encoder.calls == [1, 1, 1]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        EncoderCache(0)


def test_hooked_sam_with_cache_equals_without_and_skips_the_encoder(tiny_sam):
    plugins = {"hq": HQSam()}  # reads an encoder feature: the cache must keep it too
    plain = HookedSam(tiny_sam, PluginStack(plugins)).eval()
    cached = HookedSam(tiny_sam, PluginStack(plugins), encoder_cache=EncoderCache(8)).eval()
    batch = random_batch(3)
    with torch.no_grad():
        expected = plain(batch).masks
        first = cached(batch).masks
        calls = []
        cached.run_encoder = lambda x, ctx: calls.append(x.shape[0]) or HookedSam.run_encoder(cached, x, ctx)
        again = cached(batch).masks
    assert calls == []  # every image came from the cache
    assert cached.encoder_cache.counts["eval"] == [3, 3]
    for name in expected:
        torch.testing.assert_close(first[name], expected[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(again[name], first[name], rtol=0, atol=0)


def test_cache_is_refused_when_a_plugin_changes_the_encoder(tiny_sam):
    model = HookedSam(tiny_sam, PluginStack({"adapter": SamAdapter()}), encoder_cache=EncoderCache(4))
    with pytest.raises(ValueError, match=r"adapter \((on_image|block_input)\).*encoder_cache: 0"):
        model(random_batch(1))
    with pytest.raises(ValueError, match="adapter"):
        SamflowModule(sam=SamSpec(variant="tiny", encoder_cache=4), plugins={"adapter": SamAdapter()})


def test_cache_is_refused_when_encoder_weights_train(tiny_sam):
    model = HookedSam(tiny_sam, PluginStack({"decoder": DecoderTuning()}), encoder_cache=EncoderCache(4))
    tiny_sam.image_encoder.neck.requires_grad_(True)  # changed behind the stack's back: still caught
    with pytest.raises(ValueError, match="neck"):
        model(random_batch(1))


def test_module_counts_cache_hits_per_stage():
    module = SamflowModule(
        sam=SamSpec(variant="tiny", encoder_cache=16), plugins={"decoder": DecoderTuning()}
    )
    batch = random_batch(2)
    module.train()
    module(batch)
    module(batch)
    module.eval()
    with torch.no_grad():
        module(batch)
    cache = module.model.encoder_cache
    assert cache.counts == {"train": [2, 2], "eval": [2, 0]}


def adapter_grads(tiny_sam, checkpoint_blocks: bool):
    torch.manual_seed(0)
    plugin = SamAdapter()
    model = HookedSam(tiny_sam, PluginStack({"adapter": plugin}), checkpoint_blocks=checkpoint_blocks).train()
    with torch.no_grad():  # a non-zero up-projection, so the adapter changes the encoder
        for p in plugin.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    calls = []
    inner = model._hooked_block
    model._hooked_block = lambda *a: calls.append(a[0]) or inner(*a)
    out = model(random_batch(2))
    out.pred.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in plugin.named_parameters() if p.grad is not None}
    return out.pred.detach(), grads, len(calls)


def test_checkpointed_blocks_give_the_same_outputs_and_gradients(tiny_sam):
    pred, grads, calls = adapter_grads(tiny_sam, checkpoint_blocks=False)
    pred_ckpt, grads_ckpt, calls_ckpt = adapter_grads(tiny_sam, checkpoint_blocks=True)
    depth = len(tiny_sam.image_encoder.blocks)
    assert calls == depth and calls_ckpt == 2 * depth  # each block ran again in the backward pass
    torch.testing.assert_close(pred_ckpt, pred, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7)


def test_stages_outside_the_cache_bypass_it():
    cache, encoder = EncoderCache(capacity=10, stages=("eval",)), Recorder()
    x = images(2)
    cache.encode(x, (), encoder, tally="train")
    cache.encode(x, (), encoder, tally="train")
    assert encoder.calls == [2, 2] and len(cache) == 0 and "train" not in cache.counts
    cache.encode(x, (), encoder, tally="eval")
    cache.encode(x, (), encoder, tally="eval")
    assert encoder.calls == [2, 2, 2] and cache.counts["eval"] == [2, 2]
    with pytest.raises(ValueError, match="'train' and/or 'eval'"):
        EncoderCache(4, stages=("val",))


def test_encoder_features_are_captured_and_checked(tiny_sam):
    from samflow.plugins import SamPlugin

    class Reader(SamPlugin):
        def __init__(self, blocks):
            super().__init__()
            self.blocks = blocks

        def encoder_features(self):
            return self.blocks

    model = HookedSam(tiny_sam, PluginStack({"r": Reader((0, 2))})).eval()
    batch = random_batch(2)
    with torch.no_grad():
        _, ctx = model.run(batch)
        x = model.preprocess(batch.image, batch.input_size)
        enc = tiny_sam.image_encoder
        expected = enc.patch_embed(x) + enc.pos_embed
        outputs = []
        for block in enc.blocks:
            expected = block(expected)
            outputs.append(expected)
    assert sorted(ctx.encoded.features) == [0, 2]
    for i in (0, 2):
        torch.testing.assert_close(ctx.encoded.features[i], outputs[i], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"Plugin 'r' asks for the output of encoder block\(s\) \[9\]"):
        HookedSam(tiny_sam, PluginStack({"r": Reader((9,))}))
