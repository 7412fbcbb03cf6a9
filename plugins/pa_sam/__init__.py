"""PA-SAM: prompt adapter with a guiding branch and hard point mining in SAM's mask decoder."""

from samflow_plugins.pa_sam.plugin import PASam

__all__ = ["PASam"]
