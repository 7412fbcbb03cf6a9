"""Frozen SAM: building, its public operations, the hooked forward pass and the types it hands out.

Layers: ``samflow.batch`` <- ``samflow.sam`` (this package; knows no plugin) <- ``samflow.plugins``
<- ``samflow.module`` / ``samflow.data`` / ``samflow.cli``.
"""

from samflow.sam.backbones import BACKBONES, Backbone, early_feature
from samflow.sam.build import VARIANTS, CheckpointError, build_sam, count_parameters, freeze, resize_sam
from samflow.sam.cache import EncoderCache, EncoderCacheError
from samflow.sam.conv import ConvTranspose2x2, conv_transpose2x2
from samflow.sam.hooked import HookedSam
from samflow.sam.ops import (
    LayerNorm2d,
    attend,
    dense_pe,
    embed_box,
    embed_points,
    fourier_pe,
    normalize,
    upcast,
    zero_padding,
)
from samflow.sam.rel_pos import decomposed_rel_pos_bias, rel_pos_attention
from samflow.sam.types import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    EncodedImages,
    ForwardContext,
    HookSites,
    PromptEmbeddings,
    SamOutput,
    current_context,
    sam_rule,
)

__all__ = [
    "BACKBONES",
    "VARIANTS",
    "Backbone",
    "CheckpointError",
    "ConvTranspose2x2",
    "DecoderContext",
    "DecoderFeatures",
    "DecoderState",
    "EncodedImages",
    "EncoderCache",
    "EncoderCacheError",
    "ForwardContext",
    "HookSites",
    "HookedSam",
    "LayerNorm2d",
    "PromptEmbeddings",
    "SamOutput",
    "attend",
    "build_sam",
    "conv_transpose2x2",
    "count_parameters",
    "current_context",
    "decomposed_rel_pos_bias",
    "dense_pe",
    "early_feature",
    "embed_box",
    "embed_points",
    "fourier_pe",
    "freeze",
    "normalize",
    "rel_pos_attention",
    "resize_sam",
    "sam_rule",
    "upcast",
    "zero_padding",
]
