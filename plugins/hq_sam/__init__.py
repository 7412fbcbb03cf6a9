"""HQ-SAM (Ke et al., "Segment Anything in High Quality", NeurIPS 2023) as a samflow plugin."""

from samflow_plugins.hq_sam.plugin import HQSam

__all__ = ["HQSam"]
