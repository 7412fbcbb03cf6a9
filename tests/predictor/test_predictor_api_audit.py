"""Predictor against the README and SamPredictor: prompts it cannot use are refused naming the argument
(never a prompt silently dropped), and a trained checkpoint predicts what its Lightning module computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from samflow import Predictor
from samflow.batch import SamBatch
from samflow.module import SamflowModule, SamSpec
from samflow.onnx_export import onnx_inputs
from samflow.predictor_types import PredictorError
from samflow.sam import HookedSam

BOX = np.array([20.0, 10, 100, 70])
POINTS = np.array([[50.0, 40.0], [120.0, 60.0]])
LABELS = np.array([1, 0])


def image(height: int = 90, width: int = 150, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def predictor(tiny_sam):
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    predictor.set_image(image())
    return predictor


LOW = np.zeros((1, 32, 32), np.float32)  # the tiny SAM's low-resolution mask (4 x its 8 x 8 grid)
BAD_PROMPTS = {
    # two boxes: predict is one prompt; it returned the first box's masks and dropped the second
    "two boxes": ({"box": np.stack([BOX, BOX / 2])}, "box"),
    "three numbers": ({"box": BOX[:3]}, "box"),
    "labels without points": ({"box": BOX, "point_labels": LABELS}, "point_labels"),
    "fewer labels than points": ({"point_coords": POINTS, "point_labels": LABELS[:1]}, "point_labels"),
    "points not xy": ({"point_coords": np.ones((2, 3)), "point_labels": LABELS}, "point_coords"),
    "three masks": ({"box": BOX, "mask_input": np.zeros((3, 32, 32), np.float32)}, "mask_input"),
    "mask of another size": ({"box": BOX, "mask_input": np.zeros((1, 64, 64), np.float32)}, "mask_input"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS)
def test_predict_refuses_a_prompt_it_cannot_use_naming_the_argument(predictor, case):
    kwargs, argument = BAD_PROMPTS[case]
    with pytest.raises(PredictorError, match=argument) as caught:
        predictor.predict(**kwargs)
    assert "\n" not in str(caught.value)
    with pytest.raises(PredictorError, match=argument):  # the ONNX inputs of one prompt: the same rules
        onnx_inputs(predictor, predictor.encoding, **kwargs)


def test_predict_takes_a_box_as_4_or_1_x_4_and_a_mask_as_segment_anything_gives_it(predictor):
    """SamPredictor's shapes still work: box (4,) or (1, 4), mask_input (1, h, w)."""
    flat = predictor.predict(box=BOX, return_logits=True)
    row = predictor.predict(box=BOX[None], return_logits=True)
    np.testing.assert_array_equal(flat[0], row[0])
    masks, scores, low = predictor.predict(box=BOX, mask_input=flat[2][:1], multimask_output=False)
    assert masks.shape == (1, 90, 150) and scores.shape == (1,) and low.shape == LOW.shape


def test_predict_torch_refuses_rows_that_disagree(predictor):
    boxes = torch.tensor([[20.0, 10, 100, 70]] * 3)
    points, labels = torch.rand(2, 1, 2) * 100, torch.ones(2, 1, dtype=torch.long)
    with pytest.raises(PredictorError, match="point_coords .*boxes"):
        predictor.predict_torch(points, labels, boxes)
    with pytest.raises(PredictorError, match="boxes"):
        predictor.predict_torch(None, None, boxes[0])  # (4,): one box is (1, 4) here, as in SamPredictor
    with pytest.raises(PredictorError, match="point_labels"):
        predictor.predict_torch(points, labels[:, :0])
    masks = predictor.predict_torch(points, labels, boxes[:2])[0]  # rows that agree still run
    assert masks.shape == (2, 3, 90, 150)


def test_an_empty_image_is_refused_naming_set_image(predictor):
    with pytest.raises(PredictorError, match="set_image"):
        predictor.set_image(image()[:0])


def test_a_checkpoint_predicts_what_its_lightning_module_computes(trained_run):
    """The run's SamflowModule with the checkpoint loaded (the Lightning way: ``load_state_dict`` of
    its ``state_dict``), on the Predictor's frame and the same prompt in the model's frame: its
    forward's ``pred`` is ``predict``'s low-resolution logits (the plugin chooses the mask here)."""
    from jsonargparse import ArgumentParser

    from samflow.plugins import SamPlugin
    from samflow.plugins.registry import discover

    config = yaml.safe_load((trained_run / "config.yaml").read_text())["model"]
    discover()
    parser = ArgumentParser()
    parser.add_argument("--plugins", type=dict[str, SamPlugin])
    plugins = parser.instantiate_classes(parser.parse_object({"plugins": config["plugins"]})).plugins
    module = SamflowModule(sam=SamSpec(**config["sam"]), plugins=plugins)
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()

    predictor = Predictor.from_run(trained_run, device="cpu")
    predictor.set_image(image(96, 140, seed=4))
    enc = predictor.encoding
    for multimask in (True, False):
        _, scores, low = predictor.predict(
            point_coords=POINTS, point_labels=LABELS, box=BOX, multimask_output=multimask
        )
        batch = SamBatch(
            image=enc.image,
            input_size=torch.tensor([enc.input_size]),
            original_size=torch.tensor([enc.original_size]),
            points=torch.as_tensor(predictor.transform.apply_coords(POINTS, enc.original_size)).float()[None],
            point_labels=torch.as_tensor(LABELS)[None],
            box=torch.as_tensor(predictor.transform.apply_boxes(BOX, enc.original_size)).float(),
        )
        module.model.multimask_output = multimask  # the rule of the call, as predict passes it
        with torch.no_grad():
            out, _ = module(batch)
        assert low.shape == (1, 32, 32)
        np.testing.assert_allclose(low[0], out.pred[0, 0].numpy(), atol=1e-5, rtol=0)
        iou = out.iou_pred[0, 1:].max() if multimask else out.iou_pred[0, 0]
        assert scores[0] == pytest.approx(iou.item(), abs=1e-6)
