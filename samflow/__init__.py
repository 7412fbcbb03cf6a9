"""samflow: adapt a frozen Segment Anything Model with plugins, in PyTorch Lightning."""

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

__version__ = "0.1.0"

__all__ = [
    "DecoderContext",
    "ForwardContext",
    "HookedSam",
    "PluginStack",
    "SamBatch",
    "SamOutput",
    "SamPlugin",
    "__version__",
    "build_sam",
    "create_plugin",
    "list_plugins",
]
