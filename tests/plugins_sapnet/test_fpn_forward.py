"""SAPNet's FPN forward against its formulas, written out here, and its initialisation law.

The formulas (mmdetection's FPN as the reference configures it; ``test_fpn_official.py`` checks the
settings): L_i = GN(W_i^lat * C_i) for i = 2..5 (1 × 1 convs, no bias); top-down from L_5:
M_5 = L_5, M_i = L_i + up(M_{i+1}) with nearest upsampling to L_i's size (source row
⌊r · h_in / h_out⌋); P_i = GN(W_i^out ⊛ M_i) (3 × 3, padding 1); P_6 = GN(W^extra ⊛_2 C_5) (3 × 3,
stride 2, padding 1, on the backbone's C_5 itself). GN: per image and group of 8 of the 256 channels,
(x − mean) / sqrt(var + 1e-5) · γ + β. The convs are computed here as unfold + matrix product.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from samflow_plugins.sapnet.fpn import FPN, ConvGN

CHANNELS = (256, 512, 1024, 2048)


def conv(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """A bias-free conv as im2col and a matrix product (padding k // 2)."""
    k = weight.shape[-1]
    b, _, h, w = x.shape
    cols = F.unfold(x, k, padding=k // 2, stride=stride)  # (B, Cin k k, L)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    return (weight.reshape(weight.shape[0], -1) @ cols).reshape(b, -1, ho, wo)


def group_norm(x: Tensor, groups: int, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    b, c, h, w = x.shape
    g = x.reshape(b, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * gamma[None, :, None, None] + beta[None, :, None, None]


def nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    rows = torch.arange(size[0]) * x.shape[-2] // size[0]
    cols = torch.arange(size[1]) * x.shape[-1] // size[1]
    return x[..., rows[:, None], cols[None, :]]


def block(x: Tensor, m: ConvGN, stride: int = 1) -> Tensor:
    return group_norm(conv(x, m.conv.weight, stride), m.norm.num_groups, m.norm.weight, m.norm.bias)


def by_formulas(fpn: FPN, c: list[Tensor]) -> list[Tensor]:
    lat = [block(x, m) for x, m in zip(c, fpn.lateral, strict=True)]
    merged = [lat[-1]]
    for i in range(len(lat) - 2, -1, -1):
        merged.insert(0, lat[i] + nearest(merged[0], tuple(lat[i].shape[-2:])))
    return [block(x, m) for x, m in zip(merged, fpn.output, strict=True)] + [block(c[-1], fpn.extra, 2)]


@pytest.mark.parametrize("side", [64, 100])  # 100: odd map sizes (25, 13, 7, 4), nearest not a plain 2x
def test_forward_is_the_formulas(side):
    torch.manual_seed(0)
    fpn = FPN().double()
    with torch.no_grad():  # GN away from 1/0, so that γ and β are used
        for m in fpn.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    sizes = [side // 4]
    for _ in range(3):
        sizes.append((sizes[-1] + 1) // 2)  # ResNet's stride-2 stages
    c = [torch.randn(2, ch, s, s + 1, dtype=torch.float64) for ch, s in zip(CHANNELS, sizes, strict=True)]
    with torch.no_grad():
        ours = fpn(c)
        want = by_formulas(fpn, c)
    assert len(ours) == 5
    for level, (a, b) in enumerate(zip(ours, want, strict=True)):
        assert a.shape == b.shape, level
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m, lv=level: f"P{lv + 2}: {m}")


def test_init_is_xavier_uniform_and_gn_one_zero():
    torch.manual_seed(0)
    fpn = FPN()
    blocks = [*fpn.lateral, *fpn.output, fpn.extra]
    assert len(blocks) == 9
    for i, m in enumerate(blocks):
        w = m.conv.weight.detach().double()
        cout, cin, kh, kw = w.shape
        bound = math.sqrt(6.0 / (cin * kh * kw + cout * kh * kw))  # xavier uniform, gain 1
        assert m.conv.bias is None, i  # mmcv's ConvModule under a norm: no bias (nothing to zero)
        assert w.abs().max() <= bound * (1 + 1e-6), i
        assert w.abs().max() >= 0.99 * bound, i  # reaches its bound: not a narrower law (kaiming / default)
        std_err = bound / math.sqrt(3) / math.sqrt(w.numel())
        assert abs(w.mean()) < 6 * std_err, i
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02), (
            i
        )  # uniform, not normal of that bound
        assert torch.equal(m.norm.weight, torch.ones(cout)) and torch.equal(m.norm.bias, torch.zeros(cout)), i
        assert m.norm.num_groups == 32 and m.norm.eps == 1e-5, i
