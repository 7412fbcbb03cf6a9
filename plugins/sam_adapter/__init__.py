"""SAM-Adapter (Chen et al., 2023): per-block prompts from high-frequency and patch-embedding features."""

from samflow_plugins.sam_adapter.frequency import high_frequency_components
from samflow_plugins.sam_adapter.plugin import SamAdapter, patch_tokens

__all__ = ["SamAdapter", "high_frequency_components", "patch_tokens"]
