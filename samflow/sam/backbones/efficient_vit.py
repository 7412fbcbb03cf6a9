"""EfficientSAM's image encoders, ViT-T and ViT-S (Xiong et al., "EfficientSAM: Leveraged Masked Image
Pretraining for Efficient Segment Anything", CVPR 2024).

A clean build of the published architecture; parameter names follow the official
``efficient_sam/efficient_sam_encoder.py``, so the ``image_encoder.*`` part of its checkpoints loads
with strict keys. A plain ViT (Dosovitskiy et al.) at 1024 px:

    patch_embed   16 x 16 conv, stride 16, with bias               (B, h, w, C), h = w = S/16
    pos_embed     (1, 1 + 14^2, C): the 224-px pretraining table with a class token; the class token
                  is dropped and the 14 x 14 grid resized bicubically to h x w (align_corners False)
    12 blocks     x += proj(softmax(q k^T / sqrt(d)) v) over all h*w tokens after LayerNorm (eps 1e-6),
                  x += fc2(GELU(fc1(LN(x)))); no windows, no relative positions
    neck          SAM's: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (B, 256, h, w)

ViT-T: C 192, 3 heads; ViT-S: C 384, 6 heads. Every block has global attention with SAM's form
(scale and no bias), so ``attn_logits`` applies to all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samflow.sam.backbones.base import Backbone, attention, sam_neck

if TYPE_CHECKING:
    from samflow.sam.types import ForwardContext, HookSites

PRETRAIN_GRID = 224 // 16  # the position table's grid (ImageNet pretraining at 224 px)


class PatchEmbed(nn.Module):
    """``proj``: a patch x patch convolution with stride patch."""

    def __init__(self, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """``qkv`` packs [q | k | v], each split into heads; ``proj`` mixes the heads."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; run by ``EfficientSamViT.run_block``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))


class EfficientSamViT(Backbone):
    """EfficientSAM's ViT encoder with SAM's neck; see the module docstring.

    Args:
        img_size: input size S (a multiple of 16).
        embed_dim: token width C (192 ViT-T, 384 ViT-S).
        num_heads: attention heads (3 ViT-T, 6 ViT-S).
        depth: number of blocks (12).
        mlp_ratio: MLP hidden width / C.
        out_chans: channels of the neck (SAM's embedding width).
        early_block: the block whose output HQ-SAM-style plugins fuse. Every block is global here, so
            HQ-SAM's rule (the first global block) would give block 0; 2 is the block HQ-SAM reads in
            SAM ViT-B, the encoder of the same depth.
    """

    checkpoint_has_sam_decoder = False  # EfficientSAM's decoder differs from SAM's (README, variants)

    def __init__(
        self,
        img_size: int = 1024,
        embed_dim: int = 192,
        num_heads: int = 3,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        early_block: int = 2,
    ) -> None:
        super().__init__(img_size)
        self.embed_dim = embed_dim
        self.early_block = early_block
        self.patch_embed = PatchEmbed(embed_dim, 16)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + PRETRAIN_GRID**2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.neck = sam_neck(embed_dim, out_chans)

    def block_channels(self, i: int) -> int:
        return self.embed_dim

    def embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)  # (B, h, w, C)

    def add_position(self, tokens: Tensor) -> Tensor:
        h, w = tokens.shape[1:3]
        table = self.pos_embed[:, 1:].unflatten(1, (PRETRAIN_GRID, PRETRAIN_GRID))  # (1, 14, 14, C)
        if (h, w) != (PRETRAIN_GRID, PRETRAIN_GRID):
            table = F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            table = table.permute(0, 2, 3, 1)
        return tokens + table

    def run_block(self, i: int, x: Tensor, hooks: HookSites | None, ctx: ForwardContext | None) -> Tensor:
        block = self.blocks[i]
        assert isinstance(block, Block)
        attn = block.attn
        b, h, w, c = x.shape
        qkv = attn.qkv(block.norm1(x).reshape(b, h * w, c)).view(b, h * w, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, d)
        out = attention(i, q, k, v, attn.scale, None, hooks, ctx)
        x = x + attn.proj(out.transpose(1, 2).reshape(b, h, w, c))
        return x + block.mlp(block.norm2(x))
