"""The default image resize is segment-anything's own (ResizeLongestSide.apply_image), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from samflow.data import MaskFolderDataset
from samflow.data.transforms import longest_side_shape, resize_longest_side, sam_resize


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("height", "width", "size"), [(90, 150, 128), (300, 200, 128), (50, 70, 128), (40, 40, 64)]
)
def test_equals_resize_longest_side_apply_image(height, width, size):
    img = rgb(height, width)
    ref = torch.from_numpy(ResizeLongestSide(size).apply_image(img)).permute(2, 0, 1)
    shape = longest_side_shape(height, width, size)
    pixels = torch.from_numpy(img).permute(2, 0, 1)
    assert torch.equal(sam_resize(pixels, shape), ref)  # uint8 in, uint8 out
    for dtype in (torch.float32, torch.float64):  # 8-bit values as read_image gives them: k / 255
        out = sam_resize(pixels.to(dtype) / 255, shape)
        assert out.dtype == dtype
        assert torch.equal(out, ref.to(dtype) / 255)
    batch = sam_resize(torch.stack([pixels, pixels.flip(-1)]), shape)
    assert torch.equal(batch[0], ref)
    # the fast path stays within one grey level, and is not the same
    fast = resize_longest_side(pixels.float() / 255, size) * 255
    assert (fast - ref).abs().max() <= 1.0 + 1e-4 and not torch.equal(fast.round().byte(), ref)


def test_images_that_are_not_8_bit_keep_their_precision():
    image = torch.rand(3, 90, 150, dtype=torch.float64)  # e.g. a 16-bit file, value / 65535
    out = sam_resize(image, (77, 128))
    assert out.dtype == torch.float64 and out.shape == (3, 77, 128)
    assert not torch.equal(out * 255, (out * 255).round())  # not quantised to 8 bits
    eight_bit = sam_resize((image * 255).round().to(torch.uint8), (77, 128)).double() / 255
    assert (out - eight_bit).abs().max() < 2 / 255  # same filter


def test_dataset_default_is_sams_resize(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = rgb(90, 150, seed=3)
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    mask = np.zeros((90, 150), dtype=np.uint8)
    mask[20:60, 30:100] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    item = MaskFolderDataset(tmp_path, img_size=128)[0]
    ref = ResizeLongestSide(128).apply_image(img)  # (77, 128, 3)
    expected = torch.zeros(3, 128, 128)
    expected[:, :77] = torch.from_numpy(ref).permute(2, 0, 1).float() / 255
    assert torch.equal(item["image"], expected)
    fast = MaskFolderDataset(tmp_path, img_size=128, image_resize="bilinear")[0]["image"]
    assert 0 < (fast - expected).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="image_resize"):
        MaskFolderDataset(tmp_path, img_size=128, image_resize="bicubic")  # type: ignore[arg-type]
