"""HQ-SAM's global-local fusion: the HQ-Features that the HQ-Output token's kernel is applied to.

With C the decoder width (256 for SAM), C_vit the encoder width, (h, w) the embedding grid:

    F_early (B, C_vit, h, w)  the output of the first global-attention encoder block (local detail)
    F_emb   (B, C, h, w)      the final image embedding (global context)
    F_up    (N, C/8, 4h, 4w)  SAM's upscaled mask features of each prompt row

    HQ-Features = refine(F_up) + up_vit(F_early) + up_emb(F_emb)          (N, C/8, 4h, 4w)

where ``up_vit`` and ``up_emb`` are two stride-2 transposed convolutions with LayerNorm2d and GELU
between them (4x upsampling; ``ConvTranspose2x2``: ``nn.ConvTranspose2d``'s parameters, computed as one
matrix product on the CPU) and ``refine`` is two 3x3 convolutions with LayerNorm2d and GELU.
The two image terms depend only on the image, so they are computed once per image and shared by
all prompt rows of that image.
"""

from __future__ import annotations

from segment_anything.modeling import ImageEncoderViT
from torch import nn

from samflow.sam import ConvTranspose2x2, LayerNorm2d, early_feature


def first_global_block(encoder: ImageEncoderViT) -> int:
    """Index of the first encoder block with global attention (``window_size == 0``).

    ViT-B: 2, ViT-L: 5, ViT-H: 7 -- HQ-SAM's "early-layer feature after the first global attention block".
    Other image encoders name their own early block (``samflow.sam.early_feature``; MobileSAM: the end
    of TinyViT's stage 1, as light HQ-SAM).
    """
    try:
        return early_feature(encoder)[0]
    except ValueError as err:
        raise ValueError(
            "hq_sam: the SAM image encoder has no global-attention block (every block has window_size > 0); "
            "HQ-SAM fuses the output of the first global-attention block, so it needs one."
        ) from err


def upsample_x4(in_dim: int, mid_dim: int, out_dim: int) -> nn.Sequential:
    """ConvT(in->mid, 2, 2) -> LayerNorm2d -> GELU -> ConvT(mid->out, 2, 2).

    (B, in, h, w) -> (B, out, 4h, 4w). The transposed convolutions are ``ConvTranspose2x2`` (the
    reference's ``nn.ConvTranspose2d`` parameters and state-dict keys; on the CPU one matrix product,
    whose backward takes about half of oneDNN's for ViT-B's (2, 768, 64, 64) early features).
    """
    return nn.Sequential(
        ConvTranspose2x2(in_dim, mid_dim, kernel_size=2, stride=2),
        LayerNorm2d(mid_dim),
        nn.GELU(),
        ConvTranspose2x2(mid_dim, out_dim, kernel_size=2, stride=2),
    )


def refine_3x3(dim: int, mid_dim: int) -> nn.Sequential:
    """Conv3x3(dim->mid) -> LayerNorm2d -> GELU -> Conv3x3(mid->dim): same size in and out."""
    return nn.Sequential(
        nn.Conv2d(dim, mid_dim, kernel_size=3, padding=1),
        LayerNorm2d(mid_dim),
        nn.GELU(),
        nn.Conv2d(mid_dim, dim, kernel_size=3, padding=1),
    )
