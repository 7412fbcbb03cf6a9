"""samflow: adapt a frozen Segment Anything Model with plugins, in PyTorch Lightning."""

from samflow.plugins import ForwardContext, SamPlugin, create_plugin, list_plugins
from samflow.sam import HookedSam, SamOutput, build_sam

__version__ = "0.1.0"

__all__ = ["ForwardContext", "HookedSam", "SamOutput", "SamPlugin", "__version__", "build_sam", "create_plugin", "list_plugins"]
