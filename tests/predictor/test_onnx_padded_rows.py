"""The ONNX decoder on prompt rows of different point counts in one call (empty slots labelled -1,
with and without boxes as corner points 2 / 3): each row equals ``Predictor.predict`` on that row's
prompt alone, and the call equals ``predict_torch`` on the same padded rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samflow import Predictor
from samflow.onnx_export import export_onnx, onnx_inputs, run_onnx
from samflow.sam import HookedSam

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'samflow[onnx]'")

TOL = 1e-4  # float32 graph against PyTorch (measured below 1e-6)


def test_padded_rows_equal_each_row_alone(tiny_sam, tmp_path):
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (97, 140, 3), dtype=np.uint8)
    predictor.set_image(img)
    encoding = predictor.encoding
    path = export_onnx(predictor.model, tmp_path / "decoder.onnx")
    coords = np.array([[[10, 20], [0, 0], [0, 0]], [[30, 40], [50, 60], [70, 20]]], dtype=np.float64)
    labels = np.array([[1, -1, -1], [1, 0, 1]])
    boxes = np.array([[5.0, 5, 80, 60], [20, 10, 120, 90]])
    model_coords = predictor.transform.apply_coords(coords, img.shape[:2]).astype(np.float32)
    for with_box in (False, True):
        inputs = onnx_inputs(predictor, encoding, box=boxes[0])
        point_coords, point_labels = model_coords, labels.astype(np.float32)
        if with_box:
            corners = predictor.transform.apply_boxes(boxes, img.shape[:2]).reshape(2, 2, 2)
            point_coords = np.concatenate([point_coords, corners.astype(np.float32)], axis=1)
            point_labels = np.concatenate([point_labels, np.tile(np.float32([2, 3]), (2, 1))], axis=1)
        inputs.update(
            point_coords=point_coords,
            point_labels=point_labels,
            mask_input=np.zeros((2, *inputs["mask_input"].shape[1:]), np.float32),
            has_mask_input=np.zeros(2, np.float32),
        )
        got = run_onnx(path, inputs)
        model_boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), img.shape[:2])
        batched = predictor.predict_torch(
            torch.as_tensor(model_coords),
            torch.as_tensor(labels),
            model_boxes if with_box else None,
            return_logits=True,
        )
        for g, b in zip(got, batched, strict=True):
            np.testing.assert_allclose(g, b.numpy(), atol=TOL, rtol=0)
        for row in range(2):
            count = int((labels[row] >= 0).sum())
            alone = predictor.predict(
                coords[row, :count], labels[row, :count], boxes[row] if with_box else None, return_logits=True
            )
            for g, a in zip(got, alone, strict=True):
                np.testing.assert_allclose(g[row], a, atol=TOL, rtol=0)
        assert not np.allclose(got[0][0], got[0][1], atol=TOL)  # the rows differ: the check can fail
