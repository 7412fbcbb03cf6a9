"""Predictor.predict_tiled: windows, routing of prompts, blending in the overlaps."""

from __future__ import annotations

import numpy as np
import pytest

from samflow import Predictor
from samflow.predictor_types import PredictorError
from samflow.sam import HookedSam
from samflow.tiled_predict import _starts


def image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def predictor(tiny_sam):
    return Predictor(HookedSam(tiny_sam), device="cpu")


def test_an_image_in_one_window_equals_predict(predictor):
    img = image(90, 150)
    boxes = np.array([[20, 10, 100, 70], [0, 0, 149, 89]])
    points = np.array([[[50, 40]], [[120, 60]]])
    labels = np.ones((2, 1), dtype=np.int64)
    logits, scores = predictor.predict_tiled(img, boxes, points, labels, tile=160, return_logits=True)
    masks, _ = predictor.predict_tiled(img, boxes, points, labels, tile=160)
    predictor.set_image(img)
    for row in range(2):
        ref, ref_scores, _ = predictor.predict(
            points[row], labels[row], boxes[row], multimask_output=False, return_logits=True
        )
        np.testing.assert_allclose(logits[row], ref, atol=1e-5, rtol=0)  # rows batched vs alone
        sure = np.abs(ref) > 1e-4
        np.testing.assert_array_equal(masks[row][sure], (ref > 0)[sure])
        np.testing.assert_allclose(scores[row], ref_scores, atol=1e-5, rtol=0)


def test_windows_route_prompts_and_blend_overlaps(predictor):
    img = image(200, 300)
    assert _starts(300, 128, 32) == [0, 96, 172] and _starts(200, 128, 32) == [0, 72]
    inner = [10, 10, 60, 60]  # only in the window at (0, 0)
    shared = [100, 10, 120, 60]  # in the windows at x 0 and 96 (y 0), both cover x 96..127
    logits, scores = predictor.predict_tiled(
        img, np.array([inner, shared]), tile=128, overlap=32, return_logits=True
    )
    assert logits.shape == (2, 1, 200, 300) and scores.shape == (2, 1)
    crop = predictor.encode(np.ascontiguousarray(img[:128, :128]))
    alone = predictor.predict(box=np.array(inner), multimask_output=False, return_logits=True, encoding=crop)[
        0
    ]
    np.testing.assert_allclose(logits[0, :, :72, :96], alone[:, :72, :96], atol=1e-5)  # one window: its own
    assert np.isneginf(logits[0, :, 128:, :]).all() and np.isneginf(logits[0, :, :, 128:]).all()
    left = predictor.predict(box=np.array(shared), multimask_output=False, return_logits=True, encoding=crop)[
        0
    ]
    right_crop = predictor.encode(np.ascontiguousarray(img[:128, 96:224]))
    box = np.array(shared) - np.array([96, 0, 96, 0])
    right = predictor.predict(box=box, multimask_output=False, return_logits=True, encoding=right_crop)[0]
    np.testing.assert_allclose(logits[1, :, :72, :96], left[:, :72, :96], atol=1e-5)
    np.testing.assert_allclose(logits[1, :, :72, 128:172], right[:, :72, 32:76], atol=1e-5)
    both = logits[1, 0, :72, 96:128]
    lo = np.minimum(left[0, :72, 96:128], right[0, :72, :32]) - 1e-5
    hi = np.maximum(left[0, :72, 96:128], right[0, :72, :32]) + 1e-5
    assert ((both >= lo) & (both <= hi)).all()  # a convex blend of the two windows
    assert not np.allclose(both, left[0, :72, 96:128]) and not np.allclose(both, right[0, :72, :32])


def test_a_prompt_larger_than_a_window_is_refused(predictor):
    with pytest.raises(PredictorError, match=r"prompts \[0\] fit in no 128 px window"):
        predictor.predict_tiled(image(200, 300), np.array([[0, 0, 250, 100]]), tile=128)


def test_memory_is_bounded_by_one_window(predictor, monkeypatch):
    """However many windows, only one window's encoding is alive when the next is made, and none after."""
    import gc
    import weakref

    alive: list[weakref.ref] = []
    peak = []
    encode = predictor.encode

    def counting(window, image_format="RGB"):
        gc.collect()
        peak.append(sum(ref() is not None for ref in alive))
        result = encode(window, image_format)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(predictor, "encode", counting)
    img = image(200, 260)  # 64 px windows, 16 overlap: 4 x 5 windows
    boxes = np.array([[10, 10, 40, 40], [100, 100, 150, 150], [200, 150, 250, 190]])
    predictor.predict_tiled(img, boxes, tile=64, overlap=16)
    assert len(alive) >= 3 and max(peak) <= 1  # each window's encoding is gone before the next is made
    gc.collect()
    assert not any(ref() is not None for ref in alive)
    assert predictor.encoding is None  # predict_tiled does not set an image
