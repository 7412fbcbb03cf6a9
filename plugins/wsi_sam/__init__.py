"""WSI-SAM (Liu et al., 2024): two HQ-style heads on high- and low-resolution views of a slide."""

from samflow_plugins.wsi_sam.plugin import WSISam

__all__ = ["WSISam"]
