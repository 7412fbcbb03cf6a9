"""SAM's decomposed relative-position term in the encoder's attention, public and batched.

- ``rel_pos_attention``: the encoder's attention with the term as plain SDPA (augmented query and key,
  no L x L mask), or on the CPU without gradients as a mask in bounded chunks;
- ``decomposed_rel_pos_bias``: the same term as a dense additive mask (for plugins that change it);
- ``rel_pos_table``: SAM's ``get_rel_pos`` table, its index made once and frozen tables kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos as sam_get_rel_pos
from torch import Tensor

from samflow.sam.casts import frozen_copies
from samflow.sam.ops import constant

REL_POS_CHUNK_ELEMENTS = 2**22
"""Logits per block (whole windows, or some heads' queries of one image, per two threads) of
``rel_pos_attention`` on the CPU without gradients (16 MiB in fp32)."""


def rel_pos_table(size: int, rel_pos: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """SAM's ``get_rel_pos(size, size, rel_pos)`` -> (size, size, d): row i, column k holds R[i - k],
    in ``dtype`` (default: ``rel_pos``'s).

    The index is built on ``rel_pos``'s device (SAM builds it on the CPU, so on a GPU every block
    waits for a host copy) and made once per size and device; a table of another length goes through
    SAM's own interpolation. For a frozen ``rel_pos`` the table itself is kept (``frozen_copies``) while
    ``rel_pos`` is unchanged; do not write into it.
    """
    dtype = rel_pos.dtype if dtype is None else dtype
    kept = frozen_copies(
        rel_pos, ("table", size, dtype), (rel_pos,), lambda r: (_rel_pos_table(size, r, dtype),)
    )
    return kept[0] if kept is not None else _rel_pos_table(size, rel_pos, dtype)  # type: ignore[return-value]


def _rel_pos_table(size: int, rel_pos: Tensor, dtype: torch.dtype) -> Tensor:
    if rel_pos.shape[0] != 2 * size - 1:
        return sam_get_rel_pos(size, size, rel_pos).to(dtype)
    device = rel_pos.device

    def index() -> Tensor:
        coords = torch.arange(size, device=device)
        return coords[:, None] - coords[None, :] + (size - 1)

    return rel_pos[constant(("rel_pos_index", size, device), index)].to(dtype)


def decomposed_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM's decomposed relative-position term as an additive attention mask.

    bias[b, n, (i, j), (k, l)] = q[b, n, (i, j)] . R_h[i - k] + q[b, n, (i, j)] . R_w[j - l]
    q: (B, heads, h*w, d) -> bias (B, heads, h*w, h*w).
    """
    h, w = size
    r_h = rel_pos_table(h, rel_pos_h, q.dtype)  # (h, h, d)
    r_w = rel_pos_table(w, rel_pos_w, q.dtype)  # (w, w, d)
    r_q = q.unflatten(2, (h, w))  # (B, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).flatten(2, 3)


def rel_pos_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    size: tuple[int, int],
    scale: float | Tensor,
    chunk_elements: int | None = None,
) -> Tensor:
    """SAM's encoder attention with its decomposed relative-position term, through SDPA without a mask.

    softmax(scale * q k^T + bias) v with bias[(i, j), (k, l)] = q_(i,j) . R_h[i - k] + q_(i,j) . R_w[j - l]
    is plain attention of an augmented query and key:

        q' = [scale * q, q . R_h(i, :), q . R_w(j, :)]      (d + h + w values per query)
        k' = [k,         onehot_h(k),   onehot_w(l)]        (one-hot of the key's row and column)

    since q' . k' = scale * q . k + q . R_h[i - k] + q . R_w[j - l]. No (L, L) tensor is built, and
    SDPA may use its fused kernels (flash on the GPU and the CPU); ``v`` is zero-padded to the
    augmented head dimension because those kernels want equal head dimensions.

    On the CPU without gradients the three-times-wider q' . k' costs more than the term it carries
    (a vit_b global block at 1024 px: 0.61 s against 0.42 s), so there the term is built as a mask for
    ``chunk_elements`` logits at a time (default ``REL_POS_CHUNK_ELEMENTS``; for blocks of one item,
    that much per two threads): whole windows, or some heads' queries against every key, through SDPA's
    fused CPU kernel with d-wide rows. The arithmetic is segment-anything's, the memory bounded by
    the blocks, never (L, L). Both ways equal SAM's attention to rounding.

    q, k, v: (B, heads, h*w, d); ``scale`` a float or a tensor broadcastable to q -> (B, heads, h*w, d).
    """
    h, w = size
    d = q.shape[-1]
    r_h = rel_pos_table(h, rel_pos_h, q.dtype)  # (h, h, d)
    r_w = rel_pos_table(w, rel_pos_w, q.dtype)  # (w, w, d)
    r_q = q.unflatten(2, (h, w))  # (B, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h).flatten(2, 3)  # (B, heads, L, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w).flatten(2, 3)  # (B, heads, L, w)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_pos_h, rel_pos_w, scale) if isinstance(t, Tensor)
    )
    if q.device.type == "cpu" and not needs_grad:
        budget = REL_POS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        return _rel_pos_attention_in_chunks(q, k, v, rel_h, rel_w, scale, budget)
    q_aug = torch.cat([(q * scale).to(q.dtype), rel_h, rel_w], dim=-1)
    onehot = constant(("rel_pos_keys", h, w, k.dtype, k.device), lambda: _key_onehot(h, w, k.dtype, k.device))
    k_aug = torch.cat([k, onehot.expand(*k.shape[:2], -1, -1)], dim=-1)
    v_pad = F.pad(v, (0, h + w))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)
    return out[..., :d]


def _key_onehot(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(h*w, h + w): each key's row and column one-hot, the key side of the augmented attention."""
    # identity matrices by comparison (torch.eye synchronises with the host on CUDA)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    eye_h = (rows[:, None] == rows[None, :]).to(dtype)
    eye_w = (cols[:, None] == cols[None, :]).to(dtype)
    return torch.cat([eye_h[:, None, :].expand(h, w, h), eye_w[None, :, :].expand(h, w, w)], dim=-1).flatten(
        0, 1
    )


def _rel_pos_attention_in_chunks(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, scale: float | Tensor, chunk_elements: int
) -> Tensor:
    """``rel_pos_attention`` in blocks, each with its part of the decomposed term as a mask:
    rel_h (B, heads, L, h) and rel_w (B, heads, L, w) -> bias[(i, j), (k, l)] = rel_h[(i, j), k] + rel_w[(i, j), l].

    A block is whole items of the batch (windows) when one item's (heads, L, L) logits fit
    ``chunk_elements``, else some heads of one item, up to ``QUERY_ROWS`` of their queries against
    all their keys (``_item_blocks``). Whole items keep every query of a window in one SDPA call:
    query blocks cut to the budget (71 of a window's 196 queries at the default) leave SDPA's CPU
    kernel short tiles, about 1.6x slower for a windowed block.
    """
    if isinstance(scale, Tensor):
        q, scale = (q * scale).to(q.dtype), 1.0
    batch, heads, length = q.shape[:3]
    # laid out (B, L, heads, d), as SDPA lays out its own output, so merging the heads is a view
    out = q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
    items = chunk_elements // (heads * length * length)
    if items >= 1:
        blocks = [(slice(start, start + items), slice(None), slice(None)) for start in range(0, batch, items)]
        shape = (min(items, batch), heads, length)
    else:
        group, rows = _item_blocks(heads, length, chunk_elements)
        blocks = [
            (slice(i, i + 1), slice(n, n + group), slice(s, s + rows))
            for i in range(batch)
            for n in range(0, heads, group)
            for s in range(0, length, rows)
        ]
        shape = (1, group, rows)
    # one buffer for every block's mask: a fresh one per block costs page faults as large as the adds
    buffer = rel_h.new_empty(*shape, rel_h.shape[-1], rel_w.shape[-1])
    for part, head, queries in blocks:
        q_part = q[part, head, queries]
        bias = buffer[: q_part.shape[0], : q_part.shape[1], : q_part.shape[2]]
        torch.add(rel_h[part, head, queries, :, None], rel_w[part, head, queries, None, :], out=bias)
        out[part, head, queries] = F.scaled_dot_product_attention(
            q_part, k[part, head], v[part, head], attn_mask=bias.flatten(-2), scale=scale
        )
    return out


QUERY_ROWS = 1024
"""Most query rows per block of one item's attention in ``rel_pos_attention``'s CPU blocks."""


def _item_blocks(heads: int, length: int, chunk_elements: int) -> tuple[int, int]:
    """(heads, query rows) per block of one item whose (heads, L, L) logits exceed the budget.

    Rows first, up to ``QUERY_ROWS`` (SDPA's CPU kernel cuts the queries into tiles of up to 256
    rows and runs the tiles of every head in parallel; longer tiles run faster), then as many heads as
    the budget holds. Against blocks of fewer rows of every head (85 of 4096 rows at the default,
    tiles of 32), a vit_b global block at 1024 px takes 0.24-0.26 s instead of 0.29-0.32 s on two
    cores, with the same bits (other blocks may round differently: 5e-7 at 512 px). The budget is
    ``chunk_elements`` per two threads (``torch.get_num_threads()``), so that more threads get more
    heads per call to work on.
    """
    budget = chunk_elements * max(1, torch.get_num_threads() // 2)
    rows = max(1, min(length, QUERY_ROWS, budget // length))
    group = max(1, min(heads, budget // (rows * length)))
    return group, rows
