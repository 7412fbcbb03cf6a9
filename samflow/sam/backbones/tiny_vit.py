"""MobileSAM's image encoder: TinyViT-5M at 1024 px with SAM's neck (Zhang et al., "Faster Segment
Anything", 2023; TinyViT: Wu et al., ECCV 2022).

A clean build of the published architecture; parameter names follow the official
``mobile_sam/modeling/tiny_vit_sam.py``, so its checkpoint loads with strict keys. At 1024 px:

    patch_embed   two 3x3 stride-2 Conv-BN (GELU between)          (B, 64, 256, 256)
    stage 0       2 MBConv blocks (inverted residual, BatchNorm)   64 ch, 256 x 256
    merge         PatchMerging (1x1, 3x3 depthwise stride 2, 1x1)  -> 128 ch, 128 x 128
    stage 1       2 TinyViT blocks, 4 heads, window 7              -> merge -> 160 ch, 64 x 64
    stage 2       6 TinyViT blocks, 5 heads, window 14             -> merge (stride 1) -> 320 ch, 64 x 64
    stage 3       2 TinyViT blocks, 10 heads, window 7             320 ch, 64 x 64
    neck          SAM's: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (B, 256, 64, 64)

A TinyViT block: x += proj(softmax(q k^T / sqrt(d) + B) v) in zero-padded windows (LayerNorm on the
padded tokens, as the official code), B[h, i, j] a learned per-head bias of the offset
(|dy|, |dx|) between window positions; x = depthwise 3x3 Conv-BN(x) (no residual); x += MLP(LN(x)).

Hook units: the 12 blocks in order (0-1 MBConv, 2-3 stage 1, 4-9 stage 2, 10-11 stage 3). A stage's
PatchMerging runs at the end of its last block, before ``block_output``, as the official stage's
output includes it; so block 3's output is the 160-channel 64 x 64 feature that light HQ-SAM fuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samflow.sam.backbones.base import Backbone, attention, channels_last, sam_neck
from samflow.sam.ops import window_partition, window_unpartition

if TYPE_CHECKING:
    from samflow.sam.types import ForwardContext, HookSites


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d, named ``c`` and ``bn`` as in TinyViT."""

    def __init__(
        self,
        cin: int,
        cout: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bn_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, ks, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_weight)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    """Two 3x3 stride-2 Conv-BN with GELU between: (B, 3, S, S) -> (B, C, S/4, S/4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2, 3, 2, 1), nn.GELU(), ConvBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: GELU(x + BN(1x1(GELU(BN(dw3x3(GELU(BN(1x1(x))))))))), channels-first."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight=0.0)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 Conv-BN, GELU, depthwise 3x3 Conv-BN (``stride``), GELU, 1x1 Conv-BN; channels-first."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """TinyViT's attention in a window of ``window`` x ``window`` tokens (LayerNorm inside).

    ``qkv`` packs, per head, [q (d) | k (d) | v (d)]; ``attention_biases`` (heads, window^2) holds one
    bias per offset (|dy|, |dx|), numbered dy * window + dx (the official order of first appearance).
    """

    attention_bias_idxs: Tensor

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        pos = torch.arange(window * window)
        dy = (pos[:, None] // window - pos[None, :] // window).abs()
        dx = (pos[:, None] % window - pos[None, :] % window).abs()
        self.register_buffer("attention_bias_idxs", dy * window + dx, persistent=False)  # (L, L)

    def bias(self) -> Tensor:
        """The additive attention bias (1, heads, L, L)."""
        return self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)


class Mlp(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (+ residual), depthwise 3x3 Conv-BN, MLP (+ residual); run by ``TinyViT.run_block``."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        pad = local_conv_size // 2
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, pad, groups=dim)


class Stage(nn.Module):
    """A stage's ``blocks`` and the ``downsample`` that ends it (None for the last stage)."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class TinyViT(Backbone):
    """TinyViT as MobileSAM configures it, with SAM's neck; see the module docstring.

    Args:
        img_size: input size S (a multiple of 16); the embedding grid is S/16.
        embed_dims, depths, num_heads, window_sizes: per stage (stage 0 is convolutional: no heads or
            windows are used there).
        mlp_ratio: MLP hidden width / width.
        mbconv_expand_ratio: MBConv hidden width / width.
        local_conv_size: kernel of the depthwise convolution between attention and MLP.
        out_chans: channels of the neck (SAM's embedding width).
    """

    unused_checkpoint_keys = ("norm_head.", "head.")  # TinyViT's ImageNet classifier, never run by MobileSAM

    def __init__(
        self,
        img_size: int = 1024,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__(img_size)
        self.embed_dims = tuple(embed_dims)
        self.patch_embed = PatchEmbed(embed_dims[0])
        stages: list[Stage] = []
        self.blocks: list[nn.Module] = []  # the hook units, flat over the stages (the same modules)
        self._merges: dict[int, PatchMerging] = {}  # block index -> the PatchMerging that ends its stage
        self._channels: list[int] = []  # output channels per block
        last = len(depths) - 1
        for s, depth in enumerate(depths):
            dim = embed_dims[s]
            blocks: list[nn.Module]
            if s == 0:
                blocks = [MBConv(dim, mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(dim, num_heads[s], window_sizes[s], mlp_ratio, local_conv_size)
                    for _ in range(depth)
                ]
            # MobileSAM keeps the 1/16 grid: the merge into the last stage has stride 1
            merge = PatchMerging(dim, embed_dims[s + 1], 1 if s + 1 == last else 2) if s < last else None
            stages.append(Stage(blocks, merge))
            self.blocks += blocks
            self._channels += [dim] * depth
            if merge is not None:
                self._merges[len(self.blocks) - 1] = merge
                self._channels[-1] = embed_dims[s + 1]
        self.layers = nn.ModuleList(stages)
        self.early_block = depths[0] + depths[1] - 1  # end of stage 1: embed_dims[2] channels at 1/16
        self.neck = sam_neck(embed_dims[-1], out_chans)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def block_channels(self, i: int) -> int:
        return self._channels[i]

    def embed(self, x: Tensor) -> Tensor:
        return self.patch_embed(x).permute(0, 2, 3, 1)  # (B, S/4, S/4, C0)

    def run_block(self, i: int, x: Tensor, hooks: HookSites | None, ctx: ForwardContext | None) -> Tensor:
        block = self.blocks[i]
        if isinstance(block, TinyViTBlock):
            x = self._vit_block(i, block, x, hooks, ctx)
        else:
            x = channels_last(block, x)
        merge = self._merges.get(i)
        return x if merge is None else channels_last(merge, x)

    def _vit_block(
        self, i: int, block: TinyViTBlock, x: Tensor, hooks: HookSites | None, ctx: ForwardContext | None
    ) -> Tensor:
        h, w = x.shape[1:3]
        ws, attn = block.window_size, block.attn
        windows = window_partition(x, ws)  # (B * nW, ws, ws, C), zero padding
        tokens = attn.norm(windows.flatten(1, 2))  # (B', L, C)
        qkv = attn.qkv(tokens).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B', heads, L, 3d)
        q, k, v = qkv.split(attn.key_dim, dim=-1)
        out = attention(i, q, k, v, attn.scale, attn.bias(), hooks, ctx)  # (B', heads, L, d)
        out = attn.proj(out.transpose(1, 2).flatten(2)).view_as(windows)
        x = x + window_unpartition(out, ws, (h, w))
        x = channels_last(block.local_conv, x)
        return x + block.mlp(x)
