"""README "From the command line: prompts from a file": a JSON prompt's optional ``id`` (and a CSV row's
``instance``) names the prompt in ``results.json``; ``skipped.json`` is ``[]`` when no image was skipped;
``--derive points`` draws ``--points N`` pixels inside each instance, seeded by ``--seed`` (COCO file and
mask folder alike)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samflow.cli import main
from samflow.prompt_files import read_prompts

_spec = importlib.util.spec_from_file_location(
    "predictor_conftest", Path(__file__).parent / "predictor" / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _conftest.make_run(
        tmp_path_factory.mktemp("cli"), {"decoder": _conftest.PLUGINS["decoder"]}, steps=1
    )


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        folder / "a.png"
    )
    return folder


def test_ids_name_the_prompts_in_results_and_skipped_json_lists_none(run, images, tmp_path):
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps({"a": [{"box": [4, 6, 30, 24], "id": "cell-7"}, {"points": [[10, 12]]}]}))
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("image,instance,kind,x,y,x1,y1\na.png,n1,box,4,6,30,24\na.png,n2,point,10,12,,\n")
    base = ["predict", "--model", str(run), "--images", str(images), "--device", "cpu"]
    for prompts, names in ((json_file, ["cell-7", ""]), (csv_file, ["n1", "n2"])):
        out = tmp_path / prompts.suffix[1:]
        assert main([*base, "--prompts", str(prompts), "--out", str(out)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert [r["instance"] for r in results] == names
        assert json.loads((out / "skipped.json").read_text()) == []


def test_derived_points_are_seeded_by_seed(images, tmp_path):
    label = np.zeros((30, 40), np.uint8)
    label[5:25, 3:35] = 1
    masks = tmp_path / "gt"
    masks.mkdir()
    Image.fromarray(label).save(masks / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 5, 32, 20], "iscrowd": 0,
             "segmentation": [[3, 5, 35, 5, 35, 25, 3, 25]], "area": 640},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }  # fmt: skip
    coco_file = tmp_path / "coco.json"
    coco_file.write_text(json.dumps(coco))
    for source in (coco_file, masks):

        def points(seed: int, source=source) -> np.ndarray:
            (entry,) = read_prompts(source, images, derive="points", points=6, seed=seed)
            return entry.prompts[0].points

        first = points(0)
        assert first.shape == (6, 2)
        assert (first[:, 0] >= 3).all() and (first[:, 0] <= 35).all()
        assert (first[:, 1] >= 5).all() and (first[:, 1] <= 25).all()
        np.testing.assert_array_equal(points(0), first)  # the same seed, the same pixels
        assert not np.array_equal(points(1), first)  # another seed, others


def test_an_out_that_holds_an_input_is_refused_before_anything_runs(run, tmp_path, capsys):
    """``--out`` the folder above the images (whose folder is named ``masks``, as the outputs' is) or above
    the prompt file: refused in one line, nothing written."""
    images = tmp_path / "masks"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        images / "a.png"
    )
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [4, 6, 30, 24]}]}))
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    shutil.copytree(images, elsewhere / "images")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    base = ["predict", "--model", str(run), "--prompts", str(prompts), "--device", "cpu"]
    capsys.readouterr()
    for images_dir in (images, elsewhere / "images"):  # the images' folder; the prompt file's folder
        assert main([*base, "--images", str(images_dir), "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and "input" in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_outputs_of_these_images_in_the_other_format_are_refused_unless_overwrite(
    run, images, tmp_path, capsys
):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [4, 6, 30, 24]}]}))
    out = tmp_path / "out"
    base = [
        "predict",
        "--model",
        str(run),
        "--images",
        str(images),
        "--prompts",
        str(prompts),
        "--device",
        "cpu",
    ]
    assert main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--format", "labels"]) == 1
    assert "exist already" in capsys.readouterr().err and not (out / "labels").exists()
    (out / "results.json").unlink()
    (out / "skipped.json").unlink()
    assert main([*base, "--out", str(out), "--format", "labels"]) == 1  # the masks alone are enough
    assert main([*base, "--out", str(out), "--format", "labels", "--overwrite"]) == 0
    assert (out / "labels" / "a.png").is_file() and not list((out / "masks").iterdir())
    capsys.readouterr()
    assert main([*base, "--out", str(out)]) == 1  # and the other way round
    assert "exist already" in capsys.readouterr().err
