"""F_hfc: the FFT high-pass against NumPy, hand-worked spectra, and the kornia spatial modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samflow_plugins.sam_adapter.frequency import (
    fft_high_pass,
    gaussian_high_pass,
    high_frequency_components,
    laplacian_high_pass,
    low_frequency_square,
)


def numpy_high_pass(x: np.ndarray, rate: float) -> np.ndarray:
    """Independent reference: drop integer frequencies k with -line <= k < line on both axes, no shifts."""
    h, w = x.shape[-2:]
    line = int(np.sqrt(h * w * rate) // 2)
    ky = np.rint(np.fft.fftfreq(h) * h)[:, None]  # integer frequencies in numpy's unshifted order
    kx = np.rint(np.fft.fftfreq(w) * w)[None, :]
    low = (ky >= -line) & (ky < line) & (kx >= -line) & (kx < line)
    spectrum = np.fft.fft2(x) * ~low
    return np.abs(np.fft.ifft2(spectrum).real)


def test_low_frequency_square_matches_the_reference_at_1024():
    # line = sqrt(1024 * 1024 * 0.25) // 2 = 256: a 512 x 512 square, 25 % of the spectrum.
    rows, cols = low_frequency_square(1024, 1024, 0.25)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (256, 768, 256, 768)
    rows, _ = low_frequency_square(128, 128, 0.25)
    assert (rows.start, rows.stop) == (32, 96)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 24, 40), (1, 3, 128, 128)])
@pytest.mark.parametrize("rate", [0.25, 0.1, 0.5])
def test_fft_high_pass_matches_numpy(shape, rate):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2
    ours = fft_high_pass(x, rate)
    ref = numpy_high_pass(x.double().numpy(), rate)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5, rtol=0)


def test_fft_high_pass_hand_worked_spectra():
    n = 32
    r = torch.arange(n, dtype=torch.float32)
    # The checkerboard lives at the Nyquist frequency (-16, -16): outside the square, kept as is.
    checker = ((-1.0) ** (r[:, None] + r[None, :])).expand(1, 3, n, n)
    torch.testing.assert_close(fft_high_pass(checker, 0.25), checker.abs(), atol=1e-6, rtol=0)
    # A constant and a frequency-1 cosine lie inside the square (line 8): removed.
    low = (3.0 + torch.cos(2 * torch.pi * r / n))[None, :].expand(1, 3, n, n)
    torch.testing.assert_close(fft_high_pass(low, 0.25), torch.zeros_like(low), atol=1e-6, rtol=0)
    # Mixed: only the frequency-12 part (outside the square, |k| >= 8) survives.
    high = torch.cos(2 * torch.pi * 12 * r / n)[:, None].expand(1, 3, n, n)
    torch.testing.assert_close(fft_high_pass(low + high, 0.25), high.abs(), atol=1e-5, rtol=0)
    # rate 0 removes nothing (|x|); rate 1 removes the whole spectrum.
    x = torch.randn(1, 3, n, n)
    torch.testing.assert_close(fft_high_pass(x, 0.0), x.abs(), atol=1e-5, rtol=0)
    assert fft_high_pass(x, 1.0).abs().max() < 1e-6


def test_fft_high_pass_is_differentiable():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fft_high_pass(t, 0.25), (x,))


def test_laplacian_mode_equals_a_hand_written_stencil():
    x = torch.randn(2, 3, 16, 20)
    kernel = torch.ones(3, 3)
    kernel[1, 1] = -8.0
    kernel = (kernel / 16.0).expand(3, 1, 3, 3)  # kornia's normalised 3x3 Laplacian
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, groups=3).abs()
    torch.testing.assert_close(laplacian_high_pass(x, 3), ref, atol=1e-6, rtol=0)
    by_mode = high_frequency_components(x, "laplacian", kernel_size=3)
    torch.testing.assert_close(by_mode, ref, atol=1e-6, rtol=0)


def test_gaussian_mode_is_image_minus_blur():
    sigma = 1.5
    x = torch.randn(2, 3, 24, 24)
    size = 2 * 5 + 1  # 2 * ceil(3 * 1.5) + 1
    t = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    pad = size // 2
    kernel = (g[:, None] * g[None, :]).expand(3, 1, -1, -1)
    blurred = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=3)
    torch.testing.assert_close(gaussian_high_pass(x, sigma), (x - blurred).abs(), atol=1e-5, rtol=0)
    # A constant image has no high frequencies in any mode.
    const = torch.full((1, 3, 24, 24), 0.7)
    for mode in ("fft", "laplacian", "gaussian"):
        assert high_frequency_components(const, mode, sigma=sigma).abs().max() < 1e-5


def test_unknown_mode_fails_with_the_choices():
    with pytest.raises(ValueError, match="fft"):
        high_frequency_components(torch.zeros(1, 3, 8, 8), "wavelet")
