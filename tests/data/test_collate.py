"""``collate``: shapes, dtypes, padding and presence flags of the batch contract (a ``SamBatch``)."""

from __future__ import annotations

import pytest
import torch

from samflow.batch import SamBatch
from samflow.data import collate

S = 16


def _item(i: int, dtype: torch.dtype = torch.float32, **prompt: torch.Tensor) -> dict:
    return {
        "image": torch.rand(3, S, S, dtype=dtype),
        "mask": torch.zeros(1, S, S, dtype=dtype),
        "gt_original": torch.zeros(10 + i, 20, dtype=torch.bool),
        "input_size": torch.tensor([8, S]),
        "original_size": torch.tensor([10 + i, 20]),
        "id": f"s{i}",
        "path": f"/data/s{i}.png",
        **prompt,
    }


def test_shapes_padding_and_flags_with_mixed_prompts() -> None:
    items = [
        _item(0, points=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), point_labels=torch.tensor([1, 0])),
        _item(1, box=torch.tensor([1.0, 2.0, 5.0, 6.0])),
        _item(2, mask_prompt=torch.ones(1, S // 4, S // 4)),
        _item(3, points=torch.tensor([[7.0, 8.0]]), point_labels=torch.tensor([1])),
    ]
    batch = collate(items)
    assert isinstance(batch, SamBatch) and batch.num_images == 4 and batch.num_rows == 4
    assert batch.image_index.tolist() == [0, 1, 2, 3]  # one prompt row per image, in order
    assert batch.image.shape == (4, 3, S, S) and batch.image.dtype == torch.float32
    assert batch.mask.shape == (4, 1, S, S) and batch.mask.dtype == torch.float32
    assert batch.input_size.dtype == torch.long and batch.input_size.shape == (4, 2)
    assert batch.original_size[:, 0].tolist() == [10, 11, 12, 13]
    assert [g.shape for g in batch.gt_original] == [(10, 20), (11, 20), (12, 20), (13, 20)]
    assert batch.id == ["s0", "s1", "s2", "s3"] and batch.path[1] == "/data/s1.png"
    assert batch.points.shape == (4, 2, 2) and batch.point_labels.dtype == torch.long
    assert batch.point_labels.tolist() == [[1, 0], [-1, -1], [-1, -1], [1, -1]]
    assert batch.point_valid().tolist() == [[True, True], [False, False], [False, False], [True, False]]
    torch.testing.assert_close(batch.points[3, 0], torch.tensor([7.0, 8.0]))
    assert batch.box.shape == (4, 4) and batch.has_box.tolist() == [False, True, False, False]
    assert batch.box_valid().tolist() == [False, True, False, False]
    torch.testing.assert_close(batch.box[1], torch.tensor([1.0, 2.0, 5.0, 6.0]))
    assert batch.box[[0, 2, 3]].eq(0).all()  # rows without a box hold zeros
    assert batch.mask_prompt.shape == (4, 1, S // 4, S // 4)
    assert batch.has_mask_prompt.tolist() == [False, False, True, False]
    assert batch.mask_prompt[2].eq(1).all() and batch.mask_prompt[0].eq(0).all()


def test_prompt_fields_are_none_when_no_item_has_them() -> None:
    batch = collate([_item(0), _item(1, box=torch.zeros(4))])
    assert batch.box is not None and batch.has_box.tolist() == [False, True]
    assert batch.points is None and batch.point_labels is None and batch.point_valid() is None
    assert batch.mask_prompt is None and batch.has_mask_prompt is None and batch.mask_prompt_valid() is None
    batch = collate([_item(0), _item(1)])
    assert all(getattr(batch, name) is None for name in ("points", "point_labels", "box", "has_box"))


def test_items_without_masks() -> None:
    items = [_item(0), _item(1)]
    for item in items:
        del item["mask"], item["gt_original"]
    batch = collate(items)
    assert batch.mask is None and batch.gt_original is None
    with pytest.raises(ValueError, match=r"no ground-truth masks"):
        batch.row_mask  # noqa: B018  (losses need masks: the error says so)
    with pytest.raises(ValueError, match=r"items \['s1'\] have no mask"):
        collate([_item(0), items[1]])


def test_collate_refuses_empty_and_mixed_sizes() -> None:
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    small = _item(1)
    small["image"] = torch.rand(3, S // 2, S // 2)
    with pytest.raises(ValueError, match="different image shapes"):
        collate([_item(0), small])


def test_float64_items_collate_to_a_float64_batch() -> None:
    f64 = torch.float64
    third = 1 / 3  # not exact in float32: a cast anywhere would show at 1e-12
    items = [
        _item(0, f64, points=torch.tensor([[third, 2.0]], dtype=f64), point_labels=torch.tensor([1])),
        _item(1, f64, box=torch.tensor([third, 2.0, 5.0, 6.0], dtype=f64)),
        _item(2, f64, mask_prompt=torch.full((1, S // 4, S // 4), third, dtype=f64)),
    ]
    batch = collate(items)
    for name in ("image", "mask", "points", "box", "mask_prompt"):
        assert getattr(batch, name).dtype == f64, name
    assert batch.point_labels.dtype == torch.long and batch.has_box.dtype == torch.bool
    torch.testing.assert_close(batch.image[1], items[1]["image"], rtol=0, atol=1e-12)
    assert batch.points[0, 0, 0].item() == third and batch.box[1, 0].item() == third
    assert batch.mask_prompt[2, 0, 0, 0].item() == third
