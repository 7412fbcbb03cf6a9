"""HQ-SAM's fusion with ConvTranspose2x2 equals the reference's nn.ConvTranspose2d modules, and the
per-row image terms skip the gather only when it would copy them unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samflow.sam.conv import ConvTranspose2x2
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.hq_sam.head import HQHead, rows_of

CONVT_NAMES = [
    "compress_vit_feat.0",
    "compress_vit_feat.3",
    "embedding_encoder.0",
    "embedding_encoder.3",
]


def with_plain_conv_transposes(head: HQHead) -> HQHead:
    """A copy of ``head`` whose transposed convolutions are ``nn.ConvTranspose2d`` (the reference's)."""
    plain = copy.deepcopy(head)
    for module in plain.modules():
        if isinstance(module, ConvTranspose2x2):
            module.__class__ = nn.ConvTranspose2d
    return plain


def test_transposed_convolutions_keep_the_references_names(tiny_sam):
    plugin = HQSam()
    plugin.setup(tiny_sam)
    modules = dict(plugin.named_modules())
    for name in CONVT_NAMES:
        assert type(modules[name]) is ConvTranspose2x2
        assert (modules[name].kernel_size, modules[name].stride) == ((2, 2), (2, 2))
    plain = with_plain_conv_transposes(plugin)
    assert list(plugin.state_dict()) == list(plain.state_dict())
    for name in CONVT_NAMES:
        assert f"{name}.weight" in plugin.state_dict() and f"{name}.bias" in plugin.state_dict()
    fresh = HQSam()
    fresh.setup(tiny_sam)
    fresh.load_state_dict(plain.state_dict())  # a checkpoint of the plain modules loads unchanged
    for name, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


@pytest.mark.parametrize("image_index", [[0, 1], [1, 0], [0, 1, 0], [1]])
def test_fused_features_and_gradients_equal_the_plain_modules(image_index):
    """float64: the fusion's output and the gradients of every parameter and input to 1e-12."""
    torch.manual_seed(0)
    head = HQHead.create(vit_dim=24, dim=16).double()
    plain = with_plain_conv_transposes(head)
    index = torch.tensor(image_index)
    early = torch.randn(2, 5, 3, 24, dtype=torch.float64)  # (B, h, w, C_vit), as the encoder gives it
    embeddings = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    upscaled = torch.randn(len(image_index), 2, 20, 12, dtype=torch.float64)
    results = []
    for module in (head, plain):
        inputs = [t.detach().requires_grad_(True) for t in (early, embeddings, upscaled)]
        fused = module.fused_features(*inputs, index)
        weights = torch.linspace(-1, 1, fused.numel(), dtype=torch.float64).view(fused.shape)
        (fused * weights).sum().backward()
        grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
        results.append((fused, [t.grad for t in inputs], grads))
    (fused, input_grads, grads), (ref, ref_input_grads, ref_grads) = results
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
    for got, want in zip(input_grads, ref_input_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert set(grads) == set(ref_grads) and {f"{n}.weight" for n in CONVT_NAMES} <= set(grads)
    for name, value in ref_grads.items():
        torch.testing.assert_close(
            grads[name], value, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_rows_of_one_row_per_image_is_the_image_terms_themselves():
    per_image = torch.randn(3, 2, 4, 4)
    assert rows_of(per_image, torch.arange(3)) is per_image  # no copy, no scatter in backward
    for index in ([2, 1, 0], [0, 1], [0, 1, 2, 0], [0, 0, 0]):
        rows = rows_of(per_image, torch.tensor(index))
        assert rows is not per_image and torch.equal(rows, per_image[torch.tensor(index)])


def test_rows_of_gathers_off_the_cpu_without_reading_the_index():
    """On another device the index is not compared (that would wait for the device): always the gather."""
    per_image = torch.empty(3, 2, 4, 4, device="meta")
    rows = rows_of(per_image, torch.arange(3, device="meta"))
    assert rows is not per_image and rows.shape == per_image.shape


def test_rows_of_gradient_equals_the_gather():
    per_image = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    (fast,) = torch.autograd.grad(rows_of(per_image, torch.arange(2)), per_image, grad)
    (gathered,) = torch.autograd.grad(per_image[torch.arange(2)], per_image, grad)
    assert torch.equal(fast, gathered)
