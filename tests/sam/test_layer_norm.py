"""samflow's LayerNorm2d (F.layer_norm over the channels) against segment-anything's, and its use."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d

from samflow.sam import LayerNorm2d, build_sam
from samflow.sam.ops import fast_layer_norms


def _pair(channels: int, dtype: torch.dtype) -> tuple[SamLayerNorm2d, LayerNorm2d]:
    torch.manual_seed(0)
    ref = SamLayerNorm2d(channels).to(dtype)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = LayerNorm2d(channels).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_equals_segment_anything_forward_and_backward(dtype, tol):
    ref, ours = _pair(32, dtype)
    x = (3 * torch.randn(2, 32, 9, 7, dtype=dtype) + 1).requires_grad_(True)
    upstream = torch.randn(2, 32, 9, 7, dtype=dtype)
    outs, grads = [], []
    for module in (ref, ours):
        out = module(x)
        grads.append(torch.autograd.grad((out * upstream).sum(), [x, module.weight, module.bias]))
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)
    assert outs[1].shape == (2, 32, 9, 7)
    for g_ours, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_ours, g_ref, atol=tol * 10, rtol=tol)


def test_build_sam_swaps_every_layer_norm_and_keeps_the_state_dict():
    sam = build_sam("tiny", seed=0)
    norms = [m for m in sam.modules() if isinstance(m, SamLayerNorm2d)]
    # neck (2), mask-input downscaling (2), output upscaling (1)
    assert len(norms) == 5 and all(type(m) is LayerNorm2d for m in norms)
    plain = build_sam("tiny", seed=0)
    for module in plain.modules():  # back to segment-anything's class, for comparison
        if type(module) is LayerNorm2d:
            module.__class__ = SamLayerNorm2d
    assert list(sam.state_dict()) == list(plain.state_dict())
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(x), plain.image_encoder(x), atol=1e-5, rtol=0)
    assert fast_layer_norms(plain) is plain and all(
        type(m) is LayerNorm2d for m in plain.modules() if isinstance(m, SamLayerNorm2d)
    )
