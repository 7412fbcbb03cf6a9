"""MaskFolderDataset's frame of an 8-bit image resized as uint8 codes (then / 255) is the float path's
frame (read_image -> to_input_frame) to the bit, and mask_to_box's numpy path equals torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from samflow.data import MaskFolderDataset, mask_to_box
from samflow.data.reading import read_image
from samflow.data.transforms import to_input_frame

# (height, width, PIL mode): odd sizes, both orientations, already S x S, grey, palette, RGBA
FILES = [(97, 131, "RGB"), (150, 61, "L"), (128, 128, "RGB"), (33, 47, "P"), (80, 100, "RGBA")]


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, (h, w, mode) in enumerate(FILES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(
            tmp_path / "images" / f"{i}.png"
        )
        mask = (rng.random((h, w)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    return tmp_path


# bfloat16 with the "bilinear" resize is left out: torch's antialiased bilinear resize has no bfloat16
# CPU kernel (bfloat16 never takes the uint8 path; it is here to show the float path is untouched)
CASES = [
    (dtype, image_resize)
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
    for image_resize in ("sam", "bilinear")
    if not (dtype == torch.bfloat16 and image_resize == "bilinear")
]


@pytest.mark.parametrize(("dtype", "image_resize"), CASES)
@pytest.mark.parametrize("resize_mode", ["longest", "stretch"])
def test_dataset_frame_equals_the_float_path(folder, dtype, resize_mode, image_resize):
    dataset = MaskFolderDataset(
        folder, img_size=128, resize_mode=resize_mode, image_resize=image_resize, dtype=dtype
    )
    for index, sample in enumerate(dataset.samples):
        expected, input_size = to_input_frame(read_image(sample.image, dtype), 128, resize_mode, image_resize)
        item = dataset[index]
        assert item["image"].dtype == dtype and item["image"].shape == (3, 128, 128)
        assert torch.equal(item["image"], expected)
        assert not item["image"].signbit().any()  # the padding is +0.0, as F.pad's
        assert item["input_size"].tolist() == list(input_size)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.uint8])
def test_mask_to_box_equals_torchs_reductions(dtype):
    rng = np.random.default_rng(1)
    masks = [torch.zeros(7, 9, dtype=torch.bool), torch.from_numpy(rng.random((40, 33)) > 0.97)]
    one = torch.zeros(20, 30, dtype=torch.bool)
    one[3, 17] = True
    masks += [one, torch.from_numpy(rng.random((50, 60)) > 0.5).t()]  # a transposed (strided) view
    for mask in masks:
        mask = mask.to(dtype)
        rows = mask.any(dim=1).nonzero()
        if rows.numel() == 0:
            assert mask_to_box(mask) is None
            continue
        cols = mask.any(dim=0).nonzero()
        expected = torch.stack([cols[0, 0], rows[0, 0], cols[-1, 0], rows[-1, 0]]).float()
        box = mask_to_box(mask)
        assert box is not None and box.dtype == torch.float32 and torch.equal(box, expected)
    assert mask_to_box(one).tolist() == [17.0, 3.0, 17.0, 3.0]  # worked by hand: x = 17, y = 3
