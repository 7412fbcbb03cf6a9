"""``collate``: shapes, dtypes, padding and presence flags of the batch contract."""

from __future__ import annotations

import pytest
import torch

from samflow.data import collate

S = 16


def _item(i: int, **prompt: torch.Tensor) -> dict:
    return {
        "image": torch.rand(3, S, S),
        "mask": torch.zeros(1, S, S),
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
    assert batch["image"].shape == (4, 3, S, S) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, S, S) and batch["mask"].dtype == torch.float32
    assert batch["input_size"].dtype == torch.long and batch["input_size"].shape == (4, 2)
    assert batch["original_size"][:, 0].tolist() == [10, 11, 12, 13]
    assert [g.shape for g in batch["gt_original"]] == [(10, 20), (11, 20), (12, 20), (13, 20)]
    assert batch["id"] == ["s0", "s1", "s2", "s3"] and batch["path"][1] == "/data/s1.png"
    assert batch["points"].shape == (4, 2, 2) and batch["point_labels"].dtype == torch.long
    assert batch["point_labels"].tolist() == [[1, 0], [-1, -1], [-1, -1], [1, -1]]
    torch.testing.assert_close(batch["points"][3, 0], torch.tensor([7.0, 8.0]))
    assert batch["boxes"].shape == (4, 4) and batch["has_box"].tolist() == [False, True, False, False]
    torch.testing.assert_close(batch["boxes"][1], torch.tensor([1.0, 2.0, 5.0, 6.0]))
    assert batch["mask_prompt"].shape == (4, 1, S // 4, S // 4)
    assert batch["has_mask_prompt"].tolist() == [False, False, True, False]
    assert batch["mask_prompt"][2].eq(1).all() and batch["mask_prompt"][0].eq(0).all()


def test_prompt_keys_are_absent_when_no_item_has_them() -> None:
    batch = collate([_item(0), _item(1, box=torch.zeros(4))])
    assert "boxes" in batch and "points" not in batch and "mask_prompt" not in batch


def test_items_without_masks() -> None:
    items = [_item(0), _item(1)]
    for item in items:
        del item["mask"], item["gt_original"]
    batch = collate(items)
    assert "mask" not in batch and "gt_original" not in batch
    with pytest.raises(ValueError, match=r"items \['s1'\] have no mask"):
        collate([_item(0), items[1]])
