"""Helpers shared by the PA-SAM tests: a probe plugin and a hooked SAM with PA-SAM."""

from __future__ import annotations

from typing_extensions import override

from samflow.plugins.base import DecoderContext, DecoderFeatures, DecoderState, SamPlugin
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam


class Probe(SamPlugin):
    """Records the decoder state it sees in every layer and the final token count."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[int, DecoderState] = {}
        self.final_tokens = -1

    @override
    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        self.states[i] = state
        return state

    @override
    def decode_token(self, tokens, feats: DecoderFeatures, ctx: DecoderContext) -> dict:
        self.final_tokens = feats.tokens.shape[1]
        return {}


def hooked(sam, plugins: dict) -> HookedSam:
    """A HookedSam with ``plugins`` in order; the stack's ``attach`` unfreezes the SAM parts they declare."""
    model = HookedSam(sam, PluginStack(plugins))
    for key, plugin in model.plugins.items():
        for part in plugin.sam_modules_to_train():
            params = dict(sam.get_submodule(part).named_parameters(prefix=f"sam.{part}"))
            assert all(p.requires_grad for p in params.values()), (key, part)
            assert all(model.plugins.owner_of(name) is not None for name in params), (key, part)
    return model
