"""Checks of the plugin ``class_path`` entries of an experiment and of the command line, made before
LightningCLI parses them: a broken, ambiguous or unknown plugin is refused with one line naming its
distribution, both candidates or the closest registered class.
"""

from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from samflow.experiment_files import ExperimentError

if TYPE_CHECKING:
    from samflow.plugins.registry import PluginInfo


def check_plugins(config_path: Path) -> None:
    """Fail early, naming the distribution, when an experiment uses a plugin that is broken or unknown."""
    config = yaml.safe_load(config_path.read_text()) or {}
    plugins = ((config.get("model") or {}).get("plugins")) if isinstance(config, dict) else None
    if not isinstance(plugins, (dict, type(None))):
        raise ExperimentError(f"{config_path}: model.plugins must be a mapping of name -> plugin.")
    for key, spec in (plugins or {}).items():
        target = spec.get("class_path") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
        if isinstance(spec, dict) and not target and "init_args" not in spec:
            raise ExperimentError(f"{config_path}: model.plugins.{key} needs a class_path.")
        if target:
            check_plugin_target(f"{config_path}: model.plugins.{key}.class_path", str(target))


def check_plugin_target(where: str, target: str) -> None:
    """Refuse a plugin ``class_path`` that is broken (naming its distribution), ambiguous (naming both
    candidates) or unknown (naming the closest).

    A full class path names one class. A short class name is what jsonargparse resolves among the
    plugin classes that loaded: one working match is used (a broken one of the same name does not
    matter), two are ambiguous, a broken one alone is refused with its distribution.
    """
    from samflow.plugins.registry import ambiguous, discover

    registry = discover().all
    exact = [info for info in registry if info.class_path == target]
    if exact:
        _refuse_broken(where, exact[0])
        return
    same_class = {info.class_path: info for info in registry if _short(info) == target}
    working = [info for info in same_class.values() if info.cls is not None]
    if len(working) > 1:
        candidates = " and ".join(info.origin for info in working)
        raise ExperimentError(
            f"{where}: plugin class name {target!r} is ambiguous: {candidates}; "
            "write the full class path of the one you mean."
        )
    if working:
        return
    if same_class:
        _refuse_broken(where, next(iter(same_class.values())))
    registrations = ambiguous(target)
    if registrations:
        raise ExperimentError(
            f"{where}: plugin name {target!r} is ambiguous: it is registered by {registrations}; "
            "write the full class path of the one you mean."
        )
    named = [info for info in registry if info.name == target]
    if named:
        _refuse_broken(where, named[0])
        short = _short(named[0])
        clear = sum(_short(info) == short and info.cls is not None for info in registry) == 1
        raise ExperimentError(
            f"{where} is the plugin name {target!r}; write its class instead: "
            f"class_path: {short if clear else named[0].class_path}"
        )
    if "." in target and _importable(where, target):
        return  # a class outside the registry: jsonargparse checks that it is a SamPlugin
    short_of = {}
    for info in registry:
        for name in (info.name, _short(info), info.class_path):
            short_of[name] = _short(info)
    close = difflib.get_close_matches(target, list(short_of), n=6, cutoff=0.5)
    close += difflib.get_close_matches(target.rsplit(".", 1)[-1], list(short_of), n=6, cutoff=0.5)
    suggestions = list(dict.fromkeys(short_of[name] for name in close))[:3]
    hint = f"Did you mean {', '.join(suggestions)}? " if suggestions else ""
    known = ", ".join(sorted({_short(info) for info in registry})) or "none"
    raise ExperimentError(
        f"{where}: no samflow plugin {target!r}. {hint}Registered plugin classes: {known} "
        "(`samflow plugins` lists them; install the package that provides it)."
    )


def _short(info: PluginInfo) -> str:
    return info.class_path.rsplit(".", 1)[-1]


def _refuse_broken(where: str, info: PluginInfo) -> None:
    if info.cls is None:
        raise ExperimentError(
            f"{where} uses plugin {info.name!r} from distribution {info.distribution!r} {info.version}, "
            f"which failed to load: {info.error}. Reinstall or fix that package, or remove the plugin."
        )


def _importable(where: str, target: str) -> bool:
    """Whether ``module.attr`` exists; a module that exists but fails to import is an error naming it."""
    from samflow.plugins.registry import import_failure

    module, _, attr = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(f"{err.name}.")):
            return False  # no such module: "no samflow plugin" names the registered ones
        reason = import_failure(err)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - the module's own failure (SystemExit too), in one line
        reason = import_failure(err)
    raise ExperimentError(
        f"{where}: module {module!r} of plugin class {target!r} fails to import: {reason}. "
        "Install what it needs or fix the module."
    )


def check_plugin_args(args: list[str]) -> None:
    """``check_plugins`` for every ``--config`` file and every plugin flag on the command line."""
    i = 0
    while i < len(args):
        arg, value = args[i], None
        if "=" in arg and arg.startswith("-"):
            arg, value = arg.split("=", 1)
        elif i + 1 < len(args):
            value = args[i + 1]
        i += 1
        if value is None:
            continue
        if arg in ("-c", "--config"):
            if Path(value).is_file():
                check_plugins(Path(value))
        elif arg == "--model.plugins":
            try:
                plugins = yaml.safe_load(value)
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            if isinstance(plugins, dict):
                for key, spec in plugins.items():
                    target = spec.get("class_path") if isinstance(spec, dict) else spec
                    if isinstance(target, str):
                        check_plugin_target(f"--model.plugins: {key}.class_path", target)
        elif re.fullmatch(r"--model\.plugins\.[^.]+(\.class_path)?", arg) and not value.startswith("-"):
            try:
                spec = yaml.safe_load(value) if value.lstrip().startswith("{") else value
            except yaml.YAMLError:
                continue  # jsonargparse reports it
            target = spec.get("class_path") if isinstance(spec, dict) else spec
            if isinstance(target, str):
                check_plugin_target(arg if isinstance(spec, str) else f"{arg}.class_path", target)
