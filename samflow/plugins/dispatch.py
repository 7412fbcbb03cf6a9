"""``PluginHooks``: the hook sites of a ``PluginStack``, each calling the plugins that fill it.

A site calls only the plugins that override its hook (``PluginStack.attach`` records them in
``_users``), in the experiment's order, and checks what each returns: a fold hook passes its value
from plugin to plugin (a tensor of the shape it received, the ``PromptEmbeddings`` / ``DecoderState``
with one token count), collected outputs (masks, losses, panels) are named ``<key>/<name>``, and
``select`` refuses two plugins that both give the prediction (``PluginConflictError``): the backstop of
``PluginStack``'s build-time check, for plugins that leave ``predicts`` undeclared (or declare it wrongly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from samflow.batch import SamBatch
from samflow.plugins.base import SamplePanel, SamPlugin
from samflow.plugins.checks import bad_return, check_tensor
from samflow.plugins.registry import PluginError
from samflow.sam.types import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    ForwardContext,
    HookSites,
    PromptEmbeddings,
    SamOutput,
)

__all__ = ["PluginConflictError", "PluginHooks"]


class PluginConflictError(ValueError):
    """Two plugins of an experiment cannot run together."""


class PluginHooks(HookSites):
    """The hook sites of ``PluginStack`` (its base): each runs the plugins that override the hook.

    ``_users`` (hook -> plugins overriding it, in order) and ``_token_counts`` (plugin -> its extra
    output tokens) are set by ``PluginStack.attach``.
    """

    _users: dict[str, list[SamPlugin]]
    _token_counts: list[tuple[SamPlugin, int]]

    if TYPE_CHECKING:  # nn.ModuleDict's, beside this base in PluginStack

        def __getitem__(self, key: str) -> nn.Module: ...

    # ---- fold hooks ----
    def on_image(self, image: Tensor, tokens: Tensor, ctx: ForwardContext) -> None:
        for plugin in self._users["on_image"]:
            plugin.on_image(image, tokens, ctx)

    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        for plugin in self._users["block_input"]:
            x = check_tensor(plugin, f"block_input(i={i})", plugin.block_input(i, x, ctx), x.shape, _BLOCK)
        return x

    def attn_logits(
        self, i: int, scale: float | Tensor, bias: Tensor | None, q: Tensor, ctx: ForwardContext
    ) -> tuple[float | Tensor, Tensor | None]:
        for plugin in self._users["attn_logits"]:
            scale, bias = plugin.attn_logits(i, scale, bias, q, ctx)
        return scale, bias

    def block_output(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        for plugin in self._users["block_output"]:
            x = check_tensor(plugin, f"block_output(i={i})", plugin.block_output(i, x, ctx), x.shape, _BLOCK)
        return x

    def prompts(self, prompts: PromptEmbeddings, ctx: DecoderContext) -> PromptEmbeddings:
        for plugin in self._users["prompts"]:
            before = prompts
            prompts = plugin.prompts(prompts, ctx)
            if not isinstance(prompts, PromptEmbeddings):
                raise bad_return(plugin, "prompts", prompts, "PromptEmbeddings (return the one it received)")
            n, _, c = before.sparse.shape
            sparse = prompts.sparse
            if (
                not isinstance(sparse, Tensor)
                or sparse.ndim != 3
                or (sparse.shape[0], sparse.shape[2]) != (n, c)
            ):
                raise bad_return(
                    plugin, "prompts: sparse", sparse, f"a tensor of shape ({n}, K, {c}) (N, K, C)"
                )
            check_tensor(plugin, "prompts: dense", prompts.dense, before.dense.shape, "(N, C, h, w)")
            if prompts.visible.shape != sparse.shape[:2] or prompts.visible.dtype != torch.bool:
                raise PluginError(
                    f"Plugin {plugin.key!r} ({type(plugin).__name__}) returned {sparse.shape[1]} sparse prompt "
                    f"tokens but visibility of shape {tuple(prompts.visible.shape)} ({prompts.visible.dtype}); "
                    "add tokens with PromptEmbeddings.append."
                )
        return prompts

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        for plugin in self._users["decoder_layer"]:
            state = plugin.decoder_layer(i, state, ctx)
            if not isinstance(state, DecoderState):
                raise bad_return(
                    plugin, f"decoder_layer(i={i})", state, "DecoderState (return the one it received)"
                )
            sizes = {
                state.queries.shape[1],
                state.query_pe.shape[1],
                state.attn_out.shape[1],
                state.visible.shape[1],
            }
            if len(sizes) > 1:
                raise PluginError(
                    f"Plugin {plugin.key!r} left the decoder state with different token counts "
                    f"(queries, query_pe, attn_out, visible: {sorted(sizes)}); add tokens with DecoderState.append."
                )
        return state

    # ---- extra output tokens ----
    def output_tokens(self) -> Tensor | None:
        """All plugins' extra tokens (T, C) in order, or None."""
        tokens = [t for p in self._users["output_tokens"] if (t := p.output_tokens()) is not None]
        return torch.cat(tokens, dim=0) if tokens else None

    def decode_tokens(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        """Hand each plugin its slice of ``tokens`` (N, T, C); return its masks as ``key/name``."""
        masks: dict[str, Tensor] = {}
        start = 0
        for plugin, count in self._token_counts:
            own = tokens[:, start : start + count]
            start += count
            for name, value in plugin.decode_token(own, feats, ctx).items():
                masks[f"{plugin.key}/{name}"] = value
        for plugin in self._users["decode_token"]:
            if all(plugin is not p for p, _ in self._token_counts):
                for name, value in plugin.decode_token(tokens[:, :0], feats, ctx).items():
                    masks[f"{plugin.key}/{name}"] = value
        return masks

    # ---- after the decoder ----
    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor | None:
        """The prediction one plugin chose, or None (SAM's rule). Two plugins that both choose one are
        refused: whichever came first would win, and the other's mask would reach no loss or metric."""
        chosen: dict[str, Tensor] = {}
        for plugin in self._users["select"]:
            mask = plugin.select(out, ctx)
            if mask is not None:
                n, _, h, w = out.masks["sam"].shape
                check_tensor(plugin, "select", mask, (n, 1, h, w), "(N, 1, h, w): one mask per prompt row")
                if not mask.is_floating_point():
                    raise bad_return(plugin, "select", mask, f"mask logits, a float tensor, not {mask.dtype}")
                if plugin.predicts is False:
                    raise PluginError(
                        f"Plugin {plugin.key!r} ({type(plugin).__name__}) declares predicts = False, but its "
                        "select returned a mask; declare predicts = True (SamPlugin.predicts) so that the stack "
                        "can refuse a second predicting plugin when the model is built."
                    )
                chosen[plugin.key] = mask
        if len(chosen) > 1:
            first, second = (self[key] for key in list(chosen)[:2])
            raise PluginConflictError(
                f"Plugins {first.key!r} ({type(first).__name__}) and {second.key!r} ({type(second).__name__}) "
                "both give the model's prediction (their select hooks both returned a mask), so one's mask "
                "would reach no loss or metric; keep one predicting (turn the other's prediction off, if it "
                "has such an option) or remove one of them from model.plugins (a plugin whose select returns "
                "a mask declares predicts = True, and such a pair is refused when the model is built)."
            )
        return next(iter(chosen.values()), None)

    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for plugin in self._users["losses"]:
            for name, value in plugin.losses(out, batch, ctx).items():
                terms[f"{plugin.key}/{name}"] = value
        return terms

    def sample_panels(self, out: SamOutput, ctx: DecoderContext) -> dict[str, SamplePanel]:
        """Every plugin's extra sample-grid panels, named ``<key>/<name>``."""
        return {
            f"{plugin.key}/{name}": panel
            for plugin in self._users.get("sample_panels", [])
            for name, panel in plugin.sample_panels(out, ctx).items()
        }


_BLOCK = "(B, h, w, C), the shape it received"
