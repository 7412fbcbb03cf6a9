from samflow_plugins.tokens.plugin import ExtraTokens

__all__ = ["ExtraTokens"]
