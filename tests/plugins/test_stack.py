"""Composition rules of PluginStack and the hook sites of HookedSam."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_batch
from torch import Tensor, nn

from samflow.plugins import DecoderContext, DecoderState, PluginConflictError, PluginStack, SamPlugin
from samflow.sam import HookedSam


class Recorder(SamPlugin):
    """Records the hook calls it sees, in order, with shapes."""

    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def on_image(self, image, tokens, ctx):
        self.log.append((self.key, "on_image", tuple(image.shape), tuple(tokens.shape)))

    def block_input(self, i, x, ctx):
        self.log.append((self.key, f"block_input{i}", tuple(x.shape)))
        return x

    def block_output(self, i, x, ctx):
        self.log.append((self.key, f"block_output{i}", tuple(x.shape)))
        return x

    def prompts(self, prompts, ctx):
        self.log.append((self.key, "prompts", tuple(prompts.sparse.shape), tuple(prompts.dense.shape)))
        return prompts

    def decoder_layer(self, i, state, ctx):
        self.log.append((self.key, f"decoder_layer{i}", tuple(state.queries.shape)))
        return state


class AddOne(SamPlugin):
    """Adds ``value`` to every encoder block input: fold hooks chain."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value = value

    def block_input(self, i, x, ctx):
        return x + self.value


class Hates(SamPlugin):
    conflicts = ("tokens",)


class AppendTokens(SamPlugin):
    """Appends ``count`` zero-content tokens in decoder layer 0."""

    def __init__(self, count: int = 3) -> None:
        super().__init__()
        self.count = count

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        if i != 0:
            ctx.state[self.key]["seen"] = state.queries.shape[1]
            return state
        ctx.state.setdefault(self.key, {})
        n, _, c = state.queries.shape
        extra = state.queries.new_zeros(n, self.count, c)
        return state.append(queries=extra, attn_out=extra, query_pe=extra)


def test_every_site_is_called_in_order_with_shapes(tiny_sam):
    log: list = []
    stack = PluginStack({"a": Recorder(log), "b": Recorder(log)})
    with torch.no_grad():
        HookedSam(tiny_sam, stack)(random_batch(2, prompt="box"))
    sites = [entry[1] for entry in log if entry[0] == "a"]
    blocks = [s for i in range(4) for s in (f"block_input{i}", f"block_output{i}")]
    assert sites == ["on_image", *blocks, "prompts", "decoder_layer0", "decoder_layer1"]
    assert log[0] == ("a", "on_image", (2, 3, 128, 128), (2, 8, 8, 64))
    assert log[1][0] == "b"  # b runs right after a at each site
    assert ("a", "prompts", (2, 2, 64), (2, 64, 8, 8)) in log
    assert ("a", "decoder_layer0", (2, 5 + 2, 64)) in log


def test_fold_hooks_chain_in_order(tiny_sam):
    batch = random_batch(1)
    with torch.no_grad():
        twice = HookedSam(tiny_sam, PluginStack({"x": AddOne(1.0), "y": AddOne(2.0)}))(batch)
        once = HookedSam(tiny_sam, PluginStack({"z": AddOne(3.0)}))(batch)
    torch.testing.assert_close(twice.masks["sam"], once.masks["sam"])


def test_declared_conflict_names_both_plugins():
    from samflow_plugins.tokens import ExtraTokens

    with pytest.raises(PluginConflictError, match="'h' .*Hates.* conflicts with plugin 't' .*ExtraTokens"):
        PluginStack({"h": Hates(), "t": ExtraTokens()})


def test_conflicts_are_by_registered_name_not_by_experiment_key():
    # an unrelated plugin under the key "tokens" is no conflict; ExtraTokens under any key is one
    PluginStack({"h": Hates(), "tokens": AddOne(1.0)})
    with pytest.raises(
        PluginConflictError, match="'h' .*Hates.* conflicts with plugin 'extra' .*ExtraTokens"
    ):
        from samflow_plugins.tokens import ExtraTokens

        PluginStack({"h": Hates(), "extra": ExtraTokens()})


def test_bad_plugin_values_and_keys():
    with pytest.raises(TypeError, match="Plugin 'x' is a Linear, not a SamPlugin"):
        PluginStack({"x": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="without '.' or '/'"):
        PluginStack({"a.b": SamPlugin()})


def test_plugin_tokens_appended_in_a_decoder_layer_join_later_layers(tiny_sam):
    stack = PluginStack({"app": AppendTokens(3)})
    hooked = HookedSam(tiny_sam, stack)
    batch = random_batch(2)
    ctx = hooked.context(batch)
    with torch.no_grad():
        out = hooked(batch, ctx)
    assert ctx.state["app"]["seen"] == 5 + 2 + 3
    assert out.masks["sam"].shape == (2, 4, 32, 32)


def test_extra_tokens_are_namespaced_and_selected(tiny_sam):
    from samflow_plugins.tokens import ExtraTokens

    stack = PluginStack({"first": ExtraTokens(num_tokens=2, predict=False), "second": ExtraTokens()})
    with torch.no_grad():
        out = HookedSam(tiny_sam, stack)(random_batch(2))
    assert set(out.masks) == {"sam", "first/mask0", "first/mask1", "second/mask0"}
    assert torch.equal(out.pred, out.masks["second/mask0"])


def test_unused_sites_are_not_called(tiny_sam):
    stack = PluginStack({"r": AddOne()})
    HookedSam(tiny_sam, stack)
    assert stack.uses("block_input") and not stack.uses("decoder_layer") and not stack.uses("prompts")
    assert not isinstance(stack.output_tokens(), Tensor)


class BadAppend(SamPlugin):
    """Appends tokens to the queries only, forgetting the rest of the state."""

    def decoder_layer(self, i, state, ctx):
        extra = state.queries.new_zeros(state.queries.shape[0], 1, state.queries.shape[2])
        return DecoderState(
            torch.cat([state.queries, extra], 1),
            state.keys,
            state.query_pe,
            state.key_pe,
            state.attn_out,
            state.visible,
        )


def test_a_plugin_that_appends_tokens_badly_is_named(tiny_sam):
    with pytest.raises(RuntimeError, match="Plugin 'bad' left the decoder state with different token counts"):
        with torch.no_grad():
            HookedSam(tiny_sam, PluginStack({"bad": BadAppend()}))(random_batch(1))


def test_building_a_stack_reads_no_entry_points_unless_a_plugin_declares_conflicts(monkeypatch):
    from samflow.plugins import registry

    def refuse(*args, **kwargs):
        raise AssertionError("entry points were read")

    monkeypatch.setattr(registry, "entry_points", refuse)
    registry.discover.cache_clear()
    try:
        PluginStack({"x": AddOne(), "y": AppendTokens()})  # no conflicts declared: no scan
        with pytest.raises(AssertionError, match="entry points were read"):
            PluginStack({"h": Hates()})
    finally:
        registry.discover.cache_clear()


class ReplaceKeys(SamPlugin):
    """Replaces the image tokens in decoder layer ``layer`` by ``2 * keys + 1`` and keeps what it saw."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.seen: dict[str, Tensor] = {}

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        if i != self.layer:
            return state
        self.seen = {"keys": 2 * state.keys + 1, "key_pe": state.key_pe}
        return dataclasses.replace(state, keys=self.seen["keys"])


@pytest.mark.parametrize("layer", [0, 1, None])
def test_image_to_token_attention_reads_the_keys_a_plugin_returns(tiny_sam, layer):
    """The image-to-token attention of a layer takes keys + key_pe of the keys the ``decoder_layer``
    hooks returned (the unchanged sum is reused when no plugin replaced them)."""
    plugin = ReplaceKeys(-1 if layer is None else layer)
    model = HookedSam(tiny_sam, PluginStack({"replace": plugin}))
    attention_inputs = []
    handles = [
        block.cross_attn_image_to_token.q_proj.register_forward_hook(
            lambda module, args, out: attention_inputs.append(args[0])
        )
        for block in tiny_sam.mask_decoder.transformer.layers
    ]
    seen_keys = []
    handles += [
        block.cross_attn_token_to_image.v_proj.register_forward_hook(
            lambda m, args, out: seen_keys.append(args[0])
        )
        for block in tiny_sam.mask_decoder.transformer.layers
    ]
    try:
        with torch.no_grad():
            model(random_batch(2, prompt="box"))
    finally:
        for handle in handles:
            handle.remove()
    for i, (queries, keys) in enumerate(zip(attention_inputs, seen_keys, strict=True)):
        if i == layer:
            assert torch.equal(queries, plugin.seen["keys"] + plugin.seen["key_pe"])
        else:  # the layer's own keys (its token-to-image values) + the image's positional encoding
            key_pe = model.sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
            torch.testing.assert_close(queries, keys + key_pe, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", ["keys", "items", "owned", "training", "forward"])
def test_a_plugin_key_that_the_stack_uses_itself_is_refused_by_name(key):
    with pytest.raises(ValueError, match=rf"Plugin key '{key}' is taken by the plugin stack itself"):
        PluginStack({key: Recorder([])})
