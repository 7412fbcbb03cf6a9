"""The plugin contract, the stack that composes plugins, and the entry-point registry."""

from samflow.plugins.base import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    EncodedImages,
    ForwardContext,
    PromptEmbeddings,
    SamplePanel,
    SamPlugin,
)
from samflow.plugins.registry import (
    PluginConfigError,
    PluginError,
    create_plugin,
    discover,
    get_plugin_class,
    list_plugins,
)
from samflow.plugins.stack import PluginConflictError, PluginStack
from samflow.sam.types import current_context

__all__ = [
    "DecoderContext",
    "DecoderFeatures",
    "DecoderState",
    "EncodedImages",
    "ForwardContext",
    "PluginConfigError",
    "PluginConflictError",
    "PluginError",
    "PluginStack",
    "PromptEmbeddings",
    "SamPlugin",
    "SamplePanel",
    "create_plugin",
    "current_context",
    "discover",
    "get_plugin_class",
    "list_plugins",
]
