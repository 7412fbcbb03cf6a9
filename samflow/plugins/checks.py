"""What ``PluginStack`` checks of a plugin: method names close to a hook's, and what a hook returns.

Each failure is a ``PluginError`` naming the plugin's key, class (and distribution, for a third-party
class) and the hook; the result checks compare shapes only, so they cost no device sync.
"""

from __future__ import annotations

import difflib
import inspect

from torch import Tensor

from samflow.plugins.base import SamPlugin
from samflow.plugins.registry import PluginError

#: Hooks a plugin may override (``PluginStack`` calls only the overridden ones).
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
    "sample_panels",
)

#: What a plugin may override besides the hooks; a public method named close to one of these is a typo.
OVERRIDABLE = (*HOOKS, "setup", "sam_modules_to_train", "encoder_features")


def describe(key: str, cls: type) -> str:
    """``model.plugins.<key> (<Class>)``, with ``from <dist> <version>`` for a third-party class."""
    from importlib.metadata import packages_distributions, version

    top = cls.__module__.partition(".")[0]
    dists = [d for d in packages_distributions().get(top, []) if d != "samflow"]
    origin = f" from {dists[0]} {version(dists[0])}" if dists and top != "samflow_plugins" else ""
    return f"model.plugins.{key} ({cls.__name__}{origin})"


def near_hooks(plugin: SamPlugin) -> dict[str, str]:
    """Public methods of ``plugin`` named close to a hook but not one (``block_ouput``) -> that hook."""
    base = set(dir(SamPlugin))
    found = {}
    for name in dir(type(plugin)):
        if not name.startswith("_") and name not in base and callable(getattr(type(plugin), name)):
            close = difflib.get_close_matches(name, OVERRIDABLE, n=1, cutoff=0.85)
            if close:
                found[name] = close[0]
    return found


def check_hook_names(plugin: SamPlugin) -> None:
    """Refuse a method named like a hook and taking its arguments, but not one: it is never called.

    An error, not a warning: a method close to a hook's name whose parameters are the hook's (their
    number, and a name in common) is a typo; a helper that happens to look like that is renamed at no
    cost (``_name``), while a missed hook trains nothing and shows only at the end of the run. Close
    names with other parameters (SamAdapter's ``prompt(i, features)``) are helpers and pass.
    """
    for name, hook in near_hooks(plugin).items():
        params = _parameters(getattr(type(plugin), name))
        expected = _parameters(getattr(SamPlugin, hook))
        if len(params) == len(expected) and set(params) & set(expected):
            raise PluginError(
                f"{describe(plugin.key, type(plugin))}: method {name!r} takes the arguments of the hook "
                f"{hook!r} but is not a hook, so it is never called; rename it to {hook!r} (or to '_{name}' "
                "if it is a helper)."
            )


def _parameters(function: object) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)[1:]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []


def _returned(value: object) -> str:
    return (
        f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(type(value).__name__)
    )


def bad_return(plugin: SamPlugin, hook: str, value: object, expected: str) -> PluginError:
    return PluginError(
        f"Plugin {plugin.key!r} ({type(plugin).__name__}): {hook} returned {_returned(value)}, expected "
        f"{expected}; fix the plugin's {hook.partition('(')[0]}."
    )


def check_tensor(plugin: SamPlugin, hook: str, value: object, shape: tuple[int, ...], what: str) -> Tensor:
    """``value`` if it is a tensor of ``shape`` (a shape comparison only: no device sync)."""
    if not isinstance(value, Tensor) or value.shape != shape:
        raise bad_return(plugin, hook, value, f"a tensor of shape {tuple(shape)} {what}")
    return value
