"""samflow.Predictor: SamPredictor's interface and results, built from what training wrote."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from samflow import Predictor
from samflow.predictor_types import PredictorError
from samflow.sam import CheckpointError, HookedSam

BOX = np.array([20, 10, 100, 70])
POINTS = np.array([[50, 40], [120, 60]])
LABELS = np.array([1, 0])
PROMPTS = {
    "box": {"box": BOX},
    "points": {"point_coords": POINTS, "point_labels": LABELS},
    "box+points": {"box": BOX, "point_coords": POINTS[:1], "point_labels": LABELS[:1]},
}


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def pair(tiny_sam):
    """segment-anything's SamPredictor and samflow's Predictor on the same SAM, image set."""
    ref, ours = SamPredictor(tiny_sam), Predictor(HookedSam(tiny_sam), device="cpu")
    return ref, ours


@pytest.mark.parametrize(
    ("shape", "prompt"),
    [((90, 150), "box"), ((90, 150), "points"), ((90, 150), "box+points"), ((60, 44), "box+points")],
)  # not square; shrunk to 128 px and enlarged
def test_equals_segment_anything_sam_predictor(pair, shape, prompt):
    ref, ours = pair
    img = image(*shape)
    ref.set_image(img)
    ours.set_image(img)
    assert ours.input_size == ref.input_size and ours.original_size == ref.original_size
    torch.testing.assert_close(ours.get_image_embedding(), ref.get_image_embedding(), atol=1e-5, rtol=0)
    for multimask in (True, False):
        masks, scores, low = ours.predict(**PROMPTS[prompt], multimask_output=multimask)
        ref_masks, ref_scores, ref_low = ref.predict(**PROMPTS[prompt], multimask_output=multimask)
        assert masks.dtype == ref_masks.dtype == bool and masks.shape == ref_masks.shape
        assert masks.shape == ((3 if multimask else 1), *shape)
        np.testing.assert_array_equal(masks, ref_masks)
        assert 0.05 < masks.mean() < 0.95  # the comparison has both classes to get wrong
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(low, ref_low, atol=1e-5, rtol=0)
        logits = ours.predict(**PROMPTS[prompt], multimask_output=multimask, return_logits=True)[0]
        ref_logits = ref.predict(**PROMPTS[prompt], multimask_output=multimask, return_logits=True)[0]
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)


def test_mask_input_and_predict_torch_equal_sam_predictor(pair):
    ref, ours = pair
    img = image(90, 150, seed=1)
    ref.set_image(img)
    ours.set_image(img)
    _, _, low = ref.predict(box=BOX, multimask_output=False)
    a = ours.predict(point_coords=POINTS, point_labels=LABELS, mask_input=low, multimask_output=False)
    b = ref.predict(point_coords=POINTS, point_labels=LABELS, mask_input=low, multimask_output=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[2], b[2], atol=1e-5, rtol=0)
    boxes = torch.tensor([[20, 10, 100, 70], [0, 0, 149, 89], [60, 30, 90, 80]], dtype=torch.float)
    mine = ours.predict_torch(None, None, ours.transform.apply_boxes_torch(boxes, img.shape[:2]))
    theirs = ref.predict_torch(None, None, ref.transform.apply_boxes_torch(boxes, img.shape[:2]))
    assert mine[0].shape == (3, 3, 90, 150)
    assert torch.equal(mine[0], theirs[0])
    for x, y in zip(mine[1:], theirs[1:]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    batched = ours.predict_torch(
        None, None, ours.transform.apply_boxes_torch(boxes, img.shape[:2]), return_logits=True
    )
    for row, box in enumerate(boxes.numpy()):  # a row alone equals the row in the batch
        alone = ours.predict(box=box, return_logits=True)[0]
        np.testing.assert_allclose(alone, batched[0][row].numpy(), atol=1e-5, rtol=0)


def test_encode_once_decode_many(tiny_sam):
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    calls = []
    tiny_sam.image_encoder.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    first, second = predictor.encode(image(90, 150, 2)), predictor.encode(image(70, 128, 3))
    assert len(calls) == 2
    results = [predictor.predict(box=BOX, encoding=enc) for enc in (first, second, first)]
    assert len(calls) == 2  # decoding never runs the encoder
    np.testing.assert_array_equal(results[0][2], results[2][2])
    assert not np.array_equal(results[0][2], results[1][2])
    predictor.set_image(image(70, 128, 3))
    np.testing.assert_array_equal(predictor.predict(box=BOX)[2], results[1][2])


def test_bgr_reset_and_bad_images(tiny_sam):
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    img = image(90, 150)
    predictor.set_image(img)
    rgb = predictor.predict(box=BOX)[2]
    predictor.set_image(np.ascontiguousarray(img[..., ::-1]), image_format="BGR")
    np.testing.assert_array_equal(predictor.predict(box=BOX)[2], rgb)
    predictor.reset_image()
    assert not predictor.is_image_set
    with pytest.raises(PredictorError, match="set_image"):
        predictor.predict(box=BOX)
    with pytest.raises(PredictorError, match="uint8"):
        predictor.set_image(img.astype(np.float32))


def test_from_run_loads_the_trained_weights(trained_run):
    predictor = Predictor.from_run(trained_run, device="cpu")
    assert not any(m.training for m in predictor.model.modules())  # eval mode, plugins included
    assert predictor.device == torch.device("cpu")
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("model."): v for k, v in state.items()}
    loaded = predictor.model.state_dict()
    assert "plugins.tokens.tokens.weight" in trained and "sam.mask_decoder.iou_token.weight" in trained
    assert not any(k.startswith("sam.image_encoder.") for k in trained)  # the slim checkpoint
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    fresh = Predictor.from_run(trained_run, device="cpu")
    fresh_state = fresh.model.state_dict()
    assert all(torch.equal(fresh_state[k], v) for k, v in loaded.items())
    # training moved the decoder, so loading it mattered
    base = torch.load(trained_run.parents[2] / "sam_tiny.pth", weights_only=True)
    assert not torch.equal(
        base["mask_decoder.iou_token.weight"], trained["sam.mask_decoder.iou_token.weight"]
    )
    # a plugin chooses the prediction: one mask per prompt, its logits are the plugin's
    predictor.set_image(image(90, 150))
    masks, scores, low = predictor.predict(box=BOX)
    assert masks.shape == (1, 90, 150) and scores.shape == (1,) and low.shape == (1, 32, 32)
    assert predictor.resize_mode == "longest" and predictor.image_resize == "sam"


def test_from_checkpoint_needs_the_runs_config(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    same = Predictor.from_checkpoint(ckpt, device="cpu")
    assert same.model.plugins["tokens"].num_tokens == 1
    lone = tmp_path / "model.ckpt"
    lone.write_bytes(ckpt.read_bytes())
    with pytest.raises(PredictorError, match="config.yaml"):
        Predictor.from_checkpoint(lone)
    other = tmp_path / "config.yaml"
    other.write_text((trained_run / "config.yaml").read_text().replace("tokens:\n", "extra:\n", 1))
    with pytest.raises(CheckpointError, match="missing .*plugins.extra"):
        Predictor.from_checkpoint(lone, config=other)
    with pytest.raises(PredictorError, match="not a samflow run folder"):
        Predictor.from_run(tmp_path / "nothing")


@pytest.mark.parametrize("plugin", ["none", "hq_sam"])
def test_none_predicts_what_the_model_validates_with_its_own_rule(tiny_sam, plugin):
    """A model trained with multimask_output (best of tokens 1..3): ``multimask_output=None`` (what
    `samflow predict --prompts` and predict_tiled use) gives its forward's ``pred`` and the chosen
    token's IoU, for plain SAM and for HQ-SAM's sam_hq (whose SAM term follows that rule);
    ``False`` stays SamPredictor's token 0, which is another mask here."""
    from samflow.batch import SamBatch
    from samflow.plugins import PluginStack
    from samflow_plugins.hq_sam import HQSam

    torch.manual_seed(0)
    plugins = {"hq": HQSam(output="sam_hq")} if plugin == "hq_sam" else {}
    model = HookedSam(tiny_sam, PluginStack(plugins), multimask_output=True).eval()
    predictor = Predictor(model, device="cpu")
    img = image(96, 120, seed=3)
    points, labels, box = (
        np.array([[50.0, 40.0], [20.0, 70.0]]),
        np.array([1, 0]),
        np.array([10.0, 12, 90, 80]),
    )
    predictor.set_image(img)
    _, score, low = predictor.predict(
        point_coords=points, point_labels=labels, box=box, multimask_output=None
    )
    enc = predictor.encoding
    coords = torch.as_tensor(predictor.transform.apply_coords(points, enc.original_size), dtype=torch.float)
    batch = SamBatch(
        image=enc.image,
        input_size=torch.tensor([enc.input_size]),
        original_size=torch.tensor([enc.original_size]),
        points=coords[None],
        point_labels=torch.as_tensor(labels)[None],
        box=torch.as_tensor(predictor.transform.apply_boxes(box, enc.original_size), dtype=torch.float),
    )
    with torch.no_grad():
        out = model(batch)
    assert low.shape[0] == 1
    np.testing.assert_allclose(low[0], out.pred[0, 0].numpy(), atol=1e-5, rtol=0)
    assert score[0] == pytest.approx(out.iou_pred[0, 1:].max().item(), abs=1e-6)
    _, _, token0 = predictor.predict(
        point_coords=points, point_labels=labels, box=box, multimask_output=False
    )
    assert np.abs(token0[0] - low[0]).max() > 1e-2


def test_a_point_labelled_minus_one_is_an_empty_slot(tiny_sam):
    """README: a -1 point is ignored (samflow's padding), so it changes nothing."""
    predictor = Predictor(HookedSam(tiny_sam).eval(), device="cpu")
    predictor.set_image(image(80, 100, seed=7))
    one = predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
    padded = predictor.predict(
        point_coords=np.array([[40.0, 30.0], [5.0, 70.0]]), point_labels=np.array([1, -1])
    )
    np.testing.assert_allclose(padded[2], one[2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded[1], one[1], atol=1e-6, rtol=0)
