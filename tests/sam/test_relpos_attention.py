"""Encoder attention with SAM's relative positions as plain SDPA (augmented query and key, no mask).

Compared with segment-anything's own ``Block`` / ``Attention`` on shared random weights, forward and
backward in float32, for the tiny and vit_b-shaped configurations, windowed and global blocks, and
grids that need padding windows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from segment_anything.modeling.image_encoder import Block, get_rel_pos

from samflow.batch import SamBatch
from samflow.plugins import SamPlugin
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam, decomposed_rel_pos_bias, rel_pos_attention
from samflow.sam import encoder_block, rel_pos
from samflow.sam.encoder_block import vit_block
from samflow.sam.rel_pos import rel_pos_table

ATOL = 1e-5


def _block(dim: int, heads: int, window: int, grid: int, seed: int) -> Block:
    torch.manual_seed(seed)
    block = Block(
        dim=dim,
        num_heads=heads,
        use_rel_pos=True,
        window_size=window,
        input_size=(grid, grid),
    )
    return randomize(block, seed=seed)


def _grads(out: torch.Tensor, module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    inputs = [x, module.attn.rel_pos_h, module.attn.rel_pos_w, module.attn.qkv.weight]
    return list(torch.autograd.grad(out.square().sum(), inputs))


# (dim, heads, window, grid): tiny (64 channels, 2 heads, window 4) and vit_b (768, 12, window 14);
# grids 6 and 16 leave padding windows (4 -> 8 and 14 -> 28); window 0 is a global block.
CASES = [
    pytest.param(64, 2, 4, 8, id="tiny-window"),
    pytest.param(64, 2, 4, 6, id="tiny-window-padded"),
    pytest.param(64, 2, 0, 8, id="tiny-global"),
    pytest.param(64, 2, 0, 7, id="tiny-global-odd"),
    pytest.param(768, 12, 14, 16, id="vit_b-window-padded"),
    pytest.param(768, 12, 0, 16, id="vit_b-global"),
]


@pytest.mark.parametrize(("dim", "heads", "window", "grid"), CASES)
def test_block_equals_segment_anything_forward_and_backward(dim, heads, window, grid):
    block = _block(dim, heads, window, grid, seed=grid + window)
    block.requires_grad_(True)
    hooked = HookedSam(randomize(build_sam("tiny", seed=0)))
    ctx = hooked.context(SamBatch(image=torch.zeros(2, 3, 8, 8)))
    x = torch.randn(2, grid, grid, dim, requires_grad=True)
    ours = vit_block(0, block, x, hooked.plugins, ctx)
    theirs = block(x)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    for g_ours, g_theirs in zip(_grads(ours, block, x), _grads(theirs, block, x), strict=True):
        # gradients of the tables and weights are float32 sums of thousands of terms, of size up to
        # about 40 here: compared relative to their largest value (2e-6 of it, about 17 float32 ulps;
        # measured differences are at most 5e-7 of it, and they vary with the CPU's kernels)
        scale = float(g_theirs.abs().max())
        torch.testing.assert_close(g_ours, g_theirs, atol=2e-6 * scale, rtol=1e-5)


@pytest.fixture
def two_threads(monkeypatch):
    """The CPU blocks' budget is per two threads: pin the count the block shapes below assume."""
    monkeypatch.setattr(rel_pos.torch, "get_num_threads", lambda: 2)


CHUNKS = {
    "one chunk": None,
    "blocks of 28 rows of a head": 28 * 30,
    "blocks of two heads": 2 * 30 * 30,
    "two items a chunk": 2 * 4 * 30 * 30,
}


@pytest.mark.parametrize("way", ["augmented", *CHUNKS])
def test_op_equals_the_dense_bias_with_a_tensor_scale(way, two_threads):
    """rel_pos_attention == SDPA with the (L, L) bias as a mask, also for a per-head tensor scale,
    by either way: augmented query and key (with gradients) or blocks with a mask (without): blocks of
    whole items (two of three, then the last alone), of one head's queries (28, then the last 2) or
    of two heads' queries."""
    q, k, v = torch.randn(3, 3, 4, 30, 16).unbind(0)
    rel_h, rel_w = torch.randn(9, 16), torch.randn(11, 16)
    scale = torch.tensor([0.3, 0.7, 0.2, 1.1]).view(1, 4, 1, 1)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (5, 6))
    dense = F.scaled_dot_product_attention(q * scale, k, v, attn_mask=bias, scale=1.0)
    if way == "augmented":
        ours = rel_pos_attention(q.requires_grad_(True), k, v, rel_h, rel_w, (5, 6), scale).detach()
    else:
        with torch.no_grad():
            ours = rel_pos_attention(q, k, v, rel_h, rel_w, (5, 6), scale, chunk_elements=CHUNKS[way])
    torch.testing.assert_close(ours, dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("blocks", ["rows", "items"])
@pytest.mark.parametrize(("dim", "heads", "window", "grid"), CASES)
def test_block_equals_segment_anything_without_gradients(
    dim, heads, window, grid, blocks, monkeypatch, two_threads
):
    """The CPU inference way (blocks with the term as a mask) equals segment-anything's ``Block``, by
    blocks of query rows (global blocks: 3 * heads - 1 rows of one head a block, a shorter last one) and by
    blocks of whole items (up to three: two images' 8 windows as 3, 3, 2; two global grids as one block)."""
    tokens = window * window if window else grid * grid
    chunk = heads * grid * grid * 3 - 1 if blocks == "rows" else 3 * heads * tokens * tokens
    monkeypatch.setattr(rel_pos, "REL_POS_CHUNK_ELEMENTS", chunk)
    block = _block(dim, heads, window, grid, seed=grid + window)
    hooked = HookedSam(randomize(build_sam("tiny", seed=0)))
    ctx = hooked.context(SamBatch(image=torch.zeros(2, 3, 8, 8)))
    x = torch.randn(2, grid, grid, dim)
    with torch.no_grad():
        torch.testing.assert_close(vit_block(0, block, x, hooked.plugins, ctx), block(x), atol=ATOL, rtol=0)


def _sdpa_calls(monkeypatch) -> list[tuple[torch.Tensor | None, int, int, int]]:
    """Record (mask, query rows, q head dim, v head dim) of every SDPA call."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((attn_mask, q.shape[-2], q.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_no_mask_reaches_sdpa_without_logit_plugins(tiny_sam, monkeypatch):
    """With gradients (and on the GPU) the encoder calls SDPA with no mask and the augmented head
    size d + h + w."""
    calls = _sdpa_calls(monkeypatch)
    hooked = HookedSam(tiny_sam)
    hooked.encode(hooked.context(SamBatch(image=torch.rand(1, 3, 128, 128).requires_grad_(True))))
    # tiny: head dim 32; windowed blocks 4 x 4 (32 + 8), global blocks 8 x 8 (32 + 16)
    assert [(m is None, dq, dv) for m, _, dq, dv in calls] == [(True, 40, 40), (True, 48, 48)] * 2


def test_cpu_inference_masks_are_bounded_by_the_chunk(tiny_sam, monkeypatch, two_threads):
    """On the CPU without gradients: SAM's head dim, the term as a mask of at most the chunk's
    logits (whole windows, or query blocks of one image's heads against their keys), never (L, L)
    beyond it, and the same embeddings."""
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    hooked = HookedSam(tiny_sam)
    with torch.enable_grad():  # the augmented way: an input that needs a gradient
        augmented = hooked.encode(hooked.context(SamBatch(image=image.clone().requires_grad_(True))))
    monkeypatch.setattr(rel_pos, "REL_POS_CHUNK_ELEMENTS", 3 * 2 * 16 * 16)  # global: 12 of 64 rows
    calls = _sdpa_calls(monkeypatch)
    with torch.no_grad():
        chunked = hooked.encode(hooked.context(SamBatch(image=image)))
    windowed = [(tuple(m.shape), rows) for m, rows, _, _ in calls if m is not None and m.shape[-1] == 16]
    global_ = [(tuple(m.shape), rows) for m, rows, _, _ in calls if m is not None and m.shape[-1] == 64]
    assert all(m is not None and dq == dv == 32 for m, _, dq, dv in calls)
    # windowed blocks: 2 images x 4 windows of 16 tokens, 2 heads: 3 whole windows a block, the last 2
    assert windowed == [((3, 2, 16, 16), 16), ((3, 2, 16, 16), 16), ((2, 2, 16, 16), 16)] * 2
    # global blocks: each image's heads one by one, 64 tokens in blocks of 1536 // 64 = 24 rows, the last 16
    assert global_ == ([((1, 1, 24, 64), 24)] * 2 + [((1, 1, 16, 64), 16)]) * 2 * 2 * 2
    torch.testing.assert_close(chunked.embeddings, augmented.embeddings.detach(), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("heads", "length", "chunk", "threads", "expected"),
    [
        (12, 4096, 2**22, 2, (1, 1024)),  # vit_b global block at 1024 px: one head, 1024 rows a call
        (12, 4096, 2**22, 16, (8, 1024)),  # more threads: more heads a call (the budget is per 2 threads)
        (12, 4096, 2**22, 1, (1, 1024)),
        (12, 1024, 2**22, 2, (4, 1024)),  # 512 px: every query of 4 heads
        (2, 64, 1536, 2, (1, 24)),  # a budget under a head's logits: rows of one head
        (2, 64, 10, 2, (1, 1)),  # a budget under a row: still one row at a time
    ],
)
def test_item_blocks_fill_the_budget_rows_first(heads, length, chunk, threads, expected, monkeypatch):
    monkeypatch.setattr(rel_pos.torch, "get_num_threads", lambda: threads)
    assert rel_pos._item_blocks(heads, length, chunk) == expected


class _ShiftLogits(SamPlugin):
    """Fills ``attn_logits``: receives SAM's dense (L, L) bias and adds ``shift`` to every logit."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.shapes: list[tuple[int, ...]] = []

    def attn_logits(self, i, scale, bias, q, ctx):
        self.shapes.append(tuple(bias.shape))
        return scale, bias if self.shift == 0 else bias + self.shift


def _embeddings(sam, plugins=None):
    hooked = HookedSam(sam, PluginStack(plugins) if plugins else None)
    with torch.no_grad():
        return hooked.encode(
            hooked.context(SamBatch(image=torch.rand(2, 3, 128, 128, generator=GEN)))
        ).embeddings


GEN = torch.Generator()


def test_logit_plugins_get_the_dense_bias_and_the_dense_path(tiny_sam):
    """A shift of every logit changes no softmax: the dense path equals the plain one to rounding."""
    GEN.manual_seed(0)
    plain = _embeddings(tiny_sam)
    plugin = _ShiftLogits(3.0)
    GEN.manual_seed(0)
    dense = _embeddings(tiny_sam, {"shift": plugin})
    # windowed blocks (2 images x 4 windows, 16 tokens), global blocks (2 images, 64 tokens)
    assert plugin.shapes == [(8, 2, 16, 16), (2, 2, 64, 64)] * 2
    torch.testing.assert_close(dense, plain, atol=ATOL, rtol=0)
    assert not torch.equal(dense, plain)  # it did run the other way


def test_a_bias_left_as_sams_is_bitwise_the_plain_path(tiny_sam):
    GEN.manual_seed(0)
    plain = _embeddings(tiny_sam)
    GEN.manual_seed(0)
    same = _embeddings(tiny_sam, {"same": _ShiftLogits(0.0)})
    assert torch.equal(same, plain)


class _PenaliseKeys(SamPlugin):
    """Adds a fixed random penalty per key to SAM's bias, in place (``bias += ...``) or as a new tensor."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place

    def attn_logits(self, i, scale, bias, q, ctx):
        penalty = 4 * torch.randn(
            bias.shape[-1], generator=torch.Generator().manual_seed(i), dtype=bias.dtype
        )
        if self.in_place:
            bias += penalty
            return scale, bias
        return scale, bias + penalty


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_bias_written_in_place_is_the_plugins_not_sams(tiny_sam, mode):
    """``bias += penalty`` changes the attention exactly as ``bias + penalty`` does: the same tensor
    returned after a write is not "left as SAM's", also under inference mode (no version counters)."""
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    grad_off = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def embeddings(plugins):
        hooked = HookedSam(tiny_sam, PluginStack(plugins) if plugins else None)
        with grad_off():
            return hooked.encode(hooked.context(SamBatch(image=image))).embeddings.clone()

    in_place = embeddings({"p": _PenaliseKeys(in_place=True)})
    assert torch.equal(in_place, embeddings({"p": _PenaliseKeys(in_place=False)}))
    assert (in_place - embeddings(None)).abs().max() > 0.1


def test_bf16_autocast_keeps_dtypes_consistent(tiny_sam):
    """Under CPU bf16 autocast the augmented path runs and stays close to float32."""
    hooked = HookedSam(tiny_sam)
    batch = SamBatch(image=torch.rand(1, 3, 128, 128))
    with torch.no_grad():
        ref = hooked.encode(hooked.context(batch)).embeddings
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = hooked.encode(hooked.context(batch)).embeddings
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.1)


class _LearnedShift(SamPlugin):
    """A trained bias: SAM's term plus a learnable per-head shift of the logits near the diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.5, -0.25]))

    def attn_logits(self, i, scale, bias, q, ctx):
        eye = torch.eye(bias.shape[-1], dtype=bias.dtype)
        return scale, bias + self.weight.view(1, -1, 1, 1) * eye


def test_a_trained_bias_runs_without_a_mask_gradient_in_sdpa(tiny_sam, monkeypatch):
    """A bias that needs a gradient (BA-SAM's slopes) is never handed to SDPA as a mask (CUDA's
    memory-efficient kernel refuses that gradient for 14 x 14 windows: "LSE is not correctly
    aligned"); its softmax attention equals SDPA with the bias as mask, forward and backward."""
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))

    def run():
        plugin = _LearnedShift()
        hooked = HookedSam(tiny_sam, PluginStack({"shift": plugin}))
        out = hooked.encode(hooked.context(SamBatch(image=image))).embeddings
        (grad,) = torch.autograd.grad(out.square().sum(), plugin.weight)
        return out.detach(), grad

    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ours, ours_grad = run()
    assert not any(m is not None and m.requires_grad for m in masks)

    # the reference: every encoder attention through SDPA with the bias as its mask
    def reference_attention(i, attn, x, hooks, ctx, qkv_done=False):
        b, h, w, _ = x.shape
        qkv = (x if qkv_done else attn.qkv(x)).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w))
        scale, bias = hooks.attn_logits(i, attn.scale, bias, q, ctx)
        out = sdpa(q, k, v, attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(b, h, w, -1)

    monkeypatch.setattr(encoder_block, "attention_heads", reference_attention)
    theirs, theirs_grad = run()
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-4, rtol=1e-5)
    assert ours_grad.abs().min() > 0


@pytest.mark.parametrize(("size", "length"), [(4, 7), (14, 27), (64, 127), (4, 27)])
def test_rel_pos_table_equals_segment_anythings_get_rel_pos(size, length):
    """Built on the table's device (no host copy on a GPU), equal to SAM's; other lengths interpolate."""
    table = torch.randn(length, 8, generator=torch.Generator().manual_seed(size))
    assert torch.equal(rel_pos_table(size, table), get_rel_pos(size, size, table))
