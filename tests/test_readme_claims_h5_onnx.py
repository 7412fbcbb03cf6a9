"""README "ONNX": ``samflow export --onnx`` checks the graph with onnxruntime against PyTorch on three
prompts of a 97 x 140 image and records the largest difference, below 1e-5 on the tiny SAM; the graph's
masks are SAM's tokens 1..3 (M = 3), or with ``--single-mask`` token 0 (M = 1)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import samflow.onnx_export
from samflow import Predictor
from samflow.cli import main
from samflow.onnx_export import onnx_inputs

_spec = importlib.util.spec_from_file_location(
    "predictor_conftest", Path(__file__).parent / "predictor" / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

BOX = np.array([10, 8, 60, 50])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _conftest.make_run(
        tmp_path_factory.mktemp("onnx"), {"decoder": _conftest.PLUGINS["decoder"]}, steps=1
    )


@pytest.mark.parametrize(("flags", "tokens"), [([], 3), (["--single-mask"], 1)])
def test_the_export_checks_the_graph_and_single_mask_gives_token_0(run, tmp_path, monkeypatch, flags, tokens):
    checked = []
    real = samflow.onnx_export.run_onnx

    def spy(path, inputs):
        checked.append({k: np.asarray(v) for k, v in inputs.items()})
        return real(path, inputs)

    monkeypatch.setattr(samflow.onnx_export, "run_onnx", spy)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--onnx", *flags]) == 0
    (inputs,) = checked  # the export's own check: three prompt rows on a 97 x 140 image
    assert inputs["orig_im_size"].tolist() == [97, 140] and inputs["point_coords"].shape[0] == 3
    record = json.loads((out / "samflow.json").read_text())["onnx"]
    assert record["multimask_output"] is (tokens == 3)
    assert 0 <= record["max_abs_difference"] < 1e-5  # the README's bound on the tiny SAM
    predictor = Predictor.from_export(out, device="cpu")
    encoding = predictor.encode(np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    masks, scores, _ = real(out / "decoder.onnx", onnx_inputs(predictor, encoding, box=BOX))
    assert masks.shape == (1, tokens, 70, 90) and scores.shape == (1, tokens)
    expected = predictor.predict(box=BOX, encoding=encoding, multimask_output=tokens == 3, return_logits=True)
    np.testing.assert_allclose(masks[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(scores[0], expected[1], atol=1e-5)
