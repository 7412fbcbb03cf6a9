"""Tissue detection: Otsu's threshold on the saturation of a low-resolution view of the slide.

Glass and background are bright and grey (low saturation); stained tissue is coloured. The
threshold is scikit-image's ``threshold_otsu`` on S = (max - min) / max of the RGB pixels.
"""

from __future__ import annotations

import numpy as np

from samflow.data.wsi.slide import Slide, SlideError


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (H, W) float32 in [0, 1] of RGB uint8 (H, W, 3); 0 for black.

    Channel extremes stay uint8 (about 11 bytes per pixel in all, not 30 with a float copy of the
    thumbnail: the tissue view is the largest array slide prediction holds)."""
    high, low = rgb.max(-1), rgb.min(-1)  # uint8
    sat = (high - low).astype(np.float32)
    sat /= np.maximum(high, 1)  # black: 0 / 1
    return sat


def tissue_mask(slide: Slide, mpp: float = 16.0) -> tuple[np.ndarray, float]:
    """(boolean tissue mask at the coarsest level at least as fine as ``mpp``, its level-0 downsample)."""
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        raise SlideError("tissue detection needs scikit-image: pip install 'samflow[wsi]'.") from None
    thumb, downsample = slide.thumbnail(mpp)
    sat = saturation(thumb)
    if float(sat.max()) - float(sat.min()) < 1e-6:
        return np.zeros(sat.shape, dtype=bool), downsample
    return sat > threshold_otsu(sat), downsample
