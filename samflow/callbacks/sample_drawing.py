"""Drawing sample grids: the panels of one ``SampleRow`` and the grid of several rows (``sample_grid``).

The panels and the layout are described in ``samflow/callbacks/samples.py``; the colours and the
layout (``STRIP``-pixel text strips) are the constants below, so tests read known pixels. The pictures
are drawn with torchvision's ``draw_segmentation_masks``, ``draw_bounding_boxes`` and
``draw_keypoints``; the text with PIL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from samflow.plugins import SamplePanel

Colour = tuple[int, int, int]

BOX: Colour = (255, 255, 0)
POSITIVE: Colour = (0, 255, 0)
NEGATIVE: Colour = (255, 0, 0)
MASK_PROMPT: Colour = (0, 255, 255)
GROUND_TRUTH: Colour = (0, 255, 0)
PREDICTION: Colour = (255, 165, 0)
FALSE_POSITIVE: Colour = (255, 0, 0)
FALSE_NEGATIVE: Colour = (0, 0, 255)
PLUGIN_MASK: Colour = (255, 0, 255)
#: Opacity of the ground-truth, prediction and plugin-mask overlays (errors are drawn opaque).
ALPHA = 0.5
#: Height in pixels of the header strip and of the text strip above each row.
STRIP = 14
BASE_PANELS = ("prompt", "ground truth", "prediction", "errors (FP red, FN blue)")


@dataclass
class SampleRow:
    """One prompt row of a validation batch, on the CPU, in the S x S input frame.

    ``image`` (3, S, S) in [0, 1]; ``target`` and ``prob`` (1, S, S); ``size`` (h, w) of the image
    before padding; prompts as in ``SamBatch`` for this row (``points`` (K, 2), ``labels`` (K,), ``box``
    (4,), ``mask_prompt`` (1, S/4, S/4)), None when absent; ``panels`` the plugins' extra panels.
    """

    id: str
    image: Tensor
    target: Tensor
    prob: Tensor
    size: tuple[int, int]
    iou: float
    box: Tensor | None = None
    points: Tensor | None = None
    labels: Tensor | None = None
    mask_prompt: Tensor | None = None
    panels: dict[str, SamplePanel] = field(default_factory=dict)


def row_iou(pred: Tensor, target: Tensor) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = (pred | target).sum().item()
    return 1.0 if union == 0 else (pred & target).sum().item() / union


def to_uint8(image: Tensor) -> Tensor:
    """(3, H, W) in [0, 1] -> uint8."""
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def overlay(image: Tensor, mask: Tensor, colour: Colour, alpha: float = ALPHA) -> Tensor:
    """``mask`` (H, W) bool painted over the uint8 ``image`` (3, H, W) in ``colour``."""
    if not mask.any():
        return image
    return draw_segmentation_masks(image, mask[None], alpha=alpha, colors=colour)


def outline(mask: Tensor) -> Tensor:
    """The pixels of ``mask`` (H, W) bool that touch the background (a 1-pixel border)."""
    m = mask[None, None].float()
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def draw_points(image: Tensor, points: Tensor, labels: Tensor | None, radius: int = 3) -> Tensor:
    """Positive points in green, negative ones in red; slots labelled -1 are not drawn."""
    labels = torch.ones(points.shape[0], dtype=torch.long) if labels is None else labels
    for value, colour in ((1, POSITIVE), (0, NEGATIVE)):
        chosen = points[labels == value]
        if len(chosen):
            image = draw_keypoints(image, chosen[None].float(), colors=colour, radius=radius)
    return image


def prompt_panel(row: SampleRow) -> Tensor:
    """The image with the row's prompt drawn on it (uint8)."""
    picture = to_uint8(row.image)
    side = picture.shape[-1]
    if row.mask_prompt is not None:
        low = row.mask_prompt.float()
        cut = 0.5 if low.min() >= 0 and low.max() <= 1 else 0.0  # {0, 1} or logits
        full = F.interpolate(low[None], size=(side, side), mode="nearest")[0, 0] > cut
        picture = overlay(picture, outline(full), MASK_PROMPT, alpha=1.0)
    if row.box is not None:
        picture = draw_bounding_boxes(picture, row.box[None].float(), colors=BOX, width=2)
    if row.points is not None:
        picture = draw_points(picture, row.points, row.labels)
    return picture


def error_panel(image: Tensor, pred: Tensor, target: Tensor) -> Tensor:
    """False positives red, false negatives blue, opaque, on the image in dimmed grey (uint8)."""
    grey = (to_uint8(image).float().mean(0, keepdim=True) * 0.5).to(torch.uint8).expand(3, -1, -1)
    picture = overlay(grey.contiguous(), pred & ~target, FALSE_POSITIVE, alpha=1.0)
    return overlay(picture, target & ~pred, FALSE_NEGATIVE, alpha=1.0)


def _heat(values: Tensor) -> Tensor:
    """(H, W) in [0, 1] -> (3, H, W) uint8 through matplotlib's inferno colour map (grey without it)."""
    try:
        from matplotlib import colormaps
    except ImportError:
        return to_uint8(values[None].expand(3, -1, -1))
    rgb = colormaps["inferno"](values.clamp(0, 1).numpy())[..., :3]
    return torch.from_numpy((rgb * 255).round().astype(np.uint8)).permute(2, 0, 1)


def plugin_panel(image: Tensor, panel: SamplePanel, row: int) -> Tensor:
    """Row ``row`` of a plugin's ``SamplePanel`` drawn over ``image`` (3, S, S) in [0, 1] (uint8)."""
    side = image.shape[-1]
    values = F.interpolate(panel.values[row : row + 1].float(), size=(side, side), mode="bilinear")[0, 0]
    picture = to_uint8(image)
    if panel.style == "heat":
        picture = (0.3 * picture.float() + 0.7 * _heat(values).float()).round().to(torch.uint8)
    else:
        picture = overlay(picture, values > 0.5, PLUGIN_MASK)
    if panel.points is not None:
        labels = panel.point_labels[row] if panel.point_labels is not None else None
        picture = draw_points(picture, panel.points[row].float(), labels)
    return picture


def panel_names(rows: list[SampleRow]) -> list[str]:
    """The grid's column titles: the base panels, then every plugin panel met, in order."""
    extra = list(dict.fromkeys(name for row in rows for name in row.panels))
    return [*BASE_PANELS, *extra]


def row_panels(row: SampleRow, names: list[str], threshold: float) -> list[Tensor]:
    """The pictures of one grid row (uint8 (3, S, S) each), in the order of ``names``."""
    h, w = row.size
    inside = torch.zeros_like(row.target[0], dtype=torch.bool)
    inside[:h, :w] = True
    pred, target = (row.prob[0] > threshold) & inside, (row.target[0] > 0.5) & inside
    picture = to_uint8(row.image)
    panels = [
        prompt_panel(row),
        overlay(picture, target, GROUND_TRUTH),
        overlay(picture, pred, PREDICTION),
        error_panel(row.image, pred, target),
    ]
    for name in names[len(BASE_PANELS) :]:
        panel = row.panels.get(name)
        panels.append(plugin_panel(row.image, panel, 0) if panel is not None else torch.zeros_like(picture))
    return panels


def _text(canvas: Image.Image, xy: tuple[int, int], text: str, width: int) -> None:
    font = ImageFont.load_default(size=STRIP - 3)
    draw = ImageDraw.Draw(canvas)
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-1]
    draw.text((xy[0] + 2, xy[1] + 1), text, fill=(255, 255, 255), font=font)


def sample_grid(rows: list[SampleRow], threshold: float = 0.5) -> np.ndarray:
    """The grid of ``rows`` as an (H, W, 3) uint8 array.

    Layout: a header strip of ``STRIP`` pixels with the panel titles, then per row a strip of
    ``STRIP`` pixels (``<id>  IoU <iou>``) above its panels of S x S pixels, side by side in the order
    of ``panel_names(rows)``.
    """
    names = panel_names(rows)
    side = rows[0].image.shape[-1]
    canvas = Image.new("RGB", (side * len(names), STRIP + len(rows) * (STRIP + side)), (0, 0, 0))
    for i, name in enumerate(names):
        _text(canvas, (i * side, 0), name, side)
    for r, row in enumerate(rows):
        top = STRIP + r * (STRIP + side)
        _text(canvas, (0, top), f"{row.id}  IoU {row.iou:.3f}", canvas.width)
        strip = torch.cat(row_panels(row, names, threshold), dim=2)  # (3, S, n*S)
        canvas.paste(Image.fromarray(strip.permute(1, 2, 0).numpy()), (0, top + STRIP))
    return np.asarray(canvas)
