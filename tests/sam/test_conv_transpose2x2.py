"""ConvTranspose2x2 (samflow.sam.conv): nn.ConvTranspose2d(kernel 2, stride 2) as one matrix product.

Checked against PyTorch's own transposed convolution (``F.conv_transpose2d``), forward and the
gradients of input, weight and bias: float64 to 1e-12, float32 to rounding; odd sizes, batches,
non-contiguous and channels-last inputs; and one output worked by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samflow.sam.conv import ConvTranspose2x2, conv_transpose2x2

# (batch, Cin, Cout, H, W): odd channel counts and sides, a single pixel, batch > 1
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 5), (3, 5, 2, 1, 9), (4, 16, 8, 6, 4), (2, 33, 7, 5, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


def make_input(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, Cin, H, W) in the given memory layout, same values for every layout of one seed."""
    b, cin, h, w = shape
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(b, cin, h, w, generator=gen, dtype=dtype)
    if layout == "contiguous":
        return base
    if layout == "channels_last":
        return base.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a larger tensor
        big = torch.zeros(b, 2 * cin, h, 2 * w, dtype=dtype)
        big[:, ::2, :, ::2] = base
        return big[:, ::2, :, ::2]
    wide = base.transpose(2, 3).contiguous()  # (B, Cin, W, H) stored, viewed as (B, Cin, H, W)
    return wide.transpose(2, 3)


def forward_backward(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Output and the gradients of x, weight, bias for a fixed random output gradient."""
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    out = fn(x, weight, bias)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    out.backward(grad)
    return out, x.grad, weight.grad, None if bias is None else bias.grad


def reference(x, weight, bias):
    return F.conv_transpose2d(x, weight, bias, stride=2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_forward_and_gradients_equal_conv_transpose2d(shape, layout, with_bias, dtype, tol):
    b, cin, cout, h, w = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(cin, cout, 2, 2, generator=gen, dtype=dtype)
    bias = torch.randn(cout, generator=gen, dtype=dtype) if with_bias else None
    x = make_input((b, cin, h, w), layout, dtype)
    got = forward_backward(conv_transpose2x2, x, weight, bias)
    ref = forward_backward(reference, x, weight, bias)
    assert got[0].shape == (b, cout, 2 * h, 2 * w)
    for name, a, r in zip(("output", "input grad", "weight grad", "bias grad"), got, ref, strict=True):
        if r is None:
            assert a is None
            continue
        assert a.dtype == r.dtype and a.shape == r.shape, name
        torch.testing.assert_close(a, r, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_output_worked_by_hand():
    """One input pixel writes its own 2x2 block: y[o, 2i + p, 2j + q] = b[o] + sum_c x[c, i, j] w[c, o, p, q]."""
    x = torch.tensor([[[[1.0, 2.0]], [[10.0, 0.0]]]])  # (1, 2, 1, 2): pixels (1, 10) and (2, 0)
    weight = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, 0.0], [0.0, -1.0]]]])  # (2, 1, 2, 2)
    bias = torch.tensor([100.0])
    expected = torch.tensor(
        [
            [
                [
                    [100 + 1 + 5, 100 + 2 + 0, 100 + 2, 100 + 4],
                    [100 + 3 + 0, 100 + 4 - 10, 100 + 6, 100 + 8],
                ]
            ]
        ]
    )
    assert torch.equal(conv_transpose2x2(x, weight, bias), expected)
    assert torch.equal(conv_transpose2x2(x, weight), expected - 100)


def test_output_is_channels_last():
    """The layout ``LayerNorm2d`` (and the next 2x2 transposed convolution) read without a copy."""
    out = conv_transpose2x2(torch.randn(2, 3, 4, 5), torch.randn(3, 6, 2, 2))
    assert out.shape == (2, 6, 8, 10)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_module_keeps_parameters_and_state_dict_keys():
    torch.manual_seed(3)
    plain = nn.ConvTranspose2d(5, 3, kernel_size=2, stride=2)
    torch.manual_seed(3)
    fast = ConvTranspose2x2(5, 3, kernel_size=2, stride=2)
    assert list(fast.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    for name, value in plain.state_dict().items():  # the same default initialisation
        assert torch.equal(fast.state_dict()[name], value)
    other = ConvTranspose2x2(5, 3, kernel_size=2, stride=2)
    other.load_state_dict(plain.state_dict())  # checkpoints of either load into the other
    x = make_input((2, 5, 3, 7), "strided", torch.float64)
    plain.double(), other.double()
    assert other.gemm_applies(x, None)
    torch.testing.assert_close(other(x), plain(x), atol=1e-12, rtol=1e-12)


def test_module_gradients_equal_conv_transpose2d():
    plain = nn.ConvTranspose2d(7, 4, kernel_size=2, stride=2).double()
    fast = ConvTranspose2x2(7, 4, kernel_size=2, stride=2).double()
    fast.load_state_dict(plain.state_dict())
    x = make_input((3, 7, 5, 3), "channels_last", torch.float64)
    grads = []
    for module in (plain, fast):
        xi = x.detach().requires_grad_(True)
        (module(xi) * torch.arange(4 * 10 * 6, dtype=torch.float64).view(4, 10, 6).cos()).sum().backward()
        grads.append((xi.grad, module.weight.grad, module.bias.grad))
    for a, r in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 2},
        {"kernel_size": 2, "stride": 1},
        {"kernel_size": 2, "stride": 2, "padding": 1},
        {"kernel_size": 2, "stride": 2, "output_padding": 1, "dilation": 2},
        {"kernel_size": 2, "stride": 2, "groups": 2},
    ],
)
def test_other_configurations_run_conv_transpose2d(kwargs):
    module = ConvTranspose2x2(4, 6, **kwargs)
    plain = nn.ConvTranspose2d(4, 6, **kwargs)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert not module.gemm_applies(x, None)
    assert torch.equal(module(x), plain(x))


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.*:FutureWarning")
def test_unbatched_input_output_size_and_tracing_run_conv_transpose2d():
    module = ConvTranspose2x2(4, 6, kernel_size=2, stride=2)
    plain = nn.ConvTranspose2d(4, 6, kernel_size=2, stride=2)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(4, 5, 3)
    assert not module.gemm_applies(x, None)
    assert torch.equal(module(x), plain(x))
    batched = x[None]
    assert module.gemm_applies(batched, None) and not module.gemm_applies(batched, [10, 6])
    assert torch.equal(module(batched, [10, 6]), plain(batched, [10, 6]))
    traced = torch.jit.trace(module, batched)  # ONNX export traces: nn.ConvTranspose2d's own forward
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::_convolution" in kinds and "aten::addmm" not in kinds
    assert torch.equal(traced(batched), plain(batched))


def test_bad_shapes_name_what_is_expected():
    with pytest.raises(ValueError, match=r"weight must be \(Cin, Cout, 2, 2\), got \(3, 4, 3, 3\)"):
        conv_transpose2x2(torch.randn(1, 3, 2, 2), torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\).*got \(1, 5, 2, 2\)"):
        conv_transpose2x2(torch.randn(1, 5, 2, 2), torch.randn(3, 4, 2, 2))


def test_bias_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"bias must be \(4,\).*got \(3,\)"):
        conv_transpose2x2(torch.randn(1, 3, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3))


def test_bf16_autocast_runs_the_product_in_bf16_with_float32_gradients():
    plain = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)
    fast = ConvTranspose2x2(8, 4, kernel_size=2, stride=2)
    fast.load_state_dict(plain.state_dict())
    x = make_input((2, 8, 5, 3), "channels_last", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
    assert out.dtype == torch.bfloat16
    ref = plain(x)
    assert (out.float() - ref).abs().max() < 0.02 * ref.abs().max()  # bf16: ~3 significant digits
    out.float().sum().backward()
    ref.sum().backward()
    for got, want in ((fast.weight.grad, plain.weight.grad), (fast.bias.grad, plain.bias.grad)):
        assert got is not None and want is not None and got.dtype == torch.float32
        assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_no_grad_and_inference_mode_give_the_same_output():
    fast = ConvTranspose2x2(6, 5, kernel_size=2, stride=2).double()
    x = make_input((3, 6, 4, 7), "contiguous", torch.float64)
    with_grad = fast(x)
    with torch.no_grad():
        assert torch.equal(fast(x), with_grad)
    with torch.inference_mode():
        assert torch.equal(fast(x), with_grad)
