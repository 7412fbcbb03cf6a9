"""Token order of F_pe: the correct NHWC flatten by default, the reference's scramble only on request."""

from __future__ import annotations

import torch
from helpers import random_batch

from samflow.plugins import PluginStack
from samflow.sam import HookedSam
from samflow_plugins.sam_adapter import SamAdapter, patch_tokens


def scrambled_by_index(tokens: torch.Tensor) -> torch.Tensor:
    """Independent construction of the reference's bug: token s, channel c <- flat NHWC element c*h*w + s."""
    b, h, w, c = tokens.shape
    flat = tokens.reshape(b, -1)  # each image's NHWC buffer, row-major
    s = torch.arange(h * w)[:, None]
    ch = torch.arange(c)[None, :]
    return flat[:, ch * h * w + s].reshape(b, h, w, c)  # (B, hw, C) in raster order -> (B, h, w, C)


def test_patch_tokens_correct_and_scrambled_orders():
    tokens = torch.randn(2, 4, 5, 3)
    assert patch_tokens(tokens) is tokens
    scrambled = patch_tokens(tokens, reference_order=True)
    assert torch.equal(scrambled, scrambled_by_index(tokens))
    # Hand-worked: h = w = 2, C = 2, buffer values 0..7 as (r, c, ch); token 1 gets elements 1 and 1 + 4.
    small = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert patch_tokens(small, True).reshape(4, 2).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert small.reshape(4, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_token_order_option_changes_f_pe_and_nothing_else(tiny_sam):
    torch.manual_seed(0)
    correct = SamAdapter()
    scrambled = SamAdapter(reference_token_order=True)
    model = HookedSam(tiny_sam, PluginStack({"a": correct, "b": scrambled}))
    scrambled.load_state_dict(correct.state_dict())  # same weights: only the option differs
    ctx = model.context(random_batch(2, prompt="none"))
    with torch.no_grad():
        normalized = model.encode(ctx).normalized
        tokens = tiny_sam.image_encoder.patch_embed(normalized)  # (B, h, w, C) before pos_embed
        f_hfc = correct.hfc_embed(correct.high_frequency(normalized)).permute(0, 2, 3, 1)
        b, h, w, c = tokens.shape
        plain = correct.pe_embed(tokens.reshape(b, h * w, c)).reshape(b, h, w, -1)
        bugged = correct.pe_embed(scrambled_by_index(tokens))
    assert torch.equal(ctx.state["a"]["features"], f_hfc + plain)
    assert torch.equal(ctx.state["b"]["features"], f_hfc + bugged)
    assert not torch.allclose(plain, bugged, atol=1e-3)
    # Same parameters, same names: checkpoints of one load into the other.
    assert {k: v.shape for k, v in correct.state_dict().items()} == {
        k: v.shape for k, v in scrambled.state_dict().items()
    }
