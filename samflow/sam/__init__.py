"""Frozen SAM: building, the hooked forward pass, and its output."""

from samflow.sam.build import VARIANTS, CheckpointError, build_sam, count_parameters, freeze
from samflow.sam.cache import EncoderCache
from samflow.sam.hooked import HookedSam
from samflow.sam.output import SamOutput

__all__ = ["VARIANTS", "CheckpointError", "EncoderCache", "HookedSam", "SamOutput", "build_sam", "count_parameters", "freeze"]
