"""High-frequency components F_hfc of an image (SAM-Adapter, Chen et al. 2023, Sec. 3.2).

SAM-Adapter feeds each adapter the high-frequency part of the (normalised) input image, which
carries the texture cues that camouflage and shadow detection need. The paper's realisation is an
FFT high-pass; two spatial high-pass filters (kornia) are offered as alternatives.

All functions take and return (B, 3, H, W), run on the input's device and are differentiable.
"""

from __future__ import annotations

import math
from typing import Literal

import kornia.filters
import torch
from torch import Tensor

HfcMode = Literal["fft", "laplacian", "gaussian"]
HFC_MODES: tuple[str, ...] = ("fft", "laplacian", "gaussian")


def low_frequency_square(height: int, width: int, rate: float) -> tuple[slice, slice]:
    """Rows and columns of the centred low-frequency square of an fftshift-ed spectrum.

    line = floor(sqrt(H * W * rate) / 2); the square is rows [H/2 - line, H/2 + line) and columns
    [W/2 - line, W/2 + line), i.e. ``rate`` of the spectrum's area for a square image (the reference's
    convention, including its half-open bounds).
    """
    line = int((height * width * rate) ** 0.5 // 2)
    rows = slice(max(height // 2 - line, 0), height // 2 + line)
    cols = slice(max(width // 2 - line, 0), width // 2 + line)
    return rows, cols


def fft_high_pass(x: Tensor, rate: float = 0.25) -> Tensor:
    """F_hfc = | Re( IFFT( ifftshift( (1 - M_l) * fftshift( FFT(x) ) ) ) ) |, per channel.

    M_l is 1 on the centred low-frequency square that covers ``rate`` of the spectrum (see
    ``low_frequency_square``) and 0 elsewhere. Both transforms use ``norm="forward"``, so with
    ``rate = 0`` the result is |x|.

    Args:
        x: image (B, 3, H, W), real.
        rate: fraction of the spectrum's area removed around the zero frequency, in [0, 1].
    """
    h, w = x.shape[-2:]
    rows, cols = low_frequency_square(h, w, rate)
    keep = torch.ones(h, w, dtype=x.dtype, device=x.device)
    keep[rows, cols] = 0  # (H, W): 1 - M_l
    spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
    spectrum = spectrum * keep
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward").real.abs()


def laplacian_high_pass(x: Tensor, kernel_size: int = 3) -> Tensor:
    """F_hfc = | Laplacian(x) | with kornia's (normalised) Laplacian kernel, reflected borders."""
    return kornia.filters.laplacian(x, kernel_size).abs()


def gaussian_high_pass(x: Tensor, sigma: float = 1.0) -> Tensor:
    """F_hfc = | x - G_sigma * x |: the image minus its Gaussian blur (kernel 2 * ceil(3 sigma) + 1)."""
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = kornia.filters.gaussian_blur2d(x, (size, size), (sigma, sigma))
    return (x - blurred).abs()


def high_frequency_components(
    x: Tensor, mode: str = "fft", rate: float = 0.25, kernel_size: int = 3, sigma: float = 1.0
) -> Tensor:
    """F_hfc of ``x`` (B, 3, H, W) by ``mode``: ``fft`` (the paper), ``laplacian`` or ``gaussian``."""
    if mode == "fft":
        return fft_high_pass(x, rate)
    if mode == "laplacian":
        return laplacian_high_pass(x, kernel_size)
    if mode == "gaussian":
        return gaussian_high_pass(x, sigma)
    raise ValueError(f"Unknown high-frequency mode {mode!r}; choose one of {HFC_MODES}.")
