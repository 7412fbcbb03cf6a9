"""``PluginStack``: several plugins at once, keyed by the names an experiment gives them.

Rules (docs/architecture.md):
- plugins live in an ``nn.ModuleDict`` under their keys, so checkpoint keys are ``plugins.<key>.*``;
- fold hooks (``block_input``, ``block_output``, ``attn_logits``, ``prompts``, ``decoder_layer``)
  chain in the experiment's order; collected outputs (tokens, masks, losses) are namespaced by key;
- ``select``: at most one plugin gives the prediction; two that declare it (``SamPlugin.predicts``)
  are refused when the stack is built, naming both (the other's mask would be left out of the losses
  and metrics, depending on the key order); two undeclared ones that both return a mask, at the first
  forward (``PluginHooks.select``);
- each plugin's ``setup`` draws its random initial values as it would alone (``_init_streams``), so
  adding a plugin, or writing the keys in another order, leaves the others' initial values as they are;
- declared conflicts fail at build time, naming both plugins (entry points are read only then), and
  so do two plugins that train one SAM part with different ``lr`` / ``weight_decay`` (the part has one
  optimizer group: that of the plugin whose key sorts first, whatever the order the keys are written in);
- only overridden hooks are called, so an unused site costs nothing;
- one owner of what trains: ``attach`` freezes SAM, sets every plugin up, and records which plugin
  owns each trainable parameter (its own, the modules it injected into SAM, the SAM parts it
  declares). The optimizer's groups, the counts printed at start, the slim checkpoint and the
  encoder cache's check all read that record (``owned``, ``frozen_sam_keys``).
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Mapping, Sequence, ValuesView
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from samflow.plugins.base import SamPlugin
from samflow.plugins.checks import (
    HOOKS,
    OVERRIDABLE,
    check_hook_names,
    describe,
    near_hooks,
)
from samflow.plugins.dispatch import PluginConflictError, PluginHooks
from samflow.plugins.registry import PluginError
from samflow.sam.backbones import Backbone
from samflow.sam.build import freeze
from samflow.seeding import stable_seed

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


#: Hooks that run inside the image encoder; a plugin using one makes the encoder's output its own.
ENCODER_HOOKS = ("on_image", "block_input", "attn_logits", "block_output")


def _overrides(plugin: SamPlugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(SamPlugin, hook)


class PluginStack(PluginHooks, nn.ModuleDict):
    """The plugins of one model, in order, with their hooks dispatched and their parameters owned.

    Parameter names in the ownership record are relative to the ``HookedSam`` that holds the stack:
    ``plugins.<key>.<name>`` for a plugin's own parameters, ``sam.<name>`` for SAM's.
    """

    def __init__(self, plugins: Mapping[str, SamPlugin] | None = None) -> None:
        super().__init__()
        for key, plugin in (plugins or {}).items():
            self[key] = plugin
        self._check_conflicts()
        self._check_predictors()
        self._users: dict[str, list[SamPlugin]] = {}
        self._token_counts: list[tuple[SamPlugin, int]] = []
        self.owned: dict[str, dict[str, nn.Parameter]] = {}
        self._own: dict[str, dict[str, nn.Parameter]] = {}  # own and injected parameters, by key
        self._parts: dict[tuple[str, str], dict[str, nn.Parameter]] = {}  # (key, SAM part) -> its own
        self.frozen_sam_keys: set[str] = set()
        self._injected: list[
            nn.Module
        ] = []  # modules plugins put into SAM (a plain list: not registered twice)

    # ---- entries: SamPlugins only ----
    def __setitem__(self, key: str, module: nn.Module) -> None:
        if not isinstance(module, SamPlugin):
            raise TypeError(
                f"Plugin {key!r} is a {type(module).__name__}, not a SamPlugin. "
                "Plugins must subclass samflow.SamPlugin."
            )
        if "/" in key or "." in key or not key:
            raise ValueError(f"Plugin key {key!r} must be a non-empty name without '.' or '/'.")
        if key in _RESERVED_KEYS:  # a method or attribute of the stack: the entry would shadow it
            raise ValueError(
                f"Plugin key {key!r} is taken by the plugin stack itself (PluginStack.{key}); "
                "give the plugin another key in the experiment's plugins."
            )
        module.key = key
        super().__setitem__(key, module)

    # nn.ModuleDict types its entries as Module; __setitem__ admits only SamPlugins.
    def __getitem__(self, key: str) -> SamPlugin:
        return cast(SamPlugin, super().__getitem__(key))

    def items(self) -> ItemsView[str, SamPlugin]:
        return cast("ItemsView[str, SamPlugin]", super().items())

    def values(self) -> ValuesView[SamPlugin]:
        return cast("ValuesView[SamPlugin]", super().values())

    def _check_conflicts(self) -> None:
        if not any(p.conflicts for p in self.values()):
            return  # nothing declared: no need to read the entry points
        from samflow.plugins.registry import plugin_name

        names = {key: plugin_name(type(p)) for key, p in self.items()}  # None: not registered
        for key, plugin in self.items():
            for other_key, other_name in names.items():
                if other_key != key and other_name in plugin.conflicts:  # by registered name, not key
                    raise PluginConflictError(
                        f"Plugin {key!r} ({type(plugin).__name__}) conflicts with plugin {other_key!r} "
                        f"({type(self[other_key]).__name__}); remove one of them from the experiment."
                    )

    def _check_predictors(self) -> None:
        """Refuse, before anything is loaded, two plugins that declare they give the prediction
        (``SamPlugin.predicts``); the first forward still refuses two undeclared ones that do."""
        chosen = [f"{key!r} ({type(p).__name__})" for key, p in self.items() if p.predicts is True]
        if len(chosen) > 1:
            raise PluginConflictError(
                f"Plugins {', '.join(chosen[:-1])} and {chosen[-1]} {'both' if len(chosen) == 2 else 'all'} "
                "give the model's prediction (they declare predicts = True: their select returns a mask), so "
                "only one's mask would reach the losses and metrics; keep one predicting (e.g. the extra "
                "tokens' predict: false) or remove the others from model.plugins."
            )

    # ---- setup ----
    def attach(self, sam: Sam) -> None:
        """Freeze ``sam``, set every plugin up on it, and record who owns each trainable parameter.

        A plugin owns its own trainable parameters, the trainable parameters that appeared in SAM
        during its ``setup`` (modules it injected or wrapped) and the parameters of the SAM parts it
        names in ``sam_modules_to_train`` (of a part several plugins name, the one whose key sorts
        first owns it: ``_claim_parts``). Everything else
        in SAM is frozen. ``frozen_sam_keys``: SAM's state-dict keys that existed before any plugin and
        do not train; the slim checkpoint leaves exactly those out.
        """
        freeze(sam)
        # every object whose id is taken below stays referenced until the end: a parameter or module a
        # plugin drops is freed otherwise, and the next new one often gets its memory, hence its id
        held: list[object] = []

        def ids(objects: Iterable[object]) -> set[int]:
            objects = list(objects)
            held.extend(objects)
            return {id(o) for o in objects}

        original = ids(sam.state_dict(keep_vars=True).values())
        depth = len(sam.image_encoder.blocks)
        claimed: dict[int, str] = {}  # parameter -> key of the plugin that owns it
        injected_by: dict[int, str] = {}  # parameter that appeared in SAM -> key of the plugin that put it
        parts: dict[tuple[str, str], dict[str, nn.Parameter]] = {}  # (key, SAM part) -> its parameters
        self._own = {}
        self._injected = []
        streams = _init_streams(self, torch.get_rng_state())
        after: dict[str, Tensor] = {}
        for key, plugin in self.items():
            if plugin.needs_vit_encoder and isinstance(sam.image_encoder, Backbone):
                raise PluginError(
                    f"Plugin {key!r} ({type(plugin).__name__}) adapts SAM's ViT image encoder, and this "
                    f"SAM's encoder is {type(sam.image_encoder).__name__}: use a ViT variant (tiny, vit_b, "
                    "vit_l, vit_h) with it, or leave the plugin out."
                )
            before = ids(sam.parameters())
            modules_before = ids(sam.modules())
            check_hook_names(plugin)
            torch.set_rng_state(streams[key])
            try:
                plugin.setup(sam)
            except PluginError:  # the plugin's own error, which names it (PluginConfigError)
                raise
            except Exception as err:  # any other error of the plugin's code, named with the plugin
                raise PluginError(
                    f"{describe(plugin.key, type(plugin))}: setup: {type(err).__name__}: {err}"
                ) from err
            after[key] = torch.get_rng_state()
            self._injected += [m for m in sam.modules() if id(m) not in modules_before]
            wrong = [i for i in plugin.encoder_features() if not 0 <= i < depth]
            if wrong:
                raise ValueError(
                    f"Plugin {key!r} asks for the output of encoder block(s) {wrong}, but the encoder "
                    f"has blocks 0..{depth - 1}."
                )
            owned: dict[str, nn.Parameter] = {}
            for name, param in plugin.named_parameters():
                if param.requires_grad and id(param) not in claimed:
                    owned[f"plugins.{key}.{name}"] = param
            for name, param in sam.named_parameters():
                if id(param) not in before:
                    held.append(param)
                    injected_by[id(param)] = key
                    if param.requires_grad and id(param) not in claimed:
                        owned[f"sam.{name}"] = param
            for part in plugin.sam_modules_to_train():
                try:
                    parts[key, part] = dict(sam.get_submodule(part).named_parameters(prefix=part))
                except AttributeError:
                    raise ValueError(
                        f"Plugin {key!r} asks to train SAM part {part!r}, which SAM lacks."
                    ) from None
            claimed.update((id(p), key) for p in owned.values())
            self._own[key] = owned
        # a part trains SAM's own weights and the modules its plugin put there, not another plugin's
        self._parts = {
            (key, part): {
                n: p for n, p in params.items() if id(p) not in claimed and injected_by.get(id(p), key) == key
            }
            for (key, part), params in parts.items()
        }
        self.owned = self._owned_in_order(sorted(self.keys()))
        for params in self.owned.values():
            for param in params.values():
                param.requires_grad_(True)  # the SAM parts, unfrozen once every plugin is set up
        self._check_shared_parts()
        if after:  # the generator goes on from one plugin's draws, the same whatever the key order
            torch.set_rng_state(after[max(after)])
        self.frozen_sam_keys = {
            name
            for name, t in sam.state_dict(keep_vars=True).items()
            if id(t) in original and not t.requires_grad
        }
        self._users = {hook: [p for p in self.values() if _overrides(p, hook)] for hook in HOOKS}
        self._token_counts = []
        for plugin in self._users["output_tokens"]:
            tokens = plugin.output_tokens()
            self._token_counts.append((plugin, 0 if tokens is None else tokens.shape[0]))

    def _owned_in_order(self, order: Sequence[str]) -> dict[str, dict[str, nn.Parameter]]:
        """Key -> the parameters it owns, when a SAM weight that several plugins train goes to the first
        of them in ``order``: its own and injected ones, then its SAM parts', each in order.

        ``owned`` is this in the keys' sorted order, so each plugin's share, and the optimizer group
        made of it, is the same in every order the keys are written in. Checkpoints written before gave
        a shared weight to the first key written (``match_saved_groups`` rebuilds their groups).
        """
        rank = {key: i for i, key in enumerate([*order, *sorted(set(self.keys()) - set(order))])}
        owner: dict[int, str] = {}
        for (key, _), params in self._parts.items():
            for param in params.values():
                held = owner.setdefault(id(param), key)
                if rank[key] < rank[held]:
                    owner[id(param)] = key
        owned = {key: dict(self._own[key]) for key in self.keys()}
        for (key, _), params in self._parts.items():
            for name, param in params.items():
                if owner[id(param)] == key:
                    owned[key].setdefault(f"sam.{name}", param)
        return owned

    def _check_shared_parts(self) -> None:
        owner = {id(p): key for key, params in self.owned.items() for p in params.values()}
        for (key, part), params in self._parts.items():
            for other in sorted({owner[id(p)] for p in params.values()} - {key}):
                self._check_shared_part(key, other, part)

    def _check_shared_part(self, key: str, owner: str, part: str) -> None:
        """Refuse plugin ``key`` training SAM ``part``, which plugin ``owner`` owns, with another ``lr`` or
        ``weight_decay``: the part trains in its owner's optimizer group, so ``key``'s would not apply."""
        if (self[key].lr, self[key].weight_decay) == (self[owner].lr, self[owner].weight_decay):
            return
        order = list(self.keys())
        a, b = (self[k] for k in sorted((key, owner), key=order.index))  # as the experiment writes them
        raise PluginConflictError(
            f"Plugins {a.key!r} ({type(a).__name__}) and {b.key!r} ({type(b).__name__}) both train SAM part "
            f"{part!r}, with different lr / weight_decay ({a.lr} / {a.weight_decay} and {b.lr} / "
            f"{b.weight_decay}); a part has one optimizer group: give both plugins the same lr and "
            f"weight_decay, or let one of them leave {part!r} frozen."
        )

    def optimizer_groups(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one per plugin that owns trainable parameters, ``name``d by its
        key, with its ``lr`` / ``weight_decay`` where it sets them, each parameter once.

        In the keys' sorted order, not the experiment's: the optimizer's state and a scheduler's
        per-group values are saved by position, so a run resumed with its keys written in another order
        gets its own back. ``order``: the groups of a checkpoint written when they followed the key order
        (a SAM weight several plugins train in the first one's group).
        """
        keys = sorted(self.keys()) if order is None else list(order)
        owned = self.owned if order is None else self._owned_in_order(keys)
        groups = []
        for key in keys:
            # a module a plugin injects into SAM and also keeps as an attribute is owned under both
            # names: listed twice, the optimizer would step it twice
            params = list({id(p): p for p in owned[key].values()}.values())
            if not params:
                continue
            group: dict[str, Any] = {"params": params, "name": key}
            if self[key].lr is not None:
                group["lr"] = self[key].lr
            if self[key].weight_decay is not None:
                group["weight_decay"] = self[key].weight_decay
            groups.append(group)
        return groups

    def match_saved_groups(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` pre-hook: give ``optimizer`` the groups of the saved state when they
        hold this stack's keys in another order or with another share of a SAM part.

        torch pairs groups, and the parameters in them, by position. Checkpoints written when the groups
        followed the experiment's key order (and a shared SAM part its first key) get that layout back,
        built from the same plugins; the scheduler's saved per-group values then fit it too. Saved groups
        of other names or sizes are left to torch's own check.
        """
        saved = [(group.get("name"), len(group["params"])) for group in state_dict["param_groups"]]
        if saved == [(group.get("name"), len(group["params"])) for group in optimizer.param_groups]:
            return
        names = [name for name, _ in saved]
        if not set(names) <= set(self.keys()) or len(set(names)) != len(names):
            return
        groups = self.optimizer_groups(names)
        if [(group["name"], len(group["params"])) for group in groups] != saved or sum(
            len(group["params"]) for group in optimizer.param_groups
        ) != sum(size for _, size in saved):
            return
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)  # the optimizer's defaults; the saved settings load over them

    def injected_modules(self) -> list[nn.Module]:
        return list(self._injected)

    def trainable_counts(self) -> dict[str, int]:
        """Plugin key -> number of trainable values it owns (a parameter it holds both as its own and
        inside SAM, an injected module it keeps, counts once)."""
        return {
            key: sum(p.numel() for p in {id(p): p for p in params.values()}.values())
            for key, params in self.owned.items()
        }

    def owner_of(self, name: str) -> str | None:
        """The key of the plugin that owns parameter ``name`` (``plugins.<key>...`` or ``sam....``), or None."""
        for key, params in self.owned.items():
            if name in params:
                return key
        return None

    def trained_encoder_parameters(self) -> dict[str, list[str]]:
        return {
            key: names
            for key, params in self.owned.items()
            if (names := [n for n in params if n.startswith("sam.image_encoder.")])
        }

    def encoder_features(self) -> tuple[int, ...]:
        """Encoder blocks whose outputs any plugin reads, sorted."""
        return tuple(sorted({i for p in self.values() for i in p.encoder_features()}))

    def image_readers(self) -> list[str]:
        """Keys of the plugins that read the image's pixels on the decoder side (``reads_image``)."""
        return [p.key for p in self.values() if p.reads_image]

    def encoder_hook_users(self) -> list[str]:
        """``key (hook)`` for every plugin that changes or sees the inside of the image encoder."""
        return [f"{p.key} ({hook})" for hook in ENCODER_HOOKS for p in self._users.get(hook, [])]

    def hooks_report(self) -> str:
        """Each plugin with the hooks it overrides and the methods that look like misspelt hooks."""
        parts = []
        for key, plugin in self.items():
            hooks = [h for h in OVERRIDABLE if _overrides(plugin, h)]
            near = "".join(
                f"; {m!r} is not a hook (did you mean {h!r}?)" for m, h in near_hooks(plugin).items()
            )
            parts.append(f"{key} ({type(plugin).__name__}): {', '.join(hooks) or 'no hooks'}{near}")
        return "; ".join(parts) or "none"

    def uses(self, hook: str) -> bool:
        """Whether any plugin overrides ``hook``."""
        return bool(self._users.get(hook))


def _init_streams(stack: PluginStack, start: Tensor) -> dict[str, Tensor]:
    """Plugin key -> the CPU generator state its ``setup`` starts from.

    A plugin draws its random initial values from ``start``, the state the build began with, as it
    would if it were the only plugin: another plugin before it (an identity one such as LoRA, whose
    B is zero) or another key order does not change them, so runs with the same seed compare. Plugins
    of one class would then start equal (a second ``ExtraTokens`` a copy of the first, trained alike),
    so all but the first of a class by key start from ``start`` mixed with their key.
    """
    streams: dict[str, Tensor] = {}
    seen: set[type] = set()
    for key in sorted(stack.keys()):
        cls = type(stack[key])
        if cls not in seen:
            seen.add(cls)
            streams[key] = start
            continue
        generator = torch.Generator().manual_seed(stable_seed(start.numpy().tobytes().hex(), key))
        streams[key] = generator.get_state()
    return streams


# names a plugin key may not take: the stack's methods and attributes (nn.Module's included)
_RESERVED_KEYS = frozenset(dir(PluginStack)) | frozenset(vars(nn.Module())) | {"owned", "frozen_sam_keys"}
