"""``samflow export --onnx``: the decoder side with its plugins as an ONNX graph, run by onnxruntime.

onnxruntime's outputs equal ``Predictor.predict``'s (to 1e-4) with no plugin, decoder tuning and
HQ-SAM; with no plugin they equal segment-anything's own ``SamOnnxModel`` on the same inputs; plugins
that do not declare ``onnx_exportable`` are refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel
from torch import Tensor

from samflow.cli import main
from samflow.export import ExportError, export
from samflow.onnx_export import (
    DecoderGraph,
    OnnxExportError,
    check_onnx,
    check_onnx_exportable,
    export_onnx,
    onnx_inputs,
    run_onnx,
)
from samflow.plugins import DecoderContext, DecoderFeatures, PluginStack, SamPlugin
from samflow.plugins.registry import create_plugin, discover
from samflow.predictor import Predictor
from samflow.sam import HookedSam

pytest.importorskip("onnxruntime")

BOX = np.array([20, 10, 100, 70])
POINTS = np.array([[50, 40], [120, 60]])
LABELS = np.array([1, 0])
PROMPTS = {
    "box": {"box": BOX},
    "points": {"point_coords": POINTS, "point_labels": LABELS},
    "box+points": {"box": BOX, "point_coords": POINTS[:1], "point_labels": LABELS[:1]},
}
TOL = 1e-4


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def plugins(name: str) -> dict[str, SamPlugin]:
    if name == "decoder_tuning":
        from samflow_plugins.decoder_tuning import DecoderTuning

        return {"decoder": DecoderTuning()}
    if name == "hq_sam":
        from samflow_plugins.hq_sam import HQSam

        return {"hq": HQSam()}
    return {}


def trained_like(sam, name: str) -> HookedSam:
    """``sam`` with the plugin ``name``, whose trainable tensors are moved as training would move them."""
    model = HookedSam(sam, PluginStack(plugins(name)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("name", ["none", "decoder_tuning", "hq_sam"])
def test_onnxruntime_equals_predictor(tiny_sam, name, tmp_path):
    plain = Predictor(HookedSam(tiny_sam), device="cpu")
    img = image(90, 150)  # not square: the graph crops and resizes from orig_im_size
    plain_low = plain.predict(box=BOX, encoding=plain.encode(img), return_logits=True)[2]
    predictor = Predictor(trained_like(tiny_sam, name), device="cpu")
    path = export_onnx(predictor.model, tmp_path / "decoder.onnx")
    encoding = predictor.encode(img)
    worst = 0.0
    for prompt in PROMPTS.values():
        expected = predictor.predict(**prompt, encoding=encoding, return_logits=True)
        got = run_onnx(path, onnx_inputs(predictor, encoding, **prompt))
        for ours, want in zip(got, expected, strict=True):
            assert ours.shape == (1, *want.shape)
            worst = max(worst, float(np.abs(ours[0] - want).max()))
        assert 0.02 < (got[0] > 0).mean() < 0.98  # both classes: the comparison can fail
    assert worst < TOL
    # a mask input (the previous low-resolution logits) takes the mask branch
    low = predictor.predict(box=BOX, encoding=encoding, multimask_output=False)[2]
    prompt = {"point_coords": POINTS, "point_labels": LABELS, "mask_input": low}
    expected = predictor.predict(**prompt, encoding=encoding, return_logits=True)
    got = run_onnx(path, onnx_inputs(predictor, encoding, **prompt))
    assert max(float(np.abs(g[0] - e).max()) for g, e in zip(got, expected, strict=True)) < TOL
    if name == "hq_sam":  # HQ-SAM chooses its mask: one per prompt
        assert got[0].shape == (1, 1, 90, 150)
    else:
        assert got[0].shape == (1, 3, 90, 150)
    # the plugin is in the graph: its output is not plain SAM's
    box_low = run_onnx(path, onnx_inputs(predictor, encoding, box=BOX))[2][0]
    assert (name == "none") == np.allclose(box_low, plain_low, atol=TOL)


def test_prompt_rows_single_mask_and_other_sizes(tiny_sam, tmp_path):
    """Dynamic axes: several prompt rows in one call equal predict_torch; another image size; token 0."""
    predictor = Predictor(trained_like(tiny_sam, "hq_sam"), device="cpu")
    one = export_onnx(predictor.model, tmp_path / "single.onnx", multimask_output=False)
    multi = export_onnx(predictor.model, tmp_path / "multi.onnx")
    img = image(120, 64, seed=4)
    predictor.set_image(img)
    encoding = predictor.encoding
    boxes = np.array([[2, 5, 50, 100], [10, 30, 60, 110], [0, 0, 63, 119]], dtype=np.float64)
    for path, multimask in ((one, False), (multi, True)):
        expected = predictor.predict_torch(
            None,
            None,
            predictor.transform.apply_boxes_torch(torch.tensor(boxes), img.shape[:2]),
            multimask_output=multimask,
            return_logits=True,
        )
        inputs = onnx_inputs(predictor, encoding, box=boxes[0])
        corners = predictor.transform.apply_boxes(boxes, img.shape[:2]).reshape(3, 2, 2)
        inputs.update(
            point_coords=corners.astype(np.float32),
            point_labels=np.tile(np.float32([2, 3]), (3, 1)),
            mask_input=np.zeros((3, *inputs["mask_input"].shape[1:]), np.float32),
            has_mask_input=np.zeros(3, np.float32),
        )
        got = run_onnx(path, inputs)
        assert got[0].shape == (3, 1, 120, 64)
        for ours, want in zip(got, expected, strict=True):
            np.testing.assert_allclose(ours, want.numpy(), atol=TOL, rtol=0)
    # HQ-SAM's sam_hq follows SAM's rule: token 0 or the best of 1..3, so the graphs differ
    single = run_onnx(one, onnx_inputs(predictor, encoding, box=boxes[0]))[1]
    best = run_onnx(multi, onnx_inputs(predictor, encoding, box=boxes[0]))[1]
    assert not np.allclose(single, best)


def test_no_plugin_equals_segment_anything_onnx_model(tiny_sam, tmp_path):
    """Same inputs as segment-anything's ONNX decoder (box corners labelled 2 / 3, a padding point
    labelled -1 when there is no box): its masks 1..3 are ours."""
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    path = export_onnx(predictor.model, tmp_path / "decoder.onnx")
    encoding = predictor.encode(image(90, 150, seed=5))
    reference = SamOnnxModel(tiny_sam, return_single_mask=False)
    for prompt in PROMPTS.values():
        inputs = onnx_inputs(predictor, encoding, **prompt)
        if "box" not in prompt:  # segment-anything's convention: the caller adds the padding point
            inputs["point_coords"] = np.concatenate([inputs["point_coords"], np.zeros((1, 1, 2))], 1)
            inputs["point_labels"] = np.concatenate([inputs["point_labels"], [[-1.0]]], 1)
        inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
        with torch.no_grad():
            want = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        got = run_onnx(path, inputs)
        for ours, theirs in zip(got, want, strict=True):
            np.testing.assert_allclose(ours, theirs[:, 1:].numpy(), atol=TOL, rtol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(discover()))
def test_every_registered_plugin_is_exported_exactly_or_refused(name, tiny_sam, tmp_path):
    """Driven by the registry: a plugin that declares ``onnx_exportable`` gives a graph that onnxruntime
    runs as PyTorch does (three rows, a mask input, a 97 x 140 image); any other is refused by name."""
    torch.manual_seed(0)
    model = HookedSam(tiny_sam, PluginStack({name: create_plugin(name)}))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # as if trained: zero-initialised parts become non-zero
                param.add_(torch.randn_like(param) * 0.05)
    if not type(model.plugins[name]).onnx_exportable:
        with pytest.raises(OnnxExportError, match=f"Plugin {name!r}"):
            export_onnx(model, tmp_path / "decoder.onnx")
        return
    path = export_onnx(model, tmp_path / "decoder.onnx")
    assert check_onnx(DecoderGraph(model), path) < TOL


class ThirdParty(SamPlugin):
    """A plugin from elsewhere with a decoder hook, which does not declare itself exportable."""

    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        return {"twice": 2 * feats.sam_masks[:, :1]}


def test_plugins_not_declared_exportable_are_refused(tiny_sam, tmp_path):
    from samflow_plugins.pa_sam import PASam

    for key, plugin, cls in (("pa", PASam(), "PASam"), ("mine", ThirdParty(), "ThirdParty")):
        model = HookedSam(tiny_sam, PluginStack({key: plugin}))
        with pytest.raises(OnnxExportError) as err:
            export_onnx(model, tmp_path / "decoder.onnx")
        message = str(err.value)
        assert f"Plugin {key!r} ({cls}) cannot be exported to ONNX" in message and "\n" not in message
        with pytest.raises(OnnxExportError, match=key):
            DecoderGraph(model)
    assert not (tmp_path / "decoder.onnx").exists()
    check_onnx_exportable(HookedSam(tiny_sam))  # no plugin: nothing to refuse


def test_cli_writes_and_checks_the_graph(decoder_run, pa_sam_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(decoder_run), "--out", str(out), "--onnx"]) == 0
    printed = capsys.readouterr().out
    assert "decoder.onnx" in printed and "checked with onnxruntime: max |onnx - torch| = " in printed
    manifest = json.loads((out / "samflow.json").read_text())["onnx"]
    assert manifest["file"] == "decoder.onnx" and manifest["multimask_output"] is True
    assert manifest["inputs"][:6] == [
        "image_embeddings",
        "point_coords",
        "point_labels",
        "mask_input",
        "has_mask_input",
        "orig_im_size",
    ]
    assert 0 <= manifest["max_abs_difference"] < TOL
    # the exported graph decodes the exported adapter's model
    predictor = Predictor.from_export(out, device="cpu")
    encoding = predictor.encode(image(70, 100, seed=6))
    expected = predictor.predict(box=BOX // 2, encoding=encoding, return_logits=True)
    got = run_onnx(out / "decoder.onnx", onnx_inputs(predictor, encoding, box=BOX // 2))
    assert max(float(np.abs(g[0] - e).max()) for g, e in zip(got, expected, strict=True)) < TOL
    # refusals: a plugin that is not exportable (PA-SAM), named, before anything is written;
    # --onnx with --merged
    refused = tmp_path / "refused"
    assert main(["export", str(pa_sam_run), "--out", str(refused), "--onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Plugin 'pa' (PASam) cannot be exported to ONNX" in err[0]
    assert not refused.exists()
    with pytest.raises(ExportError, match="exclude each other"):
        export(decoder_run, tmp_path / "both", merged=True, onnx=True)


def test_stretch_geometry(tiny_sam, tmp_path):
    """A run trained with resize_mode stretch: no crop before resizing to the image's size."""
    predictor = Predictor(HookedSam(tiny_sam), device="cpu", resize_mode="stretch")
    path = export_onnx(predictor.model, tmp_path / "decoder.onnx", resize_mode="stretch")
    encoding = predictor.encode(image(90, 150, seed=7))
    expected = predictor.predict(box=BOX, encoding=encoding, return_logits=True)
    got = run_onnx(path, onnx_inputs(predictor, encoding, box=BOX))
    for ours, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours[0], want, atol=TOL, rtol=0)
    longest = run_onnx(
        export_onnx(predictor.model, tmp_path / "longest.onnx"), onnx_inputs(predictor, encoding, box=BOX)
    )
    assert not np.allclose(longest[0], got[0], atol=TOL)  # the geometry matters
