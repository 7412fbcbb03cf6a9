"""float64 end to end: nothing in the data path casts images, masks or prompts to float32 (issue 8, part 6).

A float64 dataset gives float64 items, ``collate`` a float64 ``SamBatch`` and ``GpuAugment`` keeps it,
with values exact to 1e-12 where float32 would be off by ~1e-8; samplers and geometry helpers given
float64 tensors return float64.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from samflow.batch import SamBatch
from samflow.data import (
    BoxPrompt,
    GpuAugment,
    MaskFolderDataset,
    MixedPrompt,
    NoisyMaskPrompt,
    PointPrompt,
    collate,
    mask_to_box,
    pad_to_square,
    read_image,
    resize_longest_side,
    scale_boxes,
    scale_coords,
    stretch,
    to_input_frame,
)

F64 = torch.float64
FLOAT_FIELDS = ("image", "mask", "points", "box", "mask_prompt")


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.fixture
def wide(tmp_path: Path, pngs: SimpleNamespace) -> Path:
    """One 100 x 200 pair, grey level 100, square object at columns 50..69, rows 20..39."""
    pngs.image(tmp_path / "images" / "x.png", 100, 200, value=100)
    pngs.mask(tmp_path / "masks" / "x.png", 100, 200, (50, 20, 69, 39))
    return tmp_path


def test_read_image_in_float64_is_exact(wide: Path) -> None:
    image = read_image(wide / "images" / "x.png", F64)
    assert image.dtype == F64 and image.shape == (3, 100, 200)
    _exact(image, torch.full((3, 100, 200), 100 / 255, dtype=F64))
    assert abs(read_image(wide / "images" / "x.png")[0, 0, 0].item() - 100 / 255) > 1e-10  # float32 is not
    assert read_image(wide / "images" / "x.png").dtype == torch.float32  # the default
    assert read_image(wide / "images" / "x.png", "float64").dtype == F64  # a name, as a config gives it
    with pytest.raises(ValueError, match="floating torch dtype"):
        read_image(wide / "images" / "x.png", torch.long)
    with pytest.raises(ValueError, match="floating torch dtype"):
        MaskFolderDataset(wide, dtype="float46")


@pytest.mark.parametrize("prompt", ["box", {"name": "points", "positive": 3, "negative": 2}, "noisy_mask"])
def test_a_float64_dataset_gives_float64_items(wide: Path, prompt: object) -> None:
    item = MaskFolderDataset(wide, prompt=prompt, img_size=64, dtype=F64, prompt_seed=0)[0]
    ref = MaskFolderDataset(wide, prompt=prompt, img_size=64, prompt_seed=0)[0]  # float32, same prompts
    floats = [k for k in FLOAT_FIELDS if k in item]
    assert "image" in floats and "mask" in floats and len(floats) == 3  # image, mask and the prompt
    for key in floats:
        assert item[key].dtype == F64 and ref[key].dtype == torch.float32, key
        torch.testing.assert_close(item[key].float(), ref[key], rtol=1e-6, atol=1e-6)
    assert item["input_size"].dtype == torch.long and item["gt_original"].dtype == torch.bool
    if "point_labels" in item:
        assert item["point_labels"].dtype == torch.long and torch.equal(
            item["point_labels"], ref["point_labels"]
        )


def test_float64_values_are_exact_in_the_model_frame(tmp_path: Path, pngs: SimpleNamespace) -> None:
    # 12 x 16, S = 16: no resize, only padding, so the image keeps 100 / 255 exactly.
    pngs.pairs(tmp_path, ["a"], height=12, width=16, box=(2, 3, 6, 7))
    item = MaskFolderDataset(tmp_path, prompt="box", img_size=16, dtype=F64)[0]
    _exact(item["image"][:, :12], torch.full((3, 12, 16), 100 / 255, dtype=F64))
    assert (item["image"][:, 12:] == 0).all()
    # Box (50, 20, 69, 39) of a 100 x 200 image at S = 64: x * 64 / 200, y * 32 / 100, in float64.
    wide = tmp_path / "wide"
    pngs.image(wide / "images" / "x.png", 100, 200)
    pngs.mask(wide / "masks" / "x.png", 100, 200, (50, 20, 69, 39))
    box = MaskFolderDataset(wide, prompt="box", img_size=64, dtype=F64)[0]["box"]
    _exact(box, torch.tensor([50 * 0.32, 20 * 0.32, 69 * 0.32, 39 * 0.32], dtype=F64))
    assert abs(box[1].float().item() - 6.4) > 1e-8  # 6.4 is not a float32: it was not computed in one


def test_float64_items_collate_and_augment_as_float64(wide: Path) -> None:
    dataset = MaskFolderDataset(wide, prompt="box", img_size=64, dtype=F64)
    mixed = MaskFolderDataset(
        wide, prompt={"name": "points", "positive": 2}, img_size=64, dtype=F64, prompt_seed=1
    )
    noisy = MaskFolderDataset(wide, prompt="noisy_mask", img_size=64, dtype=F64, prompt_seed=2)
    batch = collate([dataset[0], mixed[0], noisy[0]])
    assert isinstance(batch, SamBatch)
    for name in FLOAT_FIELDS:
        assert getattr(batch, name).dtype == F64, name
    _exact(batch.box[0], dataset[0]["box"])
    out = GpuAugment(hflip=1.0)(batch)
    for name in FLOAT_FIELDS:
        assert getattr(out, name).dtype == F64, name
    _exact(out.image, batch.image.flip(-1))
    flipped = batch.box[0, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1], dtype=F64) + torch.tensor(
        [63, 0, 63, 0]
    )
    _exact(out.box[0], flipped)
    torch.manual_seed(0)
    out = GpuAugment(rotation=20, scale=(0.8, 1.2), color_jitter=0.2)(batch)
    assert all(getattr(out, name).dtype == F64 for name in FLOAT_FIELDS)
    moved = batch.to("cpu")  # Lightning's transfer keeps the dtype too
    assert all(getattr(moved, name).dtype == F64 for name in FLOAT_FIELDS)


def test_samplers_follow_the_mask_dtype() -> None:
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[4:10, 5:15] = True
    gen = torch.Generator().manual_seed(0)
    box = mask_to_box(mask.to(F64))
    assert box.dtype == F64 and box.tolist() == [5.0, 4.0, 14.0, 9.0]
    assert mask_to_box(mask).dtype == torch.float32  # bool masks: torch's default dtype
    assert BoxPrompt(jitter=0.2)(mask.to(F64), gen)["box"].dtype == F64
    assert BoxPrompt(empty="full")(torch.zeros(4, 5, dtype=F64), gen)["box"].dtype == F64
    points = PointPrompt(positive=2, negative=2)(mask.to(F64), gen)
    assert points["points"].dtype == F64 and points["point_labels"].tolist() == [1, 1, 0, 0]
    x, y = points["points"].long().unbind(-1)
    assert mask[y, x].tolist() == [True, True, False, False]  # a float mask's foreground is non-zero
    full = PointPrompt(positive=1, negative=1)(torch.ones(4, 4, dtype=F64), gen)  # padding slot too
    assert full["points"].dtype == F64 and full["point_labels"].tolist() == [1, -1]
    noisy = NoisyMaskPrompt(std=0.0)(mask.to(F64), gen)["mask_prompt"]
    assert torch.equal(noisy, mask)
    mixed = MixedPrompt(["box", "points"])
    assert all(v.dtype in (F64, torch.long) for s in range(6) for v in mixed(mask.to(F64), gen).values())


def test_samplers_follow_the_default_dtype_for_bool_masks() -> None:
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[4:10, 5:15] = True
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        gen = torch.Generator().manual_seed(0)
        assert mask_to_box(mask).dtype == F64 and BoxPrompt()(mask, gen)["box"].dtype == F64
        assert BoxPrompt(jitter=0.1)(mask, gen)["box"].dtype == F64
        assert PointPrompt(positive=1, negative=1)(mask, gen)["points"].dtype == F64
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(0)
    assert PointPrompt()(mask, gen)["points"].dtype == torch.float32


def test_geometry_helpers_keep_float64() -> None:
    image = torch.rand(3, 10, 30, dtype=F64)
    for out in (
        resize_longest_side(image, 16),
        stretch(image, 16),
        pad_to_square(resize_longest_side(image, 16), 16),
        to_input_frame(image, 16)[0],
        to_input_frame(image, 16, "stretch")[0],
        to_input_frame((image > 0.5).to(F64), 16, "longest", "nearest-exact")[0],
    ):
        assert out.dtype == F64
    assert to_input_frame(image > 0.5, 16, "longest", "nearest-exact")[0].dtype == torch.bool
    third = torch.tensor([[1 / 3, 2 / 3]], dtype=F64)
    _exact(scale_coords(third, (100, 50), (64, 32)), third * 0.64)
    boxes = torch.tensor([1 / 3, 1 / 7, 2.0, 3.0], dtype=F64)
    out = scale_boxes(boxes, (100, 200), (32, 64))
    assert out.dtype == F64
    _exact(out, boxes * 0.32)
