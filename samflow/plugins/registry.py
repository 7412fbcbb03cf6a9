"""Plugin discovery through the ``samflow.plugins`` entry-point group.

Built-in plugins and third-party packages register the same way::

    [project.entry-points."samflow.plugins"]
    my_adapter = "my_pkg.plugin:MyAdapter"

A plugin whose import fails is listed as broken with a warning; it fails a run only when the
experiment names it, with an error that names its distribution.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from samflow.plugins.base import SamPlugin

GROUP = "samflow.plugins"


class PluginError(RuntimeError):
    """A plugin is unknown, cannot be loaded, or failed; the message names it."""


class PluginConfigError(PluginError, ValueError):
    """A plugin's options do not fit, or the SAM it is set up on does not fit them; the message names
    the plugin (``Plugin 'key' (name): ...``). Raised from a plugin's ``setup``, it reaches the user as
    it is; any other error of ``setup`` is wrapped in a ``PluginError`` that names the plugin."""


class PluginWarning(UserWarning):
    """A registered plugin is broken, or two distributions register its name (``samflow`` prints it as one line)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin as ``samflow plugins`` lists it."""

    name: str
    target: str  # "module:Class" as registered
    distribution: str
    version: str
    cls: type[SamPlugin] | None
    error: str | None
    clashes: tuple[str, ...] = ()  # the other distributions that register the same name

    @property
    def status(self) -> str:
        if self.error is not None:
            return f"broken: {self.error}"
        if self.clashes:
            return f"ambiguous name (also {', '.join(self.clashes)}): use class_path: {self.class_path}"
        return "ok"

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")

    @property
    def origin(self) -> str:
        """``module.Class (distribution 'dist' 1.0)``, how errors name a candidate."""
        return f"{self.class_path} (distribution {self.distribution!r} {self.version})"


class Plugins(dict[str, PluginInfo]):
    """``discover()``'s answer: the plugins by name, less the names two distributions register;
    ``all`` holds every registration, both of those included."""

    all: tuple[PluginInfo, ...] = ()


class _HeldStderr(io.TextIOBase):
    """``sys.stderr`` while a plugin module is imported: what it writes is held back (argparse's usage
    of a module that exits at import becomes part of its status instead), then, released, every later
    write goes through, so a logging handler the import made on it keeps printing."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.holding = stream, True
        self.held: list[str] = []

    def write(self, text: str) -> int:
        if self.holding:
            self.held.append(text)
            return len(text)
        return int(self.stream.write(text))

    def flush(self) -> None:
        if not self.holding:
            self.stream.flush()

    def release(self) -> str:
        """Stop holding; what was held."""
        self.holding = False
        return "".join(self.held)


def import_failure(err: BaseException, printed: str = "") -> str:
    """Why a module failed to import, in one line: ``exited at import with sys.exit(2)`` for one that
    exits at import (sys.exit() or argparse's parse_args()), with the last line it ``printed`` to
    stderr (``(it printed 'error: ...')``); else ``ImportError: message``."""
    if isinstance(err, SystemExit):
        lines = [line.strip() for line in printed.splitlines() if line.strip()]
        why = f" (it printed {re.sub(r'^[^:]*: error: ', 'error: ', lines[-1])!r})" if lines else ""
        return f"exited at import with sys.exit({err.code!r}){why}"
    return f"{type(err).__name__}: {err}"


def _load(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist.name if ep.dist is not None else "unknown"
    version = ep.dist.version if ep.dist is not None else "?"
    said = _HeldStderr(sys.stderr)
    try:
        with contextlib.redirect_stderr(said):
            cls = ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - a broken third-party plugin must not break unrelated runs
        printed = said.release()
        if not isinstance(err, SystemExit):  # what an exiting module printed is part of its status
            sys.stderr.write(printed)
        return PluginInfo(ep.name, ep.value, dist, version, None, import_failure(err, printed))
    sys.stderr.write(said.release())
    if not (isinstance(cls, type) and issubclass(cls, SamPlugin)):
        return PluginInfo(ep.name, ep.value, dist, version, None, f"{ep.value} is not a SamPlugin subclass")
    return PluginInfo(ep.name, ep.value, dist, version, cls, None)


@cache
def discover() -> Plugins:
    """All registered plugins by name; broken ones are included and warned about once.

    A name that two distributions register (with different classes) is warned about and left out of
    the mapping: ``discover().all`` keeps both, each usable by its class path, and naming it fails
    (``get_plugin_class``) with both candidates.
    """
    loaded: dict[tuple[str, str], PluginInfo] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if (ep.name, ep.value) not in loaded:  # the same class registered twice is one plugin
            loaded[(ep.name, ep.value)] = _load(ep)
    infos = list(loaded.values())
    found = Plugins()
    every = []
    for info in infos:
        clashes = tuple(o.distribution for o in infos if o.name == info.name and o.target != info.target)
        if clashes:
            info = replace(info, clashes=clashes)
        every.append(info)
        if info.error is not None:
            warnings.warn(
                f"samflow plugin {info.name!r} from distribution {info.distribution!r} {info.version} "
                f"is broken and cannot be used: {info.error}",
                PluginWarning,
                stacklevel=2,
            )
        if not clashes:
            found[info.name] = info
        elif all(o.name != info.name for o in every[:-1]):
            candidates = " and ".join(o.origin for o in infos if o.name == info.name)
            warnings.warn(
                f"samflow plugin name {info.name!r} is registered by {candidates}; "
                "it is ambiguous, use the class path of the one you mean.",
                PluginWarning,
                stacklevel=2,
            )
    found.all = tuple(every)
    return found


def ambiguous(name: str) -> str | None:
    """``"a.B (distribution 'x' 1.0) and c.B (distribution 'y' 2.0)"`` when two distributions register ``name``."""
    same = [info for info in discover().all if info.name == name]
    return " and ".join(info.origin for info in same) if len(same) > 1 else None


def get_plugin_class(name: str) -> type[SamPlugin]:
    """The class registered as ``name``; a clear error if it is unknown or broken."""
    plugins = discover()
    candidates = ambiguous(name)
    if candidates:
        raise PluginError(
            f"samflow plugin name {name!r} is ambiguous: it is registered by {candidates}. "
            "Name the one you mean by its class path."
        )
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
    for info in discover().all:
        if info.cls is cls:
            return info.name
    return None


def create_plugin(name: str, **kwargs: Any) -> SamPlugin:
    """Instantiate the plugin registered as ``name`` (timm's ``create_model`` for plugins)."""
    return get_plugin_class(name)(**kwargs)


def list_plugins() -> list[str]:
    """Names of the plugins that load."""
    return [name for name, info in discover().items() if info.cls is not None]
