"""``samflow predict --prompts``: a prompt that is not on its image (outside it, not finite, a box with
reversed corners, a COCO size or a mask of another size) is refused before anything is predicted or
written, naming the file, the entry (JSON key, CSV line, COCO annotation, mask value) and the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samflow.cli import main
from samflow.prompt_files import PromptFileError, read_prompts

WIDTH, HEIGHT = 40, 30


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


BAD_JSON = {  # prompt -> what the error says
    "a box off the image": (
        {"box": [100, 100, 200, 200]},
        r"point \(100, 100\) lies outside the image a\.png \(40 x 30",
    ),
    "a box past the right edge": ({"box": [10, 5, 45, 20]}, r"point \(45, 20\) lies outside"),
    "a point below the image": ({"points": [[10, 5], [20, 31.5]]}, r"point \(20, 31\.5\) lies outside"),
    "a negative point": ({"points": [[-3, 5]]}, r"point \(-3, 5\) lies outside"),
    "a box of width and height": ({"box": [30, 20, 4, 6]}, r"x1 < x0 or y1 < y0"),
    "a NaN box": ({"box": [float("nan"), 1, 2, 3]}, r"'box' must hold finite numbers"),
    "an infinite point": ({"points": [[float("inf"), 1]]}, r"'points' must hold finite numbers"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_a_json_prompt_not_on_its_image_is_refused_naming_the_entry(images, tmp_path, case):
    prompt, message = BAD_JSON[case]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": [{"box": [1, 1, 10, 10]}, prompt]}))
    with pytest.raises(PromptFileError, match=rf"^{path} \['a\.png'\]\[1\]: .*{message}") as caught:
        read_prompts(path, images)
    assert "\n" not in str(caught.value)


def test_prompts_on_the_edges_are_kept(images, tmp_path):
    """A COCO box ends at the width (x + w = W), a point on the last pixel: both on the image; a
    coordinate within EDGE (1 px) of it is rounding in the file."""
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": [{"box": [0, 0, WIDTH, HEIGHT]}, {"points": [[40.5, -0.5]]}]}))
    (entry,) = read_prompts(path, images)
    assert len(entry.prompts) == 2


def test_a_csv_prompt_outside_its_image_names_its_lines(images, tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(
        "image,instance,kind,x,y,x1,y1\na.png,0,box,1,1,10,10\na.png,1,point,5,5,,\na.png,1,neg,5,90,,\n"
    )
    with pytest.raises(
        PromptFileError, match=rf"^{path} lines 3, 4 \(image 'a\.png', instance '1'\): .*\(5, 90\)"
    ):
        read_prompts(path, images)
    path.write_text("image,instance,kind,x,y,x1,y1\na.png,0,box,nan,1,inf,3\n")
    with pytest.raises(PromptFileError, match=rf"^{path} line 2 .*finite"):
        read_prompts(path, images)


def coco(tmp_path: Path, bbox: list[float], width: int = WIDTH, height: int = HEIGHT) -> Path:
    path = tmp_path / "coco.json"
    image = {"id": 7, "file_name": "a.png", "width": width, "height": height}
    annotation = {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": bbox}
    path.write_text(json.dumps({"images": [image], "annotations": [annotation]}))
    return path


def test_coco_boxes_outside_or_a_coco_size_not_the_images_are_refused(images, tmp_path):
    with pytest.raises(PromptFileError, match=r"annotation 3 of image 7: the point \(50, 12\) lies outside"):
        read_prompts(coco(tmp_path, [30, 2, 20, 10]), images)
    with pytest.raises(PromptFileError, match=r"annotation 3 of image 7 .*negative width"):
        read_prompts(coco(tmp_path, [30, 2, -20, 10]), images)
    # prompts drawn for an 80 x 60 version of the image: inside that frame, misplaced on this one
    with pytest.raises(
        PromptFileError, match=r"a\.png: the prompt file gives it 80 x 60 .* the image is 40 x 30"
    ):
        read_prompts(coco(tmp_path, [5, 5, 10, 10], 80, 60), images)
    assert len(read_prompts(coco(tmp_path, [30, 2, 10, 28]), images)[0].prompts) == 1  # to the edges


def test_a_mask_of_another_size_is_refused(images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    label = np.zeros((HEIGHT * 2, WIDTH * 2), np.uint8)
    label[10:20, 10:20] = 1
    Image.fromarray(label).save(masks / "a.png")
    with pytest.raises(PromptFileError, match=r"gives it 80 x 60 .* the image is 40 x 30"):
        read_prompts(masks, images)


def test_the_command_refuses_before_writing_anything(images, tmp_path, capsys):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": [{"box": [1, 1, 10, 10]}, {"box": [100, 100, 200, 200]}]}))
    out = tmp_path / "out"
    args = ["predict", "--prompts", str(path), "--model", str(tmp_path / "no_run"), "--images", str(images)]
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "['a.png'][1]" in err and "lies outside the image a.png" in err
    assert not out.exists()


def _sideways(image: np.ndarray, path: Path) -> None:
    """Save ``image`` (H, W[, 3]) stored turned 90 degrees counter-clockwise with EXIF orientation 6, so
    that viewers (and samflow's reading) show it as ``image``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(image))).save(path, exif=exif)


def test_prompts_and_mask_prompts_are_in_the_frame_of_the_image_as_shown(tmp_path):
    """A phone photo stored sideways is read upright (samflow.data.reading), so its prompts are checked
    against, and mask prompts derived in, the upright frame."""
    folder = tmp_path / "images"
    folder.mkdir()
    shown = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    _sideways(shown, folder / "a.jpg")  # stored 30 wide, 40 high; shown 40 x 30
    source = tmp_path / "prompts.json"
    source.write_text(json.dumps({"a.jpg": [{"box": [2, 3, 38, 28]}]}))  # fits only the upright frame
    (entry,) = read_prompts(source, folder)
    assert entry.prompts[0].box.tolist() == [2, 3, 38, 28]
    masks = tmp_path / "masks"
    masks.mkdir()
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    label[4:9, 20:35] = 7  # rows 4..8, columns 20..34 as shown
    _sideways(label, masks / "a.png")
    (entry,) = read_prompts(masks, folder)
    assert entry.prompts[0].box.tolist() == [20, 4, 34, 8]


def test_a_mask_folder_is_read_without_a_warning(tmp_path):
    """Mask prompts come from a writable copy of the file's pixels: no "non-writable array" warning."""
    import warnings

    from PIL import Image

    folder, masks = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "a.png")
    label = np.zeros((20, 30), np.uint8)
    label[2:6, 3:9] = 4
    Image.fromarray(label).save(masks / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (entry,) = read_prompts(masks, folder)
    assert entry.prompts[0].box.tolist() == [3, 2, 8, 5]
