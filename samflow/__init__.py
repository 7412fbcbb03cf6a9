"""samflow: adapt a frozen Segment Anything Model with plugins, in PyTorch Lightning."""

from typing import TYPE_CHECKING, Any

from samflow.batch import SamBatch
from samflow.plugins import (
    DecoderContext,
    ForwardContext,
    PluginStack,
    SamPlugin,
    create_plugin,
    list_plugins,
)
from samflow.sam import HookedSam, SamOutput, build_sam

if TYPE_CHECKING:
    from samflow.predictor import Predictor

__version__ = "0.1.0"

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
    """``samflow.Predictor`` is imported on first use (it pulls in Lightning; ``import samflow`` stays light)."""
    if name == "Predictor":
        from samflow.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'samflow' has no attribute {name!r}")
