"""Inference sums a block's residuals in place; nothing a forward hook kept may change, and the
values are those of the out-of-place sums bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from samflow.batch import SamBatch
from samflow.sam import HookedSam, encoder_block


def _encode(hooked: HookedSam, image: torch.Tensor, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return hooked.encode(hooked.context(SamBatch(image=image))).embeddings


def _encode_out_of_place(hooked: HookedSam, image: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The blocks as when a gradient passes through them: sums out of place, the MLP whole."""
    with monkeypatch.context() as patch:
        patch.setattr(encoder_block, "_needs_grad", lambda *items: True)
        return _encode(hooked, image, grad=True)


def test_in_place_sums_equal_the_out_of_place_ones_bit_for_bit(tiny_sam, monkeypatch):
    hooked = HookedSam(tiny_sam)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    out_of_place = _encode_out_of_place(hooked, image, monkeypatch)
    assert torch.equal(_encode(hooked, image, grad=False), out_of_place)
    # grad mode on with nothing that needs a gradient (a decoder-side plugin's training step): in place too
    assert torch.equal(_encode(hooked, image, grad=True), out_of_place)


def test_the_mlp_in_pieces_equals_it_whole(tiny_sam, monkeypatch):
    """Pieces of 7 tokens (a shorter last one): the same per-token values; only the matrix products'
    rounding may differ with the number of rows."""
    hooked = HookedSam(tiny_sam)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    whole = _encode_out_of_place(hooked, image, monkeypatch)
    monkeypatch.setattr(encoder_block, "MLP_TOKENS", 7)
    pieces = _encode(hooked, image, grad=False)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("trained", [None, "mlp.lin1.weight", "norm2.bias", "attn.qkv.bias", "image"])
def test_grad_mode_takes_the_in_place_path_only_when_no_gradient_passes(tiny_sam, monkeypatch, trained):
    """In grad mode, a block whose input and parameters need no gradient sums in place; one that a
    gradient passes through (a trained parameter in it, an input image that needs a gradient) does not,
    and its gradient is the out-of-place one."""
    sam = copy.deepcopy(tiny_sam)
    hooked = HookedSam(sam)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    in_place = []
    real = encoder_block._mlp_residual_in_place
    monkeypatch.setattr(
        encoder_block, "_mlp_residual_in_place", lambda b, x: in_place.append(b) or real(b, x)
    )
    if trained == "image":
        image.requires_grad_(True)
    elif trained is not None:
        sam.image_encoder.blocks[1].get_parameter(trained).requires_grad_(True)
    out = _encode(hooked, image, grad=True)
    blocks = list(sam.image_encoder.blocks)
    if trained is None:
        assert in_place == blocks
        assert not out.requires_grad
        return
    # the trained block and every later one (its output needs a gradient) run out of place
    first = 0 if trained == "image" else 1
    assert in_place == blocks[:first]
    wrt = image if trained == "image" else sam.image_encoder.blocks[1].get_parameter(trained)
    (grad,) = torch.autograd.grad(out.square().sum(), wrt)
    monkeypatch.setattr(encoder_block, "_mlp_residual_in_place", real)
    (expected,) = torch.autograd.grad(_encode_out_of_place(hooked, image, monkeypatch).square().sum(), wrt)
    assert torch.equal(grad, expected)


def _kept_by_hook(hooked: HookedSam, block, where: str, pre: bool) -> tuple[list, torch.Tensor]:
    """Encode with a hook on ``block.<where>`` (or a global one, seeing ``block.mlp`` / ``block.norm2``)
    that keeps what it sees (a pre-hook its input, a forward hook its output), with a copy of it."""
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    watched = block.norm2 if pre else block.mlp

    def keep(module, args, output=None):
        if where != "global" or module is watched:
            seen = args[0] if pre else output
            kept.append((seen, seen.clone()))

    module_hooks = torch.nn.modules.module
    if where == "global":
        register = (
            module_hooks.register_module_forward_pre_hook
            if pre
            else module_hooks.register_module_forward_hook
        )
        handle = register(keep)
    else:
        target = block.get_submodule(where)
        handle = target.register_forward_pre_hook(keep) if pre else target.register_forward_hook(keep)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    try:
        out = _encode(hooked, image, grad=False)
    finally:
        handle.remove()
    assert torch.equal(out, _encode(hooked, image, grad=False))  # the hook changes no result
    return kept, out


@pytest.mark.parametrize("where", ["mlp", "mlp.lin2", "mlp.act", "norm2", "attn.proj", "global"])
def test_outputs_a_forward_hook_kept_are_not_changed(tiny_sam, where):
    kept, _ = _kept_by_hook(HookedSam(tiny_sam), tiny_sam.image_encoder.blocks[1], where, pre=False)
    assert kept and all(torch.equal(output, copy) for output, copy in kept)
    assert len(kept) == 1 and kept[0][0].shape[:-1] == (1, 8, 8)  # seen once, whole (not in pieces)


@pytest.mark.parametrize("where", ["norm2", "mlp", "mlp.lin1", "global"])
def test_inputs_a_forward_pre_hook_kept_are_not_changed(tiny_sam, where):
    """A pre-hook sees a module's input; the in-place sums must not write into what it kept, and a
    pre-hook of ``mlp`` is called (the MLP in pieces would not call ``mlp`` itself)."""
    kept, _ = _kept_by_hook(HookedSam(tiny_sam), tiny_sam.image_encoder.blocks[1], where, pre=True)
    assert kept and all(torch.equal(tensor, copy) for tensor, copy in kept)
