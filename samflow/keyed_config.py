"""``KeyedConfigFile``: samflow's ``--config``, where a later file adds to a map of named components
(``model.plugins``) instead of replacing it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, MutableMapping
from copy import deepcopy
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace


def _map_value_type(hint: Any) -> Any:
    """``X`` of ``dict[str, X]`` (or of ``dict[str, X] | None``), else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) in (dict, Mapping, MutableMapping) and len(typing.get_args(option)) == 2:
            return typing.get_args(option)[1]
    return None


def keyed_component_maps(parser: ArgumentParser) -> list[str]:
    """The options of ``parser`` typed ``dict[str, <class>]``: maps of named class_path specs.

    ``model.plugins`` is one. jsonargparse merges a flag into such a map by key
    (``--model.plugins.hq.init_args.lr 1e-4``), but a config file's map replaces the previous one.
    """
    from jsonargparse._typehints import ActionTypeHint

    keys = []
    for action in parser._actions:
        if isinstance(action, ActionTypeHint):
            value_type = _map_value_type(action._typehint)
            if value_type is not None and ActionTypeHint.is_subclass_typehint(value_type):
                keys.append(action.dest)
    return keys


class KeyedConfigFile(ActionConfigFile):
    """``--config``, where a later file adds to a map of named components instead of replacing it.

    ``samflow fit --experiment hq_sam_hqseg --config small.yaml`` with
    ``model: {plugins: {hq: {init_args: {lr: 1.0e-4}}}}`` in ``small.yaml`` changes the learning rate of
    plugin ``hq`` and keeps every other plugin, as the flag ``--model.plugins.hq.init_args.lr 1e-4``
    does. Keys a later file names are merged with the earlier entry by jsonargparse (its class_path and
    init_args stay unless the file changes them); new keys are added; the others stay. Every other
    option is read as jsonargparse reads it (a later file's list or plain mapping replaces the value).
    To replace the whole plugin map, give it as a flag: ``--model.plugins '{name: {class_path: ...}}'``.
    """

    @staticmethod
    def apply_config(parser: ArgumentParser, cfg: Namespace, dest: str, value: Any) -> None:
        before = {key: deepcopy(cfg.get(key)) for key in keyed_component_maps(parser)}
        ActionConfigFile.apply_config(parser, cfg, dest, value)
        for key, previous in before.items():
            current = cfg.get(key)
            if isinstance(previous, dict) and isinstance(current, dict):
                cfg[key] = {**previous, **current}
