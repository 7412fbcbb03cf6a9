"""Checks of a parsed ``samflow fit|validate|test|predict`` config, before anything is built.

``ConfigError``: a class of the experiment refused its arguments, or two settings cannot run together
(one ``samflow: error:`` line); ``check_plugin_classes``: a plugin entry without its ``class_path``;
``several_processes``: whether Lightning's ``auto`` strategy would start DDP (``SamflowCLI`` then makes
it ``ddp_find_unused_parameters_true``); ``optimizer_into_model``: LightningCLI's ``--optimizer`` and
``--lr_scheduler`` become the module's.
"""

from __future__ import annotations

import difflib
from typing import Any

from jsonargparse import Namespace

from samflow.plugins.base import SamPlugin

__all__ = ["ConfigError", "check_plugin_classes", "optimizer_into_model", "several_processes"]


class ConfigError(ValueError):
    """A class of the experiment (model, plugin, data, trainer) refused its arguments."""


def check_plugin_classes(config: Namespace) -> None:
    """Refuse a plugin entry that is ``SamPlugin`` itself, the base class that does nothing.

    jsonargparse makes an entry with ``init_args`` and no ``class_path`` the base class, so a misspelt
    key (``--model.plugins.tokenz.init_args.lr 1e-4``, or ``tokenz: {init_args: ...}`` in a later
    ``--config``) would add a plugin that does nothing and leave the plugin meant unchanged.
    """
    plugins = config.get("model.plugins") or {}
    bare = [
        key
        for key, spec in plugins.items()
        if isinstance(spec, Namespace)
        and str(spec.get("class_path")) in ("samflow.SamPlugin", f"{SamPlugin.__module__}.SamPlugin")
    ]
    if not bare:
        return
    named = [key for key in plugins if key not in bare]
    close = difflib.get_close_matches(bare[0], named, n=1)
    hint = f"did you mean model.plugins.{close[0]}? " if close else ""
    raise ConfigError(
        f"model.plugins.{bare[0]} has no class_path (only options), so it is not one of the experiment's "
        f"plugins ({', '.join(named) or 'none'}): {hint}To add a plugin, give "
        f"model.plugins.{bare[0]}.class_path."
    )


def optimizer_into_model(config: Namespace) -> None:
    """``--optimizer`` / ``--lr_scheduler`` (LightningCLI's) set ``model.optimizer`` / ``model.scheduler``.

    LightningCLI ignored a ``--lr_scheduler`` given alone and, with ``--optimizer``, replaced the module's
    optimizer by one group of every parameter (frozen SAM included) without the plugins' own ``lr`` /
    ``weight_decay``, and without the check that a resumed optimizer's groups are the plugins'.
    """
    for flag, key in (("optimizer", "model.optimizer"), ("lr_scheduler", "model.scheduler")):
        if config.get(flag):
            config[key], config[flag] = config[flag], None


def several_processes(config: Any) -> bool:
    """Whether Lightning's 'auto' strategy would start DDP (several devices or nodes)."""
    devices = config.get("trainer.devices")
    if isinstance(devices, str):
        devices = (
            int(devices)
            if devices.lstrip("-").isdigit()
            else (devices.count(",") + 1 if "," in devices else 1)
        )
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    return count == -1 or (isinstance(count, int) and count > 1) or (config.get("trainer.num_nodes") or 1) > 1
