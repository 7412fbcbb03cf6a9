"""Point labels other than 1, 0 and -1 are refused where they enter samflow, naming the argument: SAM's
prompt encoder gives them no label embedding (2 and 3 are its box corners), so a label 2 ran as a
point with only its position encoding. Labels already on an accelerator are not read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from samflow import Predictor
from samflow.batch import SamBatch, bad_point_labels
from samflow.data.batch import collate
from samflow.data.errors import DataError
from samflow.data.folder import MaskFolderDataset
from samflow.data.prompts import PromptSampler
from samflow.onnx_export import onnx_inputs
from samflow.predictor_types import PredictorError
from samflow.sam import HookedSam

POINTS = np.array([[50.0, 40.0], [120.0, 60.0]])
WORDS = r"1 \(positive\), 0 \(negative\) or -1 \(an empty slot\)"


def _pair(root):
    """root/images/a.png and root/masks/a.png: a 12 x 16 image and a box mask."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(np.full((12, 16, 3), 100, np.uint8)).save(root / "images" / "a.png")
    mask = np.zeros((12, 16), np.uint8)
    mask[3:8, 2:7] = 255
    Image.fromarray(mask).save(root / "masks" / "a.png")
    return root


@pytest.fixture
def predictor(tiny_sam):
    predictor = Predictor(HookedSam(tiny_sam), device="cpu")
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    return predictor


@pytest.mark.parametrize("labels", [[1, 2], [3, 0], [1, -2], [1.5, 1], [1, float("nan")]])
def test_predict_refuses_other_labels_naming_the_argument(predictor, labels):
    with pytest.raises(PredictorError, match=rf"^point_labels must hold {WORDS}, got \[") as caught:
        predictor.predict(point_coords=POINTS, point_labels=np.array(labels))
    assert "\n" not in str(caught.value)
    with pytest.raises(PredictorError, match="point_labels"):  # the ONNX inputs of one prompt: the same
        onnx_inputs(predictor, predictor.encoding, point_coords=POINTS, point_labels=np.array(labels))


def test_predict_torch_refuses_other_labels_on_the_host(predictor):
    points = torch.tensor(POINTS, dtype=torch.float)[None]
    with pytest.raises(PredictorError, match=rf"point_labels must hold {WORDS}, got \[2\]"):
        predictor.predict_torch(points, torch.tensor([[1, 2]]))
    masks = predictor.predict_torch(points, torch.tensor([[1, -1]]))[0]  # -1: an empty slot, allowed
    assert masks.shape == (1, 3, 90, 150)


def test_a_batch_refuses_other_labels_on_the_host_and_leaves_device_ones_unread():
    image = torch.zeros(1, 3, 16, 16)
    points = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match=rf"^SamBatch: point_labels must hold {WORDS}, got \[2, 3\]"):
        SamBatch(image=image, points=points, point_labels=torch.tensor([[2, 3]]))
    SamBatch(image=image, points=points, point_labels=torch.tensor([[1, -1]]))
    # on a device (meta here: its values cannot be read at all) nothing is read back: no wait
    meta = SamBatch(
        image=image.to("meta"), points=points.to("meta"), point_labels=torch.tensor([[2, 3]]).to("meta")
    )
    assert meta.point_labels.device.type == "meta"
    assert bad_point_labels(torch.tensor([[2]]).to("meta")) == []


class _CornerSampler(PromptSampler):
    """A third party's sampler that passes a box as SAM's corner points (labels 2 and 3)."""

    def __call__(self, mask, generator):
        return {"points": torch.tensor([[1.0, 1.0], [5.0, 6.0]]), "point_labels": torch.tensor([2, 3])}

    def __repr__(self) -> str:
        return "_CornerSampler()"


def test_a_sampler_drawing_other_labels_is_refused_naming_it_and_the_file(tmp_path):
    root = _pair(tmp_path / "ds")
    dataset = MaskFolderDataset(root, prompt=_CornerSampler(), img_size=16, prompt_seed=0)
    with pytest.raises(
        DataError, match=rf"_CornerSampler\(\) drew point_labels \[2, 3\] for .*a\.png.*{WORDS}"
    ):
        dataset[0]


def test_collate_refuses_items_with_other_labels(tmp_path):
    root = _pair(tmp_path / "ds")
    item = MaskFolderDataset(root, prompt="points", img_size=16, prompt_seed=0)[0]
    assert collate([item]).point_labels.tolist() == [[1]]
    item["point_labels"] = torch.tensor([2])
    with pytest.raises(ValueError, match="point_labels"):
        collate([item])
