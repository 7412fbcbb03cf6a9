"""Helpers shared by the PA-SAM tests: a probe plugin and a hooked SAM with PA-SAM."""

from __future__ import annotations

from typing_extensions import override

from samflow.plugins.base import DecoderFeatures, DecoderState, ForwardContext, SamPlugin
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam


class Probe(SamPlugin):
    """Records the decoder state it sees in every layer and the final token count."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[int, DecoderState] = {}
        self.final_tokens = -1

    @override
    def decoder_layer(self, i: int, state: DecoderState, ctx: ForwardContext) -> DecoderState:
        self.states[i] = state
        return state

    @override
    def decode_token(self, tokens, feats: DecoderFeatures, ctx: ForwardContext) -> dict:
        self.final_tokens = feats.tokens.shape[1]
        return {}


def hooked(sam, plugins: dict) -> HookedSam:
    """A HookedSam with ``plugins`` in order, SAM parts they declare unfrozen (as SamflowModule does)."""
    model = HookedSam(sam, PluginStack(plugins))
    for parts in model.plugins.trainable_sam_modules().values():
        for part in parts:
            sam.get_submodule(part).requires_grad_(True)
    return model
