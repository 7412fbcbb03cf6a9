"""Guiding branch (dense prompt compensation; the figure's "CRM"): image + edge map -> G (C x h x w).

The input is SAM's normalised image, resized bilinearly to 4h x 4w (256 x 256 for SAM at 1024), with
one edge channel appended; two stride-2 convolutions bring it to the embedding grid:

    Conv(4 -> C/4, k2, s2) -> LN2d -> GELU -> Conv(C/4 -> C, k2, s2) -> LN2d -> GELU -> Conv1x1(C -> C)

The edge channel is computed at that 4h x 4w size, with no gradient (the input is data), one of:

- ``sobel`` (default; kornia, on the model's device, the GPU choice): the Sobel gradient magnitude of
  the grey un-normalised image in [0, 1];
- ``canny`` (kornia, on the model's device, the GPU choice): Canny edges (0/1) of the un-normalised
  image on the 0..255 scale with the reference's thresholds 10 / 100 and no blur, each colour channel
  separately, an edge where any channel has one. Close to, not equal to, OpenCV's Canny: kornia
  measures the gradient as L2 and ORs the channels; OpenCV uses L1 and, per pixel, the channel with the
  largest gradient;
- ``reference_edges``: exactly the reference's (``xzz2/pa-sam``, ``utils/misc.py``
  ``generalized_image_grad`` called per image from ``MaskDecoderPA.forward``):

      im = normalised_256[i].cpu().numpy().transpose(1, 2, 0).astype(np.uint8)  # H x W x 3, RGB
      edges = cv2.Canny(im, 10, 100) / 255                                          # {0, 1}

  i.e. OpenCV's Canny (L1 gradient, 3 x 3 Sobel, per pixel the channel with the largest gradient,
  ties decided by channel order) on SAM's *normalised* image, already resized to 4h x 4w, cast to uint8
  with C's wrap-around (x -> trunc(x) mod 256, so -0.3 -> 0, -1.5 -> 255, -2.2 -> 254), channels in
  SAM's RGB order (the order matters where channels tie), the 0/255 result scaled to 0/1. It runs on
  the CPU, one image at a time, and needs OpenCV (the ``opencv`` extra). A normalised value lies in
  about [-2.1, 2.6], so the cast image takes values in {254, 255, 0, 1, 2} and its Canny edges are
  essentially the level lines where a channel crosses its mean minus one standard deviation (65, 59
  and 46 of 255 for R, G, B), not the image's edges. Kept to reproduce the reference numbers.
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.filters import canny, sobel
from torch import Tensor, nn

from samflow.plugins import PluginError
from samflow.sam import LayerNorm2d, upcast

EdgeFilter = Literal["sobel", "canny"]

#: Canny thresholds of the reference (``cv2.Canny(image, 10, 100)``), on the 0..255 scale.
CANNY_LOW, CANNY_HIGH = 10.0, 100.0


class OpenCVMissingError(PluginError, ImportError):
    """``reference_edges`` needs OpenCV, which is not installed (the ``opencv`` extra)."""


def wrap_to_uint8(x: Tensor) -> Tensor:
    """A float -> uint8 cast as C (and numpy's ``astype(np.uint8)`` on x86) does it: trunc(x) mod 256.

    Returned as floats in [0, 255] on ``x``'s device. Written out rather than left to numpy, whose cast of
    out-of-range values is platform-dependent (it saturates on ARM); equal to it on x86.
    """
    return torch.remainder(torch.trunc(x), 256.0)


def import_cv2() -> ModuleType:
    """OpenCV's ``cv2``, or an error naming the extra to install."""
    try:
        import cv2
    except ImportError as err:
        raise OpenCVMissingError(
            "pa_sam: reference_edges=True runs OpenCV's Canny as the reference does, and OpenCV is not "
            "installed; install the opencv extra: pip install 'samflow[opencv]' (opencv-python-headless), "
            "or use the kornia edge_filter (sobel or canny) instead."
        ) from err
    return cv2


def reference_canny(normalized: Tensor) -> Tensor:
    """The reference's edge map of SAM's normalised image, (B, 3, H, W) -> (B, 1, H, W) in {0, 1}.

    Per image, on the CPU: the wrap-around uint8 cast, H x W x 3 in the given (RGB) channel order,
    ``cv2.Canny(im, 10, 100)`` (L1 gradient, 3 x 3 Sobel, per pixel the channel with the largest
    gradient), divided by 255. Returned as float32 on ``normalized``'s device.
    """
    cv2 = import_cv2()
    cast = wrap_to_uint8(normalized.detach().float()).to(torch.uint8)
    images = cast.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    edges = np.stack([cv2.Canny(np.ascontiguousarray(im), CANNY_LOW, CANNY_HIGH) for im in images])
    return (torch.from_numpy(edges).unsqueeze(1).float() / 255.0).to(normalized.device)


def canny_edges(image: Tensor) -> Tensor:
    """Canny edges of an image on the 0..255 scale with kornia, (B, 3, H, W) -> (B, 1, H, W) in {0, 1}.

    Each channel separately, thresholds 10 / 100, no Gaussian blur (as ``cv2.Canny``), L2 gradient; a
    pixel is an edge if it is one in any channel. On the image's device (the GPU choice); close to but
    not equal to ``cv2.Canny`` (see ``reference_canny`` for that).
    """
    b, c, h, w = image.shape
    _, edges = canny(upcast(image.reshape(b * c, 1, h, w)), CANNY_LOW, CANNY_HIGH, kernel_size=1)
    return edges.reshape(b, c, h, w).amax(dim=1, keepdim=True)


def sobel_edges(image: Tensor) -> Tensor:
    """Sobel gradient magnitude of the grey image, (B, 3, H, W) in [0, 1] -> (B, 1, H, W)."""
    return sobel(rgb_to_grayscale(upcast(image)))


def guiding_input(
    image: Tensor,
    normalized: Tensor,
    size: tuple[int, int],
    edge_filter: EdgeFilter = "sobel",
    reference_edges: bool = False,
) -> Tensor:
    """The guiding branch's input: [normalised RGB ; edges] at ``size``, (B, 4, *size).

    Args:
        image: the un-normalised image in [0, 1], (B, 3, S, S).
        normalized: SAM's normalised (and padded) image, (B, 3, S, S).
        size: (4h, 4w).
        edge_filter: ``sobel`` or ``canny`` (kornia, on the device) of the un-normalised image.
        reference_edges: the reference's edges instead (``edge_filter`` is then ignored): OpenCV's Canny
            on the CPU of the resized normalised image (in float32, as the reference) cast to uint8
            with wrap-around (``reference_canny``).
    """
    rgb = F.interpolate(normalized, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        if reference_edges:
            resized = rgb
            if rgb.dtype != torch.float32:
                resized = F.interpolate(normalized.float(), size=size, mode="bilinear", align_corners=False)
            edges = reference_canny(resized)
        else:
            clean = F.interpolate(upcast(image), size=size, mode="bilinear", align_corners=False)
            edges = canny_edges(clean * 255.0) if edge_filter == "canny" else sobel_edges(clean)
    return torch.cat([rgb, edges.to(rgb.dtype)], dim=1)


class GuidingBranch(nn.Module):
    """[RGB ; edges] (B, 4, 4h, 4w) -> guide (B, C, h, w).

    Args:
        dim: SAM's decoder width C (``transformer_dim``).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(4, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, dim, kernel_size=2, stride=2),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.Conv2d(dim, dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
