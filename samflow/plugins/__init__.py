"""The plugin contract, the stack that composes plugins, and the entry-point registry."""

from samflow.plugins.base import DecoderFeatures, DecoderState, ForwardContext, SamPlugin
from samflow.plugins.registry import PluginError, create_plugin, discover, get_plugin_class, list_plugins
from samflow.plugins.stack import PluginConflictError, PluginStack

__all__ = [
    "DecoderFeatures",
    "DecoderState",
    "ForwardContext",
    "PluginConflictError",
    "PluginError",
    "PluginStack",
    "SamPlugin",
    "create_plugin",
    "discover",
    "get_plugin_class",
    "list_plugins",
]
