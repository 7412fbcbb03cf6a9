"""Inference sums a block's residuals in place; nothing a forward hook kept may change, and the
values are those of the out-of-place sums bit for bit."""

from __future__ import annotations

import pytest
import torch

from samflow.batch import SamBatch
from samflow.sam import HookedSam
from samflow.sam import hooked as hooked_module


def _encode(hooked: HookedSam, image: torch.Tensor, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):  # grad on, nothing requiring it: the same attention, sums out of place
        return hooked.encode(hooked.context(SamBatch(image=image))).embeddings


def test_in_place_sums_equal_the_out_of_place_ones_bit_for_bit(tiny_sam):
    hooked = HookedSam(tiny_sam)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_encode(hooked, image, grad=False), _encode(hooked, image, grad=True))


def test_the_mlp_in_pieces_equals_it_whole(tiny_sam, monkeypatch):
    """Pieces of 7 tokens (a shorter last one): the same per-token values; only the matrix products'
    rounding may differ with the number of rows."""
    hooked = HookedSam(tiny_sam)
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    whole = _encode(hooked, image, grad=True)
    monkeypatch.setattr(hooked_module, "MLP_TOKENS", 7)
    pieces = _encode(hooked, image, grad=False)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["mlp", "mlp.lin2", "mlp.act", "norm2", "attn.proj", "global"])
def test_outputs_a_forward_hook_kept_are_not_changed(tiny_sam, where):
    hooked = HookedSam(tiny_sam)
    block = tiny_sam.image_encoder.blocks[1]
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output):
        if where != "global" or module is block.mlp:
            kept.append((output, output.clone()))

    if where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(keep)
    else:
        handle = block.get_submodule(where).register_forward_hook(keep)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    try:
        hooked_out = _encode(hooked, image, grad=False)
    finally:
        handle.remove()
    assert kept and all(torch.equal(output, copy) for output, copy in kept)
    assert len(kept) == 1 and kept[0][0].shape[:-1] == (1, 8, 8)  # seen once, whole (not in pieces)
    assert torch.equal(hooked_out, _encode(hooked, image, grad=False))  # and the result is the same
