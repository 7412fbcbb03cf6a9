"""A windowed block's ``qkv`` on the grid's tokens only (``encoder_block._window_qkv``) equals SAM's
``qkv`` of the zero-padded windows: the values bit for bit, the gradients to rounding."""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn

from samflow.sam import HookedSam, build_sam
from samflow.batch import SamBatch
from samflow.sam.encoder_block import _window_qkv, vit_block
from samflow.sam.ops import window_partition


def _layer(dim: int = 16, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(dim, 3 * dim)
    nn.init.normal_(layer.bias)  # a bias far from zero, so padding tokens are visibly not zero
    return layer


def test_padding_windows_hold_the_bias_bit_for_bit():
    layer = _layer()
    x = torch.randn(2, 6, 5, 16)  # 6 x 5 grid, windows of 4: padded to 8 x 8
    ours = _window_qkv(layer, x, 4)
    assert ours is not None
    theirs = layer(window_partition(x, 4))  # SAM: pad with zero tokens, then qkv
    assert ours.shape == theirs.shape == (2 * 4, 4, 4, 48)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[-1, -1, -1], layer.bias.detach())  # a padding token's qkv is the bias


def test_gradients_equal_the_padded_products():
    layer = _layer()
    x = torch.randn(2, 6, 5, 16, requires_grad=True)
    weights = torch.randn(8, 4, 4, 48)

    def grads(fn):
        out = fn()
        return torch.autograd.grad((out * weights).sum(), [x, layer.weight, layer.bias])

    ours = grads(lambda: _window_qkv(layer, x, 4))
    theirs = grads(lambda: layer(window_partition(x, 4)))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_other_layers_hooks_and_unpadded_grids_take_sams_way():
    layer = _layer()
    assert _window_qkv(layer, torch.randn(1, 8, 8, 16), 4) is None  # no padding: nothing to save

    class Wrapped(nn.Linear):  # a plugin's layer (e.g. LoRA's) sees the padded windows, as in SAM
        pass

    wrapped = Wrapped(16, 48)
    assert _window_qkv(wrapped, torch.randn(1, 6, 5, 16), 4) is None
    handle = layer.register_forward_hook(lambda module, args, out: None)
    assert _window_qkv(layer, torch.randn(1, 6, 5, 16), 4) is None
    handle.remove()
    assert _window_qkv(layer, torch.randn(1, 6, 5, 16), 4) is not None


def test_a_padded_windowed_block_equals_segment_anythings_forward_and_backward():
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, window_size=4, use_rel_pos=True, input_size=(4, 4))
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    hooked = HookedSam(build_sam("tiny"))
    ctx = hooked.context(SamBatch(image=torch.zeros(2, 3, 8, 8)))
    x = torch.randn(2, 6, 7, 32, requires_grad=True)  # 6 x 7: both directions padded
    ours = vit_block(0, block, x, hooked.plugins, ctx)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    theirs = block(x)
    (grad_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the inference path (in-place residuals) too
        torch.testing.assert_close(vit_block(0, block, x, hooked.plugins, ctx), theirs, atol=1e-5, rtol=0)
