"""Guiding branch (dense prompt compensation; the figure's "CRM"): image + edge map -> G (C x h x w).

The input is SAM's normalised image, resized to 4h x 4w (256 x 256 for SAM at 1024), with one edge
channel appended; two stride-2 convolutions bring it to the embedding grid:

    Conv(4 -> C/4, k2, s2) -> LN2d -> GELU -> Conv(C/4 -> C, k2, s2) -> LN2d -> GELU -> Conv1x1(C -> C)

Edges are computed with kornia on the model's device, with no gradient (the input is data):

- ``sobel`` (default): the Sobel gradient magnitude of the grey un-normalised image in [0, 1];
- ``canny``: Canny edges (0/1) of the un-normalised image on the 0..255 scale with the reference's
  settings: thresholds 10 / 100, no blur, each colour channel separately, an edge where any channel
  has one (OpenCV's ``cv2.Canny`` on a colour image keeps, per pixel, the channel with the largest
  gradient; kornia measures the gradient as L2, OpenCV by default as L1, so edges near a threshold
  can differ);
- ``reference_edges``: the reference's input to that Canny, i.e. SAM's *normalised* image cast to
  uint8 with C's wrap-around (x -> trunc(x) mod 256, so -0.3 -> 0, -1.5 -> 255, -2.2 -> 254). A
  normalised value lies in about [-2.1, 2.6], so the cast image takes values in {254, 255, 0, 1, 2} and
  its Canny edges are essentially the level lines where a channel crosses its mean minus one
  standard deviation (65, 59 and 46 of 255 for R, G, B), not the image's edges. Kept to reproduce
  the reference numbers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.filters import canny, sobel
from segment_anything.modeling.common import LayerNorm2d
from torch import Tensor, nn

from samflow.sam import upcast

EdgeFilter = Literal["sobel", "canny"]

#: Canny thresholds of the reference (``cv2.Canny(image, 10, 100)``), on the 0..255 scale.
CANNY_LOW, CANNY_HIGH = 10.0, 100.0


def wrap_to_uint8(x: Tensor) -> Tensor:
    """A float -> uint8 cast as C (and numpy's ``astype(np.uint8)`` on x86) does it: trunc(x) mod 256.

    Returned as floats in [0, 255] on ``x``'s device.
    """
    return torch.remainder(torch.trunc(x), 256.0)


def canny_edges(image: Tensor) -> Tensor:
    """Canny edges of an image on the 0..255 scale, (B, 3, H, W) -> (B, 1, H, W) in {0, 1}.

    Each channel separately, thresholds 10 / 100, no Gaussian blur (as ``cv2.Canny``); a pixel is an
    edge if it is one in any channel.
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
        edge_filter: ``sobel`` or ``canny`` on the un-normalised image.
        reference_edges: Canny on the normalised image cast to uint8 with wrap-around, as the reference
            (``edge_filter`` is then ignored).
    """
    rgb = F.interpolate(normalized, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        if reference_edges:
            edges = canny_edges(wrap_to_uint8(rgb))
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
