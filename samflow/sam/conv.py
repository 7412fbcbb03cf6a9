"""2x2, stride-2 transposed convolutions as one matrix product (faster on the CPU, same parameters).

A transposed convolution with kernel 2 and stride 2 has no overlap between output windows: each input
pixel x[b, :, i, j] (Cin) writes its own 2x2 output block

    y[b, o, 2i + p, 2j + q] = bias[o] + sum_c x[b, c, i, j] * weight[c, o, p, q]

so the whole layer is (B*H*W, Cin) @ (Cin, 4*Cout) followed by a rearrangement of the rows' 2x2
blocks into the (2H, 2W) grid. On the CPU, PyTorch's oneDNN transposed convolution takes 1.8-2.7x as
long as that in the backward pass (HQ-SAM's four at 1024 px, one thread; its ConvT(768->256) on
(2, 768, 64, 64): 228 ms against 106 ms, the weight gradient being one (768 x 8192) @ (8192 x 1024)
product). Not everywhere: a frozen ConvT(64->32) on (2, 64, 128, 128) that only passes the input
gradient on is faster through oneDNN (11 ms against 18), so modules opt in by using the class.
``ConvTranspose2x2`` computes the product and lets autograd differentiate it. Equal to
``nn.ConvTranspose2d`` to float rounding (the sums run in another order), forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_transpose2x2(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for a (Cin, Cout, 2, 2) ``weight`` as one matrix product.

    x (B, Cin, H, W) -> (B, Cout, 2H, 2W), returned in channels-last memory (a (B, 2H, 2W, Cout)
    tensor permuted), the layout ``LayerNorm2d`` reads without a copy. A channels-last ``x`` (e.g.
    ``LayerNorm2d``'s output, or encoder features (B, H, W, Cin) permuted) is used without a copy.
    Autograd differentiates it (its backward: the weight gradient is one product, the input gradient
    another); under autocast the product runs in the autocast dtype.
    """
    if weight.dim() != 4 or weight.shape[2:] != (2, 2):
        raise ValueError(f"conv_transpose2x2: weight must be (Cin, Cout, 2, 2), got {tuple(weight.shape)}.")
    if x.dim() != 4 or x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"conv_transpose2x2: x must be (B, {weight.shape[0]}, H, W) for a weight of "
            f"{tuple(weight.shape)}, got {tuple(x.shape)}."
        )
    if bias is not None and bias.shape != (weight.shape[1],):
        raise ValueError(
            f"conv_transpose2x2: bias must be ({weight.shape[1]},) for a weight of {tuple(weight.shape)}, "
            f"got {tuple(bias.shape)}."
        )
    b, cin, h, w = x.shape
    cout = weight.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, cin)  # one row per input pixel
    cols = weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)  # columns ordered (p, q, o)
    blocks = rows @ cols if bias is None else torch.addmm(bias.repeat(4), rows, cols)
    # (b, i, j, p, q, o) -> (b, i, p, j, q, o) = (b, 2i + p, 2j + q, o)
    out = blocks.view(b, h, w, 2, 2, cout).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)
    return out.permute(0, 3, 1, 2)


class ConvTranspose2x2(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose forward is ``conv_transpose2x2`` when it can be: kernel 2, stride 2,
    no padding, output padding, dilation or groups, a batched (B, Cin, H, W) input on the CPU and no
    ``output_size``. Anything else (other devices, unbatched input, tracing for ONNX export) runs
    ``nn.ConvTranspose2d``'s own forward.

    Same parameters and state-dict keys as ``nn.ConvTranspose2d`` (checkpoints load either way; an
    existing module takes this forward in place with ``module.__class__ = ConvTranspose2x2``).
    """

    def gemm_applies(self, x: Tensor, output_size: list[int] | None) -> bool:
        """Whether ``forward`` computes ``x`` as the matrix product."""
        return (
            output_size is None
            and x.dim() == 4
            and x.device.type == "cpu"
            and tuple(self.kernel_size) == (2, 2)
            and tuple(self.stride) == (2, 2)
            and tuple(self.padding) == (0, 0)
            and tuple(self.output_padding) == (0, 0)
            and tuple(self.dilation) == (1, 1)
            and self.groups == 1
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
        )

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not self.gemm_applies(input, output_size):
            return super().forward(input, output_size)
        return conv_transpose2x2(input, self.weight, self.bias)
