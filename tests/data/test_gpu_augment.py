"""``GpuAugment`` moves image, mask, mask prompt, boxes and points together (checked by hand)."""

from __future__ import annotations

import pytest
import torch

from samflow.data import GpuAugment, mask_to_box

S = 32


def _batch() -> dict:
    """Two samples, each with a square object, its box, a positive point at its centre and a mask prompt."""
    mask = torch.zeros(2, 1, S, S)
    mask[0, 0, 4:12, 2:10] = 1  # rows 4..11, columns 2..9
    mask[1, 0, 16:28, 18:30] = 1  # rows 16..27, columns 18..29
    image = torch.rand(2, 3, S, S) * 0.5 + mask * 0.5
    return {
        "image": image,
        "mask": mask,
        "gt_original": [m[0] > 0 for m in mask],
        "input_size": torch.tensor([[S, 24], [20, S]]),
        "original_size": torch.tensor([[90, 60], [50, 80]]),
        "id": ["a", "b"],
        "boxes": torch.tensor([[2.0, 4.0, 9.0, 11.0], [18.0, 16.0, 29.0, 27.0]]),
        "has_box": torch.tensor([True, False]),
        "points": torch.tensor([[[6.0, 8.0], [0.0, 0.0]], [[24.0, 22.0], [1.0, 30.0]]]),
        "point_labels": torch.tensor([[1, -1], [1, 0]]),
        "mask_prompt": torch.nn.functional.avg_pool2d(mask, 4).gt(0.5).float(),  # (2, 1, 8, 8)
        "has_mask_prompt": torch.tensor([True, True]),
    }


def test_hflip_mirrors_every_key_consistently() -> None:
    batch = _batch()
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = GpuAugment(hflip=1.0)(batch)
    torch.testing.assert_close(out["image"], batch["image"].flip(-1))
    torch.testing.assert_close(out["mask"], batch["mask"].flip(-1))
    torch.testing.assert_close(out["mask_prompt"], batch["mask_prompt"].flip(-1))
    # Inclusive boxes: x1' = S - 1 - x2, x2' = S - 1 - x1; y unchanged.
    torch.testing.assert_close(out["boxes"], torch.tensor([[22.0, 4.0, 29.0, 11.0], [2.0, 16.0, 13.0, 27.0]]))
    for i in range(2):  # and it is the tight box of the flipped mask
        torch.testing.assert_close(out["boxes"][i], mask_to_box(out["mask"][i, 0] > 0))
    flipped = torch.tensor([[[25.0, 8.0], [31.0, 0.0]], [[7.0, 22.0], [30.0, 30.0]]])  # x' = S - 1 - x
    torch.testing.assert_close(out["points"], flipped)
    assert torch.equal(out["point_labels"], batch["point_labels"])
    assert torch.equal(out["has_box"], batch["has_box"])
    assert torch.equal(out["gt_original"][1], out["mask"][1, 0] > 0)
    assert out["input_size"].tolist() == [[S, S]] * 2 and out["original_size"].tolist() == [[S, S]] * 2
    assert all(torch.equal(batch[k], v) for k, v in before.items())  # the input is left alone


def test_vflip_mirrors_y() -> None:
    out = GpuAugment(vflip=1.0)(_batch())
    torch.testing.assert_close(out["boxes"][0], torch.tensor([2.0, 20.0, 9.0, 27.0]))
    torch.testing.assert_close(out["points"][0, 0], torch.tensor([6.0, 23.0]))


def test_rotation_and_scale_keep_prompts_on_the_object() -> None:
    torch.manual_seed(0)
    augment = GpuAugment(rotation=45, scale=(0.5, 1.5), translate=0.1)
    for _ in range(5):
        out = augment(_batch())
        assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
        for i in range(2):
            obj = out["mask"][i, 0] > 0
            if out["point_labels"][i, 0] == 1:  # the centre point still lies on the object
                x, y = out["points"][i, 0].round().long().tolist()
                assert obj[y, x]
            tight = mask_to_box(obj)
            if tight is not None and out["has_box"][i]:  # the moved box encloses the moved object
                box = out["boxes"][i]
                assert (box[:2] <= tight[:2] + 1).all() and (box[2:] >= tight[2:] - 1).all()


def test_points_that_leave_the_frame_become_padding() -> None:
    batch = _batch()
    batch["points"][:, 0] = torch.tensor([[1.0, 1.0], [20.0, 18.0]])
    out = GpuAugment(scale=(2.0, 2.0))(batch)  # zoom about the centre (15.5, 15.5): p -> 15.5 + 2 (p - 15.5)
    torch.testing.assert_close(out["points"][:, 0], torch.tensor([[-13.5, -13.5], [24.5, 20.5]]))
    assert out["point_labels"][:, 0].tolist() == [-1, 1]


def test_color_jitter_touches_only_the_image() -> None:
    batch = _batch()
    out = GpuAugment(color_jitter=0.4)(batch)
    assert not torch.equal(out["image"], batch["image"])
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    assert torch.equal(out["mask"], batch["mask"]) and torch.equal(out["input_size"], batch["input_size"])


def test_no_option_is_the_identity() -> None:
    batch = _batch()
    out = GpuAugment()(batch)
    assert all(out[k] is batch[k] for k in batch)


def test_bad_color_jitter() -> None:
    with pytest.raises(ValueError, match="color_jitter"):
        GpuAugment(color_jitter=(0.1, 0.2))


def test_boxes_are_clipped_and_dropped_when_they_leave_the_frame() -> None:
    batch = _batch()
    batch["has_box"][1] = True
    # Zoom x2 about (15.5, 15.5): box 0 -> (-11.5, -7.5, 2.5, 6.5), box 1 -> (20.5, 16.5, 43.5, 38.5).
    out = GpuAugment(scale=(2.0, 2.0))(batch)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 2.5, 6.5], [20.5, 16.5, 31.0, 31.0]]))
    assert out["has_box"].tolist() == [True, True]
    out = GpuAugment(scale=(4.0, 4.0))(batch)  # box 0 -> x in [-38.5, -10.5]: out of the frame
    assert out["has_box"].tolist() == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_everything_stays_there_and_moves_together() -> None:
    from samflow.testing import to_device

    torch.manual_seed(0)
    batch = to_device(_batch(), "cuda")
    out = GpuAugment(hflip=1.0)(batch)
    assert all(v.is_cuda for v in out.values() if isinstance(v, torch.Tensor))
    torch.testing.assert_close(out["mask"], batch["mask"].flip(-1))
    augment = GpuAugment(rotation=45, scale=(0.5, 1.5), translate=0.1, color_jitter=0.2)
    for _ in range(5):
        out = augment(to_device(_batch(), "cuda"))
        assert out["image"].is_cuda and set(out["mask"].unique().tolist()) <= {0.0, 1.0}
        for i in range(2):
            if out["point_labels"][i, 0] == 1:  # the centre point still lies on the moved object
                x, y = out["points"][i, 0].round().long().tolist()
                assert out["mask"][i, 0, y, x] > 0
