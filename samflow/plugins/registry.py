"""Plugin discovery through the ``samflow.plugins`` entry-point group.

Built-in plugins and third-party packages register the same way::

    [project.entry-points."samflow.plugins"]
    my_adapter = "my_pkg.plugin:MyAdapter"

A plugin whose import fails is listed as broken with a warning; it fails a run only when the
experiment names it, with an error that names its distribution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from samflow.plugins.base import SamPlugin

GROUP = "samflow.plugins"


class PluginError(RuntimeError):
    """A plugin is unknown or cannot be loaded."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin as ``samflow plugins`` lists it."""

    name: str
    target: str  # "module:Class" as registered
    distribution: str
    version: str
    cls: type[SamPlugin] | None
    error: str | None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else f"broken: {self.error}"

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")


def _load(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist.name if ep.dist is not None else "unknown"
    version = ep.dist.version if ep.dist is not None else "?"
    try:
        cls = ep.load()
    except Exception as err:  # noqa: BLE001 - a broken third-party plugin must not break unrelated runs
        return PluginInfo(ep.name, ep.value, dist, version, None, f"{type(err).__name__}: {err}")
    if not (isinstance(cls, type) and issubclass(cls, SamPlugin)):
        return PluginInfo(ep.name, ep.value, dist, version, None, f"{ep.value} is not a SamPlugin subclass")
    return PluginInfo(ep.name, ep.value, dist, version, cls, None)


@cache
def discover() -> dict[str, PluginInfo]:
    """All registered plugins by name; broken ones are included and warned about once."""
    found: dict[str, PluginInfo] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        info = _load(ep)
        if ep.name in found and found[ep.name].target != info.target:
            warnings.warn(
                f"samflow plugin {ep.name!r} is registered twice ({found[ep.name].distribution} and "
                f"{info.distribution}); using the one from {info.distribution}.",
                stacklevel=2,
            )
        if info.error is not None:
            warnings.warn(
                f"samflow plugin {info.name!r} from distribution {info.distribution!r} {info.version} "
                f"is broken and cannot be used: {info.error}",
                stacklevel=2,
            )
        found[ep.name] = info
    return found


def get_plugin_class(name: str) -> type[SamPlugin]:
    """The class registered as ``name``; a clear error if it is unknown or broken."""
    plugins = discover()
    if name not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginError(
            f"No samflow plugin named {name!r}. Registered plugins: {known}. "
            "Install the package that provides it, or check the name with `samflow plugins`."
        )
    info = plugins[name]
    if info.cls is None:
        raise PluginError(
            f"samflow plugin {name!r} from distribution {info.distribution!r} {info.version} failed to load: "
            f"{info.error}. Reinstall or fix that package, or remove the plugin from the experiment."
        )
    return info.cls


def plugin_name(cls: type) -> str | None:
    """The registered name of a plugin class, or None if it is not registered."""
    for name, info in discover().items():
        if info.cls is cls:
            return name
    return None


def create_plugin(name: str, **kwargs: Any) -> SamPlugin:
    """Instantiate the plugin registered as ``name`` (timm's ``create_model`` for plugins)."""
    return get_plugin_class(name)(**kwargs)


def list_plugins() -> list[str]:
    """Names of the plugins that load."""
    return [name for name, info in discover().items() if info.cls is not None]
