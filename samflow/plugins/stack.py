"""``PluginStack``: several plugins at once, keyed by the names an experiment gives them.

Rules (docs/architecture.md):
- plugins live in an ``nn.ModuleDict`` under their keys, so checkpoint keys are ``plugins.<key>.*``;
- fold hooks (``block_input``, ``block_output``, ``attn_logits``, ``prompts``, ``decoder_layer``)
  chain in the experiment's order; collected outputs (tokens, masks, losses) are namespaced by key;
- ``select``: the first plugin (in order) that returns a prediction wins;
- declared conflicts fail at build time, naming both plugins;
- only overridden hooks are called, so an unused site costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from samflow.plugins.base import DecoderFeatures, DecoderState, ForwardContext, SamPlugin
from samflow.plugins.registry import plugin_name

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from samflow.sam.output import SamOutput

HOOKS = (
    "on_image",
    "block_input",
    "attn_logits",
    "block_output",
    "prompts",
    "decoder_layer",
    "decode_token",
    "select",
    "losses",
    "output_tokens",
)

#: Hooks that run inside the image encoder; a plugin using one makes the encoder's output its own.
ENCODER_HOOKS = ("on_image", "block_input", "attn_logits", "block_output")


class PluginConflictError(ValueError):
    """Two plugins of an experiment cannot run together."""


def _overrides(plugin: SamPlugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(SamPlugin, hook)


class PluginStack(nn.ModuleDict):
    """The plugins of one model, in order, with their hooks dispatched."""

    def __init__(self, plugins: Mapping[str, SamPlugin] | None = None) -> None:
        super().__init__()
        for key, plugin in (plugins or {}).items():
            if not isinstance(plugin, SamPlugin):
                raise TypeError(
                    f"Plugin {key!r} is a {type(plugin).__name__}, not a SamPlugin. "
                    "Plugins must subclass samflow.SamPlugin."
                )
            if "/" in key or "." in key or not key:
                raise ValueError(f"Plugin key {key!r} must be a non-empty name without '.' or '/'.")
            plugin.key = key
            self[key] = plugin
        self._check_conflicts()
        self._users: dict[str, list[SamPlugin]] = {}
        self._token_counts: list[tuple[SamPlugin, int]] = []

    def _check_conflicts(self) -> None:
        names = {key: plugin_name(type(p)) or key for key, p in self.items()}
        for key, plugin in self.items():
            for other_key, other_name in names.items():
                if other_key != key and (other_name in plugin.conflicts or other_key in plugin.conflicts):
                    raise PluginConflictError(
                        f"Plugin {key!r} ({type(plugin).__name__}) conflicts with plugin {other_key!r} "
                        f"({type(self[other_key]).__name__}); remove one of them from the experiment."
                    )

    # ---- setup ----
    def setup(self, sam: Sam) -> None:
        """Set every plugin up on ``sam``, then record which plugins use which hooks."""
        for plugin in self.values():
            plugin.setup(sam)
        self._users = {hook: [p for p in self.values() if _overrides(p, hook)] for hook in HOOKS}
        self._token_counts = []
        for plugin in self._users["output_tokens"]:
            tokens = plugin.output_tokens()
            self._token_counts.append((plugin, 0 if tokens is None else tokens.shape[0]))

    def encoder_features(self) -> tuple[int, ...]:
        """Encoder blocks whose outputs any plugin reads, sorted."""
        return tuple(sorted({i for p in self.values() for i in p.encoder_features()}))

    def encoder_hook_users(self) -> list[str]:
        """``key (hook)`` for every plugin that changes or sees the inside of the image encoder."""
        return [f"{p.key} ({hook})" for hook in ENCODER_HOOKS for p in self._users.get(hook, [])]

    def uses(self, hook: str) -> bool:
        """Whether any plugin overrides ``hook``."""
        return bool(self._users.get(hook))

    def trainable_sam_modules(self) -> dict[str, list[str]]:
        """Plugin key -> SAM sub-modules it trains."""
        return {key: p.sam_modules_to_train() for key, p in self.items() if p.sam_modules_to_train()}

    # ---- fold hooks ----
    def on_image(self, image: Tensor, tokens: Tensor, ctx: ForwardContext) -> None:
        for plugin in self._users["on_image"]:
            plugin.on_image(image, tokens, ctx)

    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        for plugin in self._users["block_input"]:
            x = plugin.block_input(i, x, ctx)
        return x

    def attn_logits(
        self, i: int, scale: float | Tensor, bias: Tensor | None, q: Tensor, ctx: ForwardContext
    ) -> tuple[float | Tensor, Tensor | None]:
        for plugin in self._users["attn_logits"]:
            scale, bias = plugin.attn_logits(i, scale, bias, q, ctx)
        return scale, bias

    def block_output(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        for plugin in self._users["block_output"]:
            x = plugin.block_output(i, x, ctx)
        return x

    def prompts(self, sparse: Tensor, dense: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        for plugin in self._users["prompts"]:
            sparse, dense = plugin.prompts(sparse, dense, ctx)
        return sparse, dense

    def decoder_layer(self, i: int, state: DecoderState, ctx: ForwardContext) -> DecoderState:
        for plugin in self._users["decoder_layer"]:
            state = plugin.decoder_layer(i, state, ctx)
        return state

    # ---- extra output tokens ----
    def output_tokens(self) -> Tensor | None:
        """All plugins' extra tokens (T, C) in order, or None."""
        tokens = [t for p in self._users["output_tokens"] if (t := p.output_tokens()) is not None]
        return torch.cat(tokens, dim=0) if tokens else None

    def decode_tokens(self, tokens: Tensor, feats: DecoderFeatures, ctx: ForwardContext) -> dict[str, Tensor]:
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
    def select(self, out: SamOutput, ctx: ForwardContext) -> Tensor | None:
        for plugin in self._users["select"]:
            chosen = plugin.select(out, ctx)
            if chosen is not None:
                return chosen
        return None

    def losses(self, out: SamOutput, batch: dict[str, Any], ctx: ForwardContext) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for plugin in self._users["losses"]:
            for name, value in plugin.losses(out, batch, ctx).items():
                terms[f"{plugin.key}/{name}"] = value
        return terms
