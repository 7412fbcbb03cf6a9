"""Guarantees docs/architecture.md states about the forward contract and checkpoints, each checked on tiny SAM.

- "Hooks, in the order one pass calls them": on_image, per block i block_input(i) -> attn_logits(i) ->
  block_output(i), then prompts, decoder_layer(i) per layer, decode_token, select, losses;
- "the stack calls only overridden hooks";
- ``ctx.state``: one scratch space shared by the encoder and decoder stages of a forward, empty at the
  next forward;
- ``SamflowModule.load_state_dict`` fills only the frozen SAM weights and stays strict about the rest
  (a trained SAM part the checkpoint lacks is refused, in one line).
"""

from __future__ import annotations

import pytest
import torch

from samflow.module import SamflowModule
from samflow.plugins import PluginStack, SamPlugin
from samflow.sam import HookedSam
from samflow.sam.build import CheckpointError
from samflow.sam_spec import SamSpec
from samflow.testing import random_batch


class Recorder(SamPlugin):
    """Overrides every hook of the pass and records each call (with the block or layer index)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int | None]] = []

    def on_image(self, image, tokens, ctx):
        self.calls.append(("on_image", None))

    def block_input(self, i, x, ctx):
        self.calls.append(("block_input", i))
        return x

    def attn_logits(self, i, scale, bias, q, ctx):
        self.calls.append(("attn_logits", i))
        return scale, bias

    def block_output(self, i, x, ctx):
        self.calls.append(("block_output", i))
        return x

    def prompts(self, prompts, ctx):
        self.calls.append(("prompts", None))
        return prompts

    def decoder_layer(self, i, state, ctx):
        self.calls.append(("decoder_layer", i))
        return state

    def decode_token(self, tokens, feats, ctx):
        self.calls.append(("decode_token", None))
        return {}

    def select(self, out, ctx):
        self.calls.append(("select", None))

    def losses(self, out, batch, ctx):
        self.calls.append(("losses", None))
        return {}


def test_one_pass_calls_the_hooks_in_the_documented_order(tiny_sam):
    recorder = Recorder()
    model = HookedSam(tiny_sam, PluginStack({"rec": recorder}))
    batch = random_batch(2)
    out, dctx = model.run(batch)
    model.plugins.losses(out, batch, dctx)  # the module calls it after the pass
    blocks = len(tiny_sam.image_encoder.blocks)
    layers = len(tiny_sam.mask_decoder.transformer.layers)
    expected = [("on_image", None)]
    for i in range(blocks):
        expected += [("block_input", i), ("attn_logits", i), ("block_output", i)]
    expected += [("prompts", None)]
    expected += [("decoder_layer", i) for i in range(layers)]
    expected += [("decode_token", None), ("select", None), ("losses", None)]
    assert recorder.calls == expected


class OnlyPrompts(SamPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def prompts(self, prompts, ctx):
        self.seen += 1
        return prompts


def test_the_stack_calls_only_the_hooks_a_plugin_overrides(tiny_sam, monkeypatch):
    plugin = OnlyPrompts()
    model = HookedSam(tiny_sam, PluginStack({"p": plugin}))
    called: list[str] = []

    def base(name):
        def hook(self, *args, **kwargs):
            called.append(name)
            return getattr(SamPlugin, f"_h6_{name}")(self, *args, **kwargs)

        return hook

    # the base class's no-op hooks, which this plugin inherits: not one may run
    for name in ("on_image", "block_input", "attn_logits", "block_output", "decoder_layer", "select"):
        monkeypatch.setattr(SamPlugin, f"_h6_{name}", getattr(SamPlugin, name), raising=False)
        monkeypatch.setattr(SamPlugin, name, base(name))
    model.run(random_batch(2))
    assert plugin.seen == 1
    assert called == []


class Scratch(SamPlugin):
    """Writes its scratch space in the encoder stage and reads it in the decoder stage."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict] = []

    def on_image(self, image, tokens, ctx):
        state = ctx.state.setdefault(self.key, {})
        state["images"] = state.get("images", 0) + image.shape[0]

    def select(self, out, ctx):
        self.found.append(dict(ctx.state.get(self.key, {})))


def test_ctx_state_is_shared_by_the_two_stages_of_a_forward_and_empty_at_the_next(tiny_sam):
    plugin = Scratch()
    model = HookedSam(tiny_sam, PluginStack({"s": plugin}))
    model.run(random_batch(2))
    model.run(random_batch(3))
    # each forward saw only its own encoder stage's entry: nothing carried over from the one before
    assert plugin.found == [{"images": 2}, {"images": 3}]


def test_a_checkpoint_without_a_trained_sam_part_is_refused_not_filled_from_the_built_sam():
    from samflow_plugins.decoder_tuning import DecoderTuning
    from samflow_plugins.tokens import ExtraTokens

    tiny = SamSpec(variant="tiny")
    trained = SamflowModule(sam=tiny, plugins={"tokens": ExtraTokens()})
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)  # the slim state: the frozen SAM left out
    here = SamflowModule(sam=tiny, plugins={"tokens": ExtraTokens(), "decoder": DecoderTuning()})
    with pytest.raises(CheckpointError) as err:
        here.load_state_dict(checkpoint["state_dict"])
    message = str(err.value)
    assert "model.sam.mask_decoder." in message and "\n" not in message

    # the same experiment's own checkpoint loads, its trained mask decoder included
    tuned = SamflowModule(sam=tiny, plugins={"tokens": ExtraTokens(), "decoder": DecoderTuning()})
    with torch.no_grad():
        for param in tuned.model.sam.mask_decoder.parameters():
            param.add_(1.0)
    own = {"state_dict": tuned.state_dict()}
    tuned.on_save_checkpoint(own)
    here.load_state_dict(own["state_dict"])
    for (name, a), b in zip(
        here.model.sam.mask_decoder.named_parameters(), tuned.model.sam.mask_decoder.parameters()
    ):
        assert torch.equal(a, b), name
