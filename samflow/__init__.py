"""samflow: adapt a frozen Segment Anything Model with plugins, in PyTorch Lightning.

The public names below are imported on first use (``samflow.SamBatch``, ``from samflow import
build_sam``): ``import samflow`` and the ``samflow`` command's start import neither torch nor Lightning,
so that ``samflow --help``, ``samflow --version`` and ``samflow experiments`` answer at once and a
command in a SLURM job holds the requeue signal before its imports (``samflow.requeue_hold``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samflow.batch import SamBatch
    from samflow.plugins import (
        DecoderContext,
        ForwardContext,
        PluginStack,
        SamPlugin,
        create_plugin,
        list_plugins,
    )
    from samflow.predictor import Predictor
    from samflow.sam import HookedSam, SamOutput, build_sam

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "DecoderContext": "samflow.plugins",
    "ForwardContext": "samflow.plugins",
    "HookedSam": "samflow.sam",
    "PluginStack": "samflow.plugins",
    "Predictor": "samflow.predictor",
    "SamBatch": "samflow.batch",
    "SamOutput": "samflow.sam",
    "SamPlugin": "samflow.plugins",
    "build_sam": "samflow.sam",
    "create_plugin": "samflow.plugins",
    "list_plugins": "samflow.plugins",
}

__all__ = [
    "DecoderContext",
    "ForwardContext",
    "HookedSam",
    "PluginStack",
    "Predictor",
    "SamBatch",
    "SamOutput",
    "SamPlugin",
    "__version__",
    "build_sam",
    "create_plugin",
    "list_plugins",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; or a submodule (``samflow.plugins`` after
    ``import samflow``, as when this package imported them itself)."""
    module = _PUBLIC.get(name)
    if module is None:
        try:
            return importlib.import_module(f"samflow.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"samflow.{name}":  # a submodule whose own import failed
                raise
        raise AttributeError(f"module 'samflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
