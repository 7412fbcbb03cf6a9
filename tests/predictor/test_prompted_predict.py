"""``samflow predict --prompts FILE``: one mask per prompt, equal to ``Predictor.predict``; its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from samflow.cli import main
from samflow.predictor import Predictor
from samflow.prompt_files import read_prompts

BOX = [4, 6, 30, 24]
POINTS = [[10, 12], [20, 8]]


@pytest.fixture()
def images(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for stem, size in (("a", (40, 30)), ("b", (36, 44))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{stem}.png"
        )
    return folder


def prompts_json(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.json"
    prompts = {
        "a.png": [{"box": BOX}, {"points": POINTS, "labels": [1, 0]}],
        "b": [{"box": BOX, "points": [POINTS[0]]}],
    }
    path.write_text(json.dumps(prompts))
    return path


def expected(run: Path, image: Path, **prompt) -> tuple[np.ndarray, float]:
    predictor = Predictor.from_run(run, device="cpu")
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    masks, scores, _ = predictor.predict(multimask_output=False, **prompt)
    return masks[0], float(scores[0])


def test_json_prompts_give_one_mask_each_equal_to_predict(trained_run, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--prompts", str(prompts_json(tmp_path)), "--model", str(trained_run)]
    assert main([*args, "--images", str(images), "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a_0.png", "a_1.png", "b_0.png"]
    results = json.loads((out / "results.json").read_text())
    assert [(r["image_id"], r["file_name"]) for r in results] == [(1, "a.png"), (1, "a.png"), (2, "b.png")]
    cases = [
        (images / "a.png", {"box": np.array(BOX)}),
        (images / "a.png", {"point_coords": np.array(POINTS), "point_labels": np.array([1, 0])}),
        (
            images / "b.png",
            {"box": np.array(BOX), "point_coords": np.array([POINTS[0]]), "point_labels": np.array([1])},
        ),
    ]
    names = ["a_0.png", "a_1.png", "b_0.png"]
    for (image, prompt), name, result in zip(cases, names, results, strict=True):
        mask, score = expected(trained_run, image, **prompt)
        written = np.asarray(Image.open(out / "masks" / name)) > 0
        np.testing.assert_array_equal(written, mask)
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]).astype(bool), mask)
        assert result["score"] == pytest.approx(score, abs=1e-6)
    text = capsys.readouterr()
    assert f"outputs in {out.resolve()}" in text.out and "images/s" in text.out


def test_csv_and_coco_and_masks_read_the_same_prompts(images, tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text(
        "image,instance,kind,x,y,x1,y1\na.png,0,box,4,6,30,24\na.png,1,point,10,12,,\na.png,1,neg,20,8,,\n"
    )
    (entry,) = read_prompts(csv_file, images)
    np.testing.assert_array_equal(entry.prompts[0].box, BOX)
    np.testing.assert_array_equal(entry.prompts[1].points, POINTS)
    np.testing.assert_array_equal(entry.prompts[1].labels, [1, 0])
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {
                "id": 3,
                "image_id": 7,
                "category_id": 2,
                "bbox": [4, 6, 26, 18],
                "iscrowd": 0,
                "segmentation": [[4, 6, 30, 6, 30, 24, 4, 24]],
                "area": 468,
            },
        ],
        "categories": [{"id": 2, "name": "cell"}],
    }
    coco_file = tmp_path / "coco.json"
    coco_file.write_text(json.dumps(coco))
    (entry,) = read_prompts(coco_file, images)
    assert entry.image_id == 7 and entry.prompts[0].category_id == 2
    np.testing.assert_array_equal(entry.prompts[0].box, BOX)
    (entry,) = read_prompts(coco_file, images, derive="points", points=5, seed=1)
    # the polygon is the box [4, 30] x [6, 24]
    pts = entry.prompts[0].points
    assert pts.shape == (5, 2) and (pts[:, 0] >= 4).all() and (pts[:, 0] <= 30).all()
    assert (pts[:, 1] >= 6).all() and (pts[:, 1] <= 24).all()
    masks = tmp_path / "gt"
    masks.mkdir()
    label = np.zeros((30, 40), np.uint8)
    label[6:25, 4:31] = 1
    label[2:5, 1:3] = 9
    Image.fromarray(label).save(masks / "a.png")
    (entry,) = read_prompts(masks, images)
    assert [p.box.tolist() for p in entry.prompts] == [BOX, [1, 2, 2, 4]]


def test_labels_format_holds_the_higher_scoring_prompt(trained_run, images, tmp_path):
    out = tmp_path / "out"
    args = [
        "predict",
        "--prompts",
        str(prompts_json(tmp_path)),
        "--model",
        str(trained_run),
        "--format",
        "labels",
    ]
    assert main([*args, "--images", str(images), "--out", str(out), "--device", "cpu"]) == 0
    label = np.asarray(Image.open(out / "labels" / "a.png"))
    m0, s0 = expected(trained_run, images / "a.png", box=np.array(BOX))
    m1, s1 = expected(
        trained_run, images / "a.png", point_coords=np.array(POINTS), point_labels=np.array([1, 0])
    )
    want = np.zeros(m0.shape, np.uint16)
    first, second = ((m0, 1), (m1, 2)) if s0 >= s1 else ((m1, 2), (m0, 1))
    want[second[0]] = second[1]
    want[first[0]] = first[1]
    np.testing.assert_array_equal(label, want)


def test_refusals_and_skip_bad(trained_run, images, tmp_path, capsys):
    prompts = prompts_json(tmp_path)
    base = [
        "predict",
        "--prompts",
        str(prompts),
        "--model",
        str(trained_run),
        "--images",
        str(images),
        "--device",
        "cpu",
    ]
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert main([*base, "--out", str(images)]) == 1
    assert main([*base, "--out", str(images / "sub")]) == 1
    assert "would write into the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--out", str(out)]) == 1
    assert "exist already" in capsys.readouterr().err
    (images / "b.png").write_bytes(b"not a png")
    assert main([*base, "--out", str(out), "--overwrite"]) == 1
    assert "b.png" in capsys.readouterr().err
    assert not (out / "results.json").exists()  # the stopped --overwrite run left no earlier results
    assert main([*base, "--out", str(out), "--overwrite", "--skip-bad"]) == 0
    text = capsys.readouterr()
    assert "skipped 1 unreadable (1 prompts not predicted; listed in" in text.out and "b.png" in text.err
    assert [r["file_name"] for r in json.loads((out / "results.json").read_text())] == ["a.png", "a.png"]
    # nothing is lost silently: the skipped image is listed with its id, prompt count and the error
    (record,) = json.loads((out / "skipped.json").read_text())
    assert record["file_name"] == "b.png" and record["path"] == str(images / "b.png")
    assert record["image_id"] == 2 and record["prompts"] == 1 and "Error" in record["error"]
    # every prompt of the file is either in results.json or counted in skipped.json
    total = sum(len(v) for v in json.loads(prompts.read_text()).values())
    assert len(json.loads((out / "results.json").read_text())) + record["prompts"] == total


def test_tiled_prompts_equal_predict_tiled(trained_run, images, tmp_path):
    out = tmp_path / "out"
    args = ["predict", "--prompts", str(prompts_json(tmp_path)), "--model", str(trained_run), "--tile", "32"]
    assert main([*args, "--images", str(images), "--out", str(out), "--device", "cpu"]) == 0
    predictor = Predictor.from_run(trained_run, device="cpu")
    image = np.asarray(Image.open(images / "a.png").convert("RGB"))  # 40 x 30: two 32 px windows across
    masks, scores = predictor.predict_tiled(image, boxes=np.array([BOX]), tile=32)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "a_0.png")) > 0, masks[0, 0])
    masks, _ = predictor.predict_tiled(
        image, point_coords=np.array([POINTS]), point_labels=np.array([[1, 0]]), tile=32
    )
    np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / "a_1.png")) > 0, masks[0, 0])
    results = json.loads((out / "results.json").read_text())
    assert results[0]["score"] == pytest.approx(float(scores[0, 0]), abs=1e-6)


def test_the_mask_folder_of_mask_prompts_is_never_written(trained_run, images, tmp_path, capsys):
    """Predicting into the folder the prompts come from (masks/, as the issue found) is refused."""
    masks = tmp_path / "masks"
    masks.mkdir()
    label = np.zeros((30, 40), np.uint8)
    label[6:25, 4:31] = 1
    Image.fromarray(label).save(masks / "a.png")
    before = (masks / "a.png").read_bytes()
    base = ["predict", "--prompts", str(masks), "--model", str(trained_run), "--images", str(images)]
    for out in (masks, masks / "pred", tmp_path):  # the folder itself, inside it, a folder holding it
        assert main([*base, "--out", str(out), "--device", "cpu", "--overwrite"]) == 1
        assert "would write into the input" in capsys.readouterr().err
    assert sorted(p.name for p in masks.iterdir()) == ["a.png"] and (masks / "a.png").read_bytes() == before


def test_derive_and_points_are_refused_for_json_and_csv_prompts(images, tmp_path, capsys):
    """--derive / --points apply to COCO and mask prompts; a JSON or CSV file's own prompts are used."""
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("image,instance,kind,x,y,x1,y1\na.png,0,box,4,6,30,24\n")
    for prompts, kind in ((prompts_json(tmp_path), "JSON"), (csv_file, "CSV")):
        base = [
            "predict",
            "--prompts",
            str(prompts),
            "--model",
            str(tmp_path / "run"),
            "--images",
            str(images),
        ]
        assert main([*base, "--out", str(tmp_path / "out"), "--derive", "points", "--points", "5"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"--derive and --points apply to COCO and mask prompts only; {prompts} is a {kind}" in err
        assert main([*base, "--out", str(tmp_path / "out"), "--points", "3"]) == 1
        assert "drop --points." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), [("--tile", "-5"), ("--tile", "0"), ("--points", "0")])
def test_sizes_below_one_are_refused(images, tmp_path, capsys, flag, value):
    args = ["predict", "--prompts", str(prompts_json(tmp_path)), "--model", str(tmp_path / "run")]
    assert main([*args, "--images", str(images), "--out", str(tmp_path / "out"), flag, value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"samflow predict: argument {flag}: must be an integer >= 1, got {value}" in err
    assert "overlap" not in err
