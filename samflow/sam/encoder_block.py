"""segment-anything's ViT encoder ``Block`` with the ``attn_logits`` hook site, as ``HookedSam`` runs it.

``vit_block`` is SAM's ``Block`` (windows, attention, MLP, residuals) with plugins' ``attn_logits(i)``;
``attention_heads`` is its attention before the output projection. The decomposed relative-position
term rides in an augmented query and key (``samflow.sam.rel_pos.rel_pos_attention``); only when a
plugin fills ``attn_logits`` is it built as a dense (B, heads, L, L) additive mask. A windowed block
computes SAM's ``qkv`` on the grid's tokens only and gives the padding tokens its bias, their exact value
(``_window_qkv``); its projection skips them too. At inference the residual sums go in place
(``_mlp_residual_in_place``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block
from torch import Tensor, nn

from samflow.sam.ops import has_forward_hooks, window_partition, window_unpartition
from samflow.sam.rel_pos import decomposed_rel_pos_bias, rel_pos_attention
from samflow.sam.types import ForwardContext, HookSites


def _needs_grad(*items: Tensor | nn.Module) -> bool:
    """Whether autograd records anything computed from these tensors and modules' parameters."""
    if not torch.is_grad_enabled():
        return False
    return any(
        item.requires_grad if isinstance(item, Tensor) else any(p.requires_grad for p in item.parameters())
        for item in items
    )


MLP_TOKENS = 1024
"""Tokens per piece of ``_mlp_residual_in_place`` (a vit_b hidden layer of 1024 tokens: 12 MiB in fp32)."""


def _mlp_residual_in_place(block: Block, x: Tensor) -> Tensor:
    """``x + block.mlp(block.norm2(x))`` at inference, written into ``x``.

    For SAM's ``MLPBlock`` with a GELU and plain linear layers, with the GELU in place and, on the CPU,
    in pieces of ``MLP_TOKENS`` tokens: the whole hidden layer (B, h, w, 4C) would be a fresh allocation per block,
    whose page faults cost the CPU about as long as the GELU itself. Every step is per token, so the
    values are the unsplit ones up to float rounding: a matrix product of fewer rows may round
    differently (on this project's CPUs pieces of 512 tokens or more gave the same bits). Any other
    MLP, or one whose layers a plugin replaced (LoRA's, whose dropout draws per image), runs whole.
    """
    mlp = block.mlp
    plain = type(mlp) is MLPBlock and type(mlp.act) is nn.GELU
    if (
        not plain
        or type(mlp.lin1) is not nn.Linear
        or type(mlp.lin2) is not nn.Linear
        or not x.is_contiguous()
    ):
        return x.add_(mlp(block.norm2(x)))
    tokens = x.view(-1, x.shape[-1])
    # pieces on the CPU only: a GPU's caching allocator reuses memory, and small products waste it
    for piece in tokens.split(MLP_TOKENS) if x.device.type == "cpu" else [tokens]:
        hidden = torch.ops.aten.gelu_(mlp.lin1(block.norm2(piece)), approximate=mlp.act.approximate)
        piece.add_(mlp.lin2(hidden))
    return x


def vit_block(i: int, block: Block, x: Tensor, hooks: HookSites, ctx: ForwardContext) -> Tensor:
    """segment-anything's ``Block`` ``i`` on x (B, h, w, C) with the ``attn_logits`` site (``hooks``)."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        size = x.shape[1], x.shape[2]
        qkv = _window_qkv(block.attn.qkv, x, block.window_size)
        x = window_partition(x, block.window_size) if qkv is None else qkv
        # back to the grid before the projection, which then skips the padding tokens (per token)
        heads = attention_heads(i, block.attn, x, hooks, ctx, qkv_done=qkv is not None)
        x = window_unpartition(heads, block.window_size, size)
    else:
        x = attention_heads(i, block.attn, x, hooks, ctx)
    x = block.attn.proj(x)
    # a forward hook may keep an output, a pre-hook an input, that the in-place sums would write into
    # (and the MLP in pieces would call no hook of ``mlp`` itself)
    if _needs_grad(shortcut, x, block.norm2, block.mlp) or has_forward_hooks(
        block.attn.proj, block.norm2, block.mlp
    ):
        x = shortcut + x
        return x + block.mlp(block.norm2(x))
    # inference, or training with a frozen block that no gradient passes through (a decoder-side
    # plugin's step): the residual sums go in place into the attention's output, which no one else holds
    # when no forward hook saw it (a fresh (B, h, w, C) tensor per sum costs page faults on the CPU
    # as large as the sum itself); the same values (the MLP's up to its pieces' rounding)
    return _mlp_residual_in_place(block, x.add_(shortcut))


def _window_qkv(layer: nn.Module, x: Tensor, window: int) -> Tensor | None:
    """The windows of ``layer(x)`` for SAM's plain ``qkv`` Linear on x (B, h, w, C), computed on the
    grid's tokens only: SAM pads the grid with zero tokens before ``qkv``, whose value there is the
    bias, so the padding windows get the bias (exactly what ``qkv`` of a zero token gives) without the
    product (at 1024 px, 4900 tokens per image instead of 4096). None for any other layer (a plugin's,
    or one with hooks, which see the padded windows as in SAM) and for a grid without padding."""
    if (
        type(layer) is not nn.Linear
        or has_forward_hooks(layer)
        or (x.shape[1] % window == 0 and x.shape[2] % window == 0)
    ):
        return None
    return window_partition(layer(x), window, fill=layer.bias)  # no bias: zero padding, as SAM's


def _sam_bias(attn: Attention, q: Tensor, size: tuple[int, int]) -> Tensor | None:
    """SAM's rel-pos term as the dense bias (B, heads, L, L) that ``attn_logits`` plugins receive (None
    without rel-pos), made outside inference mode, whose tensors keep no version counter: its
    ``_version`` tells whether a plugin wrote into it."""
    if not attn.use_rel_pos:
        return None
    with torch.inference_mode(False):
        return decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, size)


def attention_heads(
    i: int, attn: Attention, x: Tensor, hooks: HookSites, ctx: ForwardContext, qkv_done: bool = False
) -> Tensor:
    """Block ``i``'s attention on x (B, h, w, C) (a window batch for a windowed block) with the
    ``attn_logits`` site, before the output projection: SAM's ``Attention.forward`` is
    ``attn.proj`` of this, the heads' outputs side by side (B, h, w, C). ``qkv_done``: x is already
    ``attn.qkv`` of the input (B, h, w, 3C)."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = (x if qkv_done else attn.qkv(x)).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, L, d)
    scale: float | Tensor = attn.scale
    plain = not hooks.uses("attn_logits")  # no plugin sees the logits: no (L, L) tensor at all
    if not plain:  # dense path: plugins receive the rel-pos term as an additive (B, heads, L, L) bias
        sam_bias = _sam_bias(attn, q, (h, w))
        version = None if sam_bias is None else sam_bias._version
        scale, bias = hooks.attn_logits(i, scale, sam_bias, q, ctx)
        # a bias the plugins left as SAM's (the same tensor unwritten, or equal values without a
        # gradient to carry) goes the plain way, so the output is bit for bit the plain path's; one
        # written in place (``bias += ...``) is the plugins' own
        written = sam_bias is not None and sam_bias._version != version
        plain = not written and (
            bias is sam_bias
            or (
                bias is not None
                and sam_bias is not None
                and not bias.requires_grad
                and bias.shape == sam_bias.shape
                and torch.equal(bias, sam_bias)
            )
        )
        del sam_bias
    if plain:
        if attn.use_rel_pos:
            out = rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (h, w), scale)
        else:
            if isinstance(scale, Tensor):
                q, scale = q * scale, 1.0
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2).reshape(b, h, w, -1)
    if isinstance(scale, Tensor):
        q, scale = q * scale, 1.0
    if bias is not None and bias.requires_grad:
        # a trained bias (BA-SAM's slopes) needs the (L, L) probabilities for its gradient anyway, and
        # CUDA's memory-efficient kernel refuses a bias gradient at sequence lengths that are not
        # multiples of 16 (SAM's 14 x 14 windows): plain softmax attention, as SAM computes it
        logits = torch.matmul(q * scale, k.transpose(-2, -1)) + bias
        out = torch.matmul(logits.softmax(dim=-1), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(b, h, w, -1)
