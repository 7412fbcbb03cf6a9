"""Image encoders other than SAM's ViT, each with SAM's prompt encoder and mask decoder.

``model.sam.variant`` names them like SAM's own variants:

- ``mobile_sam``: MobileSAM's TinyViT-5M (``tiny_vit.py``);
- ``efficient_sam_vitt`` / ``efficient_sam_vits``: EfficientSAM's ViT-T / ViT-S (``efficient_vit.py``).

Each is a ``Backbone`` (``base.py``): ``HookedSam`` runs it block by block with the same hook sites
as SAM's ViT. ``early_feature`` names the block output that HQ-SAM-style plugins fuse, for any encoder.
"""

from __future__ import annotations

from collections.abc import Callable

from segment_anything.modeling import ImageEncoderViT

from samflow.sam.backbones.base import Backbone
from samflow.sam.backbones.efficient_vit import EfficientSamViT
from samflow.sam.backbones.tiny_vit import TinyViT

#: variant name -> builder taking ``img_size``
BACKBONES: dict[str, Callable[[int], Backbone]] = {
    "mobile_sam": lambda img_size: TinyViT(img_size),
    "efficient_sam_vitt": lambda img_size: EfficientSamViT(img_size, embed_dim=192, num_heads=3),
    "efficient_sam_vits": lambda img_size: EfficientSamViT(img_size, embed_dim=384, num_heads=6),
}


def early_feature(encoder: ImageEncoderViT | Backbone) -> tuple[int, int]:
    """(block index, channels) of the early encoder feature HQ-SAM fuses with the final embedding.

    SAM's ViT: the output of the first global-attention block (ViT-B 2, ViT-L 5, ViT-H 7), as HQ-SAM.
    A ``Backbone``: its ``early_block`` (MobileSAM: the end of TinyViT's stage 1, 160 channels, as
    light HQ-SAM; EfficientSAM: block 2).
    """
    if isinstance(encoder, Backbone):
        return encoder.early_block, encoder.block_channels(encoder.early_block)
    for i, block in enumerate(encoder.blocks):
        if block.window_size == 0:
            return i, block.attn.qkv.in_features
    raise ValueError(
        "the SAM image encoder has no global-attention block (every block has window_size > 0), so it has "
        "no early feature in HQ-SAM's sense (the output of the first global-attention block)."
    )


__all__ = ["BACKBONES", "Backbone", "EfficientSamViT", "TinyViT", "early_feature"]
