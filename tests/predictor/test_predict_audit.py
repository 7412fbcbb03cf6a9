"""Prediction paths against what the README promises: tiled prompts at the image's edge, two images
with one stem, and prompt files that cannot be used (one error naming the file, not a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samflow import Predictor
from samflow.cli import main
from samflow.prompt_files import PromptFileError, read_prompts
from samflow.sam import HookedSam


@pytest.fixture
def predictor(tiny_sam):
    return Predictor(HookedSam(tiny_sam), device="cpu")


def image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---- predict_tiled: a prompt that reaches the image's edge ----
def test_a_box_to_the_image_edge_fits_the_window_that_ends_there(predictor):
    """A COCO box ``[x, y, x + w, y + h]`` of an object touching the right / bottom edge ends at W / H
    (the frame SAM's coordinates live in is [0, W] x [0, H]): the window ending at the edge holds it,
    and an image in one window still gives ``predict``'s result."""
    img = image(30, 40)
    box = np.array([4.0, 6.0, 40.0, 30.0])  # bbox [4, 6, 36, 24] of an object touching two edges
    logits, scores = predictor.predict_tiled(img, box[None], return_logits=True)  # one 128 px window
    predictor.set_image(img)
    ref, ref_scores, _ = predictor.predict(box=box, multimask_output=None, return_logits=True)
    np.testing.assert_allclose(logits[0], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores[0], ref_scores, atol=1e-5, rtol=0)
    # 32 px windows at x 0 and 8: the box [20, 6, 40, 30] lies in the second, which ends at x = 40
    edge = np.array([[20.0, 6.0, 40.0, 30.0]])
    logits, _ = predictor.predict_tiled(img, edge, tile=32, overlap=8, return_logits=True)
    window = predictor.encode(np.ascontiguousarray(img[:30, 8:40]))
    alone = predictor.predict(
        box=edge[0] - [8, 0, 8, 0], multimask_output=None, return_logits=True, encoding=window
    )[0]
    np.testing.assert_allclose(logits[0, :, :, 8 + 8 :], alone[:, :, 8:], atol=1e-5, rtol=0)


def test_prompts_tiled_in_a_window_larger_than_the_image_equal_the_untiled_run(trained_run, tmp_path):
    """``--tile N`` on images that fit in one window: the masks and scores of the run without it, also
    for boxes to the image's edges (a COCO bbox of an object touching them) and prompts batched per window."""
    images = write_images(tmp_path / "images", ["a.png"])
    prompts = tmp_path / "p.json"
    listed = [[4, 6, 30, 24], [0, 0, 40, 30], [10, 3, 22, 29]]
    prompts.write_text(
        json.dumps(
            {"a.png": [*({"box": b} for b in listed), {"points": [[10, 12], [20, 8]], "labels": [1, 0]}]}
        )
    )
    base = ["predict", "--prompts", str(prompts), "--model", str(trained_run), "--images", str(images)]
    assert main([*base, "--out", str(tmp_path / "plain"), "--device", "cpu"]) == 0
    assert main([*base, "--out", str(tmp_path / "tiled"), "--tile", "64", "--device", "cpu"]) == 0
    for k in range(4):
        plain, tiled = (
            np.asarray(Image.open(tmp_path / d / "masks" / f"a_{k}.png")) for d in ("plain", "tiled")
        )
        np.testing.assert_array_equal(tiled, plain)
    plain, tiled = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("plain", "tiled"))
    assert [r["score"] for r in tiled] == pytest.approx([r["score"] for r in plain], abs=1e-5)


# ---- samflow predict --prompts: one output per prompt, never two images into one file ----
def write_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_two_images_with_one_stem_are_refused_before_anything_runs(trained_run, tmp_path, capsys):
    """``x.png`` and ``x.jpg`` would both write ``masks/x_0.png`` (and ``labels/x.png``): refused, naming
    both, before the model is loaded; so is one image listed twice (by name and by stem)."""
    images = write_images(tmp_path / "images", ["x.png", "x.jpg"])
    prompts = tmp_path / "prompts.json"
    base = ["predict", "--prompts", str(prompts), "--model", str(trained_run), "--images", str(images)]
    prompts.write_text(json.dumps({"x.png": [{"box": [1, 1, 20, 20]}], "x.jpg": [{"box": [5, 5, 30, 25]}]}))
    for fmt in ("instances", "labels"):
        out = tmp_path / f"out_{fmt}"
        assert main([*base, "--out", str(out), "--format", fmt, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "x.png" in err and "x.jpg" in err, err
        assert not out.exists()
    single = write_images(tmp_path / "single", ["y.png"])
    prompts.write_text(json.dumps({"y.png": [{"box": [1, 1, 20, 20]}], "y": [{"box": [5, 5, 30, 25]}]}))
    args = ["predict", "--prompts", str(prompts), "--model", str(trained_run), "--images", str(single)]
    assert main([*args, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "y.png" in err and "twice" in err, err
    assert not (tmp_path / "o").exists()


def test_an_out_that_is_a_file_is_refused_before_anything_runs(trained_run, tmp_path, capsys):
    images = write_images(tmp_path / "images", ["a.png"])
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [1, 1, 20, 20]}]}))
    out = tmp_path / "out.txt"
    out.write_text("notes")
    base = ["predict", "--prompts", str(prompts), "--model", str(trained_run), "--images", str(images)]
    assert main([*base, "--out", str(out), "--device", "cpu", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err == f"samflow: error: --out {str(out)!r} is a file, not a folder; choose a folder.\n"
    assert out.read_text() == "notes"


def test_a_stem_two_images_share_is_ambiguous(tmp_path):
    """A prompt file naming ``x`` or a mask ``x.png`` when the images are ``x.png`` and ``x.jpg``: which
    image is meant is refused by name, not settled silently (the other image skipped)."""
    images = write_images(tmp_path / "images", ["x.png", "x.jpg", "z.png"])
    by_stem = tmp_path / "p.json"
    by_stem.write_text(json.dumps({"x": [{"box": [1, 1, 20, 20]}]}))
    with pytest.raises(PromptFileError, match=r"'x'.*x\.jpg.*x\.png"):
        read_prompts(by_stem, images)
    masks = tmp_path / "masks"
    masks.mkdir()
    label = np.zeros((30, 40), np.uint8)
    label[5:20, 5:20] = 1
    Image.fromarray(label).save(masks / "x.png")
    Image.fromarray(label).save(masks / "z.png")
    with pytest.raises(PromptFileError, match=r"x\.jpg.*x\.png"):
        read_prompts(masks, images)
    by_name = tmp_path / "q.json"
    by_name.write_text(json.dumps({"x.jpg": [{"box": [1, 1, 20, 20]}], "z": [{"box": [1, 1, 9, 9]}]}))
    assert [e.image.name for e in read_prompts(by_name, images)] == ["x.jpg", "z.png"]  # names are fine


# ---- prompt files that cannot be used ----
BAD_JSON = {
    "prompts not a list": {"a.png": {"box": [1, 2, 3, 4]}},
    "a prompt not an object": {"a.png": [[1, 2, 3, 4]]},
    "a box of words": {"a.png": [{"box": ["left", 2, 3, 4]}]},
    "points of three numbers": {"a.png": [{"points": [[1, 2, 3]]}]},
    "no points at all": {"a.png": [{"points": []}]},
    "labels of words": {"a.png": [{"points": [[1, 2]], "labels": ["fg"]}]},
    "a label SAM reads as a box corner": {"a.png": [{"points": [[1, 2]], "labels": [2]}]},
    "a category of words": {"a.png": [{"box": [1, 2, 3, 4], "category_id": "cell"}]},
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_a_bad_json_prompt_file_is_one_error_naming_it(tmp_path, case):
    images = write_images(tmp_path / "images", ["a.png"])
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(BAD_JSON[case]))
    with pytest.raises(PromptFileError, match=str(path)):
        read_prompts(path, images)


@pytest.mark.parametrize(
    "text",
    [
        "image,instance,kind,x,y,x1,y1\na.png,0\n",  # a short row: no kind
    ],
)
def test_a_bad_csv_prompt_file_is_one_error_naming_it(tmp_path, text):
    images = write_images(tmp_path / "images", ["a.png"])
    path = tmp_path / "prompts.csv"
    path.write_text(text)
    with pytest.raises(PromptFileError, match=rf"{path} line 2"):
        read_prompts(path, images)


@pytest.mark.parametrize(
    ("annotation", "derive"),
    [
        ({"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0}, "box"),  # no bbox
        ({"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 3]}, "box"),
        ({"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [1, 2, 3, 4]}, "points"),
    ],
)
def test_a_bad_coco_prompt_file_is_one_error_naming_it(tmp_path, annotation, derive):
    images = write_images(tmp_path / "images", ["a.png"])
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [annotation],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(PromptFileError, match=str(path)):
        read_prompts(path, images, derive=derive)


@pytest.mark.parametrize("name", ["prompts.json", "prompts.csv", "masks/a.png"])
def test_a_prompt_file_that_is_not_text_or_a_mask_is_one_error_naming_it(tmp_path, name):
    images = write_images(tmp_path / "images", ["a.png"])
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(PromptFileError, match=str(path)):
        read_prompts(path if path.suffix != ".png" else path.parent, images)


# ---- what the README says of the outputs of samflow predict --prompts ----
def test_coco_prompts_give_results_coco_load_res_reads_and_16_bit_labels(trained_run, tmp_path):
    """``results.json`` keeps COCO's image and category ids and ``COCO.loadRes`` reads it; ``--format
    labels`` writes 16-bit label images."""
    from pycocotools.coco import COCO

    images = write_images(tmp_path / "images", ["a.png"])
    box = {"iscrowd": 0, "image_id": 7, "area": 100, "segmentation": [[4, 6, 30, 6, 30, 24, 4, 24]]}
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {**box, "id": 3, "category_id": 2, "bbox": [4, 6, 26, 18]},
            {**box, "id": 4, "category_id": 5, "bbox": [0, 0, 40, 30]},  # to the image's edges
        ],
        "categories": [{"id": 2, "name": "cell"}, {"id": 5, "name": "dish"}],
    }
    gt_file = tmp_path / "coco.json"
    gt_file.write_text(json.dumps(coco))
    base = ["predict", "--prompts", str(gt_file), "--model", str(trained_run), "--images", str(images)]
    assert main([*base, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    gt = COCO(str(gt_file))
    dt = gt.loadRes(str(tmp_path / "out" / "results.json"))
    assert sorted((a["image_id"], a["category_id"]) for a in dt.dataset["annotations"]) == [(7, 2), (7, 5)]
    assert main([*base, "--out", str(tmp_path / "labels"), "--format", "labels", "--device", "cpu"]) == 0
    label = Image.open(tmp_path / "labels" / "labels" / "a.png")
    assert label.mode.startswith("I;16") and label.size == (40, 30)


# ---- samflow predict (Lightning): an image's mask does not depend on its batch or the loader ----
def test_lightning_predict_is_the_same_alone_in_a_batch_and_with_workers(tmp_path):
    from lightning.pytorch import Trainer

    from samflow.data import SegmentationDataModule
    from samflow.module import SamflowModule, SamSpec
    from samflow_plugins.tokens import ExtraTokens

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    for k, (width, height) in enumerate([(40, 30), (64, 20), (25, 50), (33, 33)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            root / "images" / f"{k}.png"
        )
        mask = np.zeros((height, width), np.uint8)
        mask[2 + k : height // 2 + k, 3 : width - 2 - k] = 255
        Image.fromarray(mask).save(root / "masks" / f"{k}.png")
    torch_module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"tokens": ExtraTokens(predict=True)}, losses={"bce": 1.0}
    ).eval()

    def probabilities(batch_size: int, workers: int) -> dict[str, np.ndarray]:
        data = SegmentationDataModule(
            predict=str(root), img_size=128, batch_size=batch_size, num_workers=workers
        )
        trainer = Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        batches = trainer.predict(torch_module, datamodule=data)
        return {i: p.numpy() for b in batches for i, p in zip(b["id"], b["probs"], strict=True)}

    alone = probabilities(1, 0)
    assert sorted(alone) == ["0", "1", "2", "3"]
    for batch_size, workers in ((3, 0), (4, 0), (1, 2), (3, 2)):
        other = probabilities(batch_size, workers)
        assert sorted(other) == sorted(alone)
        for key, prob in alone.items():
            np.testing.assert_allclose(
                other[key], prob, atol=1e-5, rtol=0, err_msg=f"{key} {batch_size} {workers}"
            )
