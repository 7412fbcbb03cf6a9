"""``Predictor.predict_tiled``: prompts on an image larger than the model's input, window by window.

``predict_tiled`` is the method's body (``Predictor`` binds it as ``predict_tiled``); ``_starts``,
``_window_weight`` and ``_tracked`` place the windows, weigh their overlaps and show the progress.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from samflow.predictor_types import PredictorError

if TYPE_CHECKING:
    from samflow.predictor import Predictor

__all__ = ["predict_tiled"]


def predict_tiled(
    predictor: Predictor,
    image: np.ndarray,
    boxes: np.ndarray | None = None,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    multimask_output: bool | None = None,
    return_logits: bool = False,
    image_format: str = "RGB",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """N prompts on an image larger than the model's input, window by window.

    The image is cut into ``tile`` x ``tile`` windows (default: the model's input side, so a window
    is not shrunk) that overlap by ``overlap`` pixels (default ``tile // 4``); the last window of
    a row or column ends at the image's edge. Each prompt goes to every window that contains it
    whole (its box, or all its points, as far as they lie in the image; a box may end on the
    window's edge); each such window is encoded once for all its prompts.
    A prompt's logits from several windows are blended with weights that fall linearly to 0 over
    the overlap at a window's inner edges (1 at the image's own edges); outside its windows a
    prompt's logits are ``-inf``. An image no larger than one window is one window: the result is
    then ``predict``'s (to float rounding: the prompts are decoded as one batch). Only one window's
    encoder state is held at a time; the outputs are N full-size maps, and the blending holds at most
    9 bytes per pixel and prompt (the logits' sums and weights, float32, and a flag), 36 GB for 10
    prompts on a 20k x 20k image.

    Args:
        image: H x W x 3 uint8.
        boxes: (N, 4) xyxy in the image's pixels; point_coords (N, K, 2), point_labels (N, K).
        tile, overlap: window side and overlap in the image's pixels.
        multimask_output: as ``predict``; the default None gives each prompt the model's own
            prediction (one mask).
        progress: show a progress bar over the windows (``samflow predict --prompts --tile`` does).

    Returns:
        ``(masks (N, C, H, W), scores (N, C))``: boolean masks (logits with ``return_logits``), and
        each prompt's scores averaged over its windows.
    """
    array = np.asarray(image)
    height, width = array.shape[:2]
    tile = tile or predictor.model.img_size
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise PredictorError(f"predict_tiled: overlap must be in [0, tile), got {overlap} for tile {tile}.")
    if boxes is None and point_coords is None:
        raise PredictorError("predict_tiled needs boxes or point_coords (with point_labels).")
    if point_coords is not None and point_labels is None:
        raise PredictorError("point_labels must be given with point_coords.")
    box_rows = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    point_rows = None if point_coords is None else np.asarray(point_coords, dtype=np.float64)
    extents = []  # (N, 4) xyxy that each prompt needs inside a window
    if box_rows is not None:
        extents.append(box_rows)
    if point_rows is not None:
        extents.append(np.concatenate([point_rows.min(1), point_rows.max(1)], -1))
    # routing only: coordinates live in [0, W] x [0, H] (a box to the right edge ends at W), and a
    # prompt reaching past the image needs no more of it than the image has
    edge = np.array([width, height], dtype=np.float64)
    lo = np.clip(np.min([e[:, :2] for e in extents], axis=0), 0, edge)
    hi = np.clip(np.max([e[:, 2:] for e in extents], axis=0), 0, edge)
    rows = len(lo)
    windows = [
        (y, x, min(tile, height), min(tile, width))
        for y in _starts(height, tile, overlap)
        for x in _starts(width, tile, overlap)
    ]
    channels = 3 if multimask_output and not predictor.model.plugins.uses("select") else 1
    total = np.zeros((rows, channels, height, width), dtype=np.float32)
    weight = np.zeros((rows, 1, height, width), dtype=np.float32)
    score_sum = np.zeros((rows, channels), dtype=np.float32)
    hits = np.zeros(rows, dtype=np.int64)
    for y, x, h, w in _tracked(windows, progress):
        inside = (lo[:, 0] >= x) & (lo[:, 1] >= y) & (hi[:, 0] <= x + w) & (hi[:, 1] <= y + h)
        if not inside.any():
            continue
        chosen = np.flatnonzero(inside)
        encoding = predictor.encode(np.ascontiguousarray(array[y : y + h, x : x + w]), image_format)
        shift = np.array([x, y], dtype=np.float64)
        frame = (h, w)
        args: dict[str, Tensor | None] = {"point_coords": None, "point_labels": None, "boxes": None}
        if box_rows is not None:
            local = predictor.transform.apply_boxes(box_rows[chosen] - np.tile(shift, 2), frame)
            args["boxes"] = torch.as_tensor(local, dtype=torch.float)
        if point_rows is not None and point_labels is not None:
            local = predictor.transform.apply_coords(point_rows[chosen] - shift, frame)
            args["point_coords"] = torch.as_tensor(local, dtype=torch.float)
            args["point_labels"] = torch.as_tensor(np.asarray(point_labels)[chosen], dtype=torch.long)
        window_logits, window_scores, _ = predictor.decode(
            encoding, **args, multimask_output=multimask_output, return_logits=True
        )
        ramp = _window_weight(y, x, h, w, height, width, overlap)
        total[chosen, :, y : y + h, x : x + w] += window_logits.float().cpu().numpy() * ramp
        weight[chosen, :, y : y + h, x : x + w] += ramp
        score_sum[chosen] += window_scores.float().cpu().numpy()
        hits[chosen] += 1
    missing = np.flatnonzero(hits == 0)
    if len(missing):
        raise PredictorError(
            f"predict_tiled: prompts {missing[:5].tolist()} fit in no {tile} px window; pass a larger tile."
        )
    # blended in place: 9 bytes a pixel and prompt at most (total, weight, outside), never a second map
    outside = weight == 0  # (N, 1, H, W): no window of the prompt covers the pixel
    np.divide(total, np.maximum(weight, 1e-12, out=weight), out=total)
    del weight
    np.copyto(total, -np.inf, where=outside)
    del outside
    return (total if return_logits else total > predictor.mask_threshold), score_sum / hits[:, None]


def _tracked(windows: list[tuple[int, int, int, int]], progress: bool) -> Iterator[tuple[int, int, int, int]]:
    """``windows`` one by one, under a progress bar over the tiles when ``progress``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        yield from bar.track(windows)


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: stride ``tile - overlap``, the last window ending at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _window_weight(y: int, x: int, h: int, w: int, height: int, width: int, overlap: int) -> np.ndarray:
    """(h, w) blending weights of a window: linear from ~0 to 1 over ``overlap`` pixels at each edge
    inside the image, 1 at the image's own edges."""

    def ramp(start: int, size: int, total: int) -> np.ndarray:
        r = np.ones(size, dtype=np.float32)
        if overlap == 0:
            return r
        up = (np.arange(size, dtype=np.float32) + 1) / (overlap + 1)
        if start > 0:
            r = np.minimum(r, up)
        if start + size < total:
            r = np.minimum(r, up[::-1])
        return r

    return ramp(y, h, height)[:, None] * ramp(x, w, width)[None, :]
