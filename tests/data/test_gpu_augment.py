"""``GpuAugment`` moves image, mask, mask prompt, boxes and points together (checked by hand)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from samflow.batch import SamBatch
from samflow.data import GpuAugment, mask_to_box

S = 32


def _batch(dtype: torch.dtype = torch.float32) -> SamBatch:
    """Two samples, each with a square object, its box, a positive point at its centre and a mask prompt."""
    mask = torch.zeros(2, 1, S, S, dtype=dtype)
    mask[0, 0, 4:12, 2:10] = 1  # rows 4..11, columns 2..9
    mask[1, 0, 16:28, 18:30] = 1  # rows 16..27, columns 18..29
    image = torch.rand(2, 3, S, S, dtype=dtype) * 0.5 + mask * 0.5
    return SamBatch(
        image=image,
        mask=mask,
        gt_original=[m[0] > 0 for m in mask],
        input_size=torch.tensor([[S, 24], [20, S]]),
        original_size=torch.tensor([[90, 60], [50, 80]]),
        id=["a", "b"],
        box=torch.tensor([[2.0, 4.0, 9.0, 11.0], [18.0, 16.0, 29.0, 27.0]], dtype=dtype),
        has_box=torch.tensor([True, False]),
        points=torch.tensor([[[6.0, 8.0], [0.0, 0.0]], [[24.0, 22.0], [1.0, 30.0]]], dtype=dtype),
        point_labels=torch.tensor([[1, -1], [1, 0]]),
        mask_prompt=torch.nn.functional.avg_pool2d(mask, 4).gt(0.5).to(dtype),  # (2, 1, 8, 8)
        has_mask_prompt=torch.tensor([True, True]),
    )


def _tensors(batch: SamBatch) -> dict[str, torch.Tensor]:
    """The batch's tensor fields by name (the gt_original list as one entry per image)."""
    out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    tensors.update({f"gt_original[{i}]": g for i, g in enumerate(batch.gt_original or [])})
    return tensors


def test_hflip_mirrors_every_key_consistently() -> None:
    batch = _batch()
    before = {k: v.clone() for k, v in _tensors(batch).items()}
    out = GpuAugment(hflip=1.0)(batch)
    torch.testing.assert_close(out.image, batch.image.flip(-1))
    torch.testing.assert_close(out.mask, batch.mask.flip(-1))
    torch.testing.assert_close(out.mask_prompt, batch.mask_prompt.flip(-1))
    # Inclusive boxes: x1' = S - 1 - x2, x2' = S - 1 - x1; y unchanged.
    torch.testing.assert_close(out.box, torch.tensor([[22.0, 4.0, 29.0, 11.0], [2.0, 16.0, 13.0, 27.0]]))
    for i in range(2):  # and it is the tight box of the flipped mask
        torch.testing.assert_close(out.box[i], mask_to_box(out.mask[i, 0] > 0))
    flipped = torch.tensor([[[25.0, 8.0], [31.0, 0.0]], [[7.0, 22.0], [30.0, 30.0]]])  # x' = S - 1 - x
    torch.testing.assert_close(out.points, flipped)
    assert torch.equal(out.point_labels, batch.point_labels)
    assert torch.equal(out.has_box, batch.has_box)
    assert torch.equal(out.gt_original[1], out.mask[1, 0] > 0)
    assert out.input_size.tolist() == [[S, S]] * 2 and out.original_size.tolist() == [[S, S]] * 2
    assert isinstance(out, SamBatch) and out is not batch
    assert _tensors(batch).keys() == before.keys()  # the input is left alone
    assert all(torch.equal(_tensors(batch)[k], v) for k, v in before.items())


def test_vflip_mirrors_y() -> None:
    out = GpuAugment(vflip=1.0)(_batch())
    torch.testing.assert_close(out.box[0], torch.tensor([2.0, 20.0, 9.0, 27.0]))
    torch.testing.assert_close(out.points[0, 0], torch.tensor([6.0, 23.0]))


def test_rotation_and_scale_keep_prompts_on_the_object() -> None:
    torch.manual_seed(0)
    augment = GpuAugment(rotation=45, scale=(0.5, 1.5), translate=0.1)
    checked = {"points": 0, "boxes": 0}
    for _ in range(5):
        batch = _batch()
        out = augment(batch)
        assert not torch.equal(out.mask, batch.mask)  # the draw did move things
        assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
        for i in range(2):
            obj = out.mask[i, 0] > 0
            if out.point_labels[i, 0] == 1:  # the centre point still lies on the object
                x, y = out.points[i, 0].round().long().tolist()
                assert obj[y, x]
                checked["points"] += 1
            tight = mask_to_box(obj)
            if tight is not None and out.has_box[i]:  # the moved box encloses the moved object
                box = out.box[i]
                assert (box[:2] <= tight[:2] + 1).all() and (box[2:] >= tight[2:] - 1).all()
                checked["boxes"] += 1
    assert checked["points"] >= 5 and checked["boxes"] >= 3  # the checks above did run


def test_points_that_leave_the_frame_become_padding() -> None:
    batch = _batch()
    batch.points[:, 0] = torch.tensor([[1.0, 1.0], [20.0, 18.0]])
    out = GpuAugment(scale=(2.0, 2.0))(batch)  # zoom about the centre (15.5, 15.5): p -> 15.5 + 2 (p - 15.5)
    torch.testing.assert_close(out.points[:, 0], torch.tensor([[-13.5, -13.5], [24.5, 20.5]]))
    assert out.point_labels[:, 0].tolist() == [-1, 1]


def test_color_jitter_touches_only_the_image() -> None:
    batch = _batch()
    out = GpuAugment(color_jitter=0.4)(batch)
    assert not torch.equal(out.image, batch.image)
    assert out.image.min() >= 0 and out.image.max() <= 1
    assert torch.equal(out.mask, batch.mask) and torch.equal(out.input_size, batch.input_size)


def test_no_option_is_the_identity() -> None:
    batch = _batch()
    out = GpuAugment()(batch)
    assert all(getattr(out, f.name) is getattr(batch, f.name) for f in dataclasses.fields(batch))


def test_bad_color_jitter() -> None:
    with pytest.raises(ValueError, match="color_jitter"):
        GpuAugment(color_jitter=(0.1, 0.2))


def test_boxes_are_clipped_and_dropped_when_they_leave_the_frame() -> None:
    batch = _batch()
    batch.has_box[1] = True
    # Zoom x2 about (15.5, 15.5): box 0 -> (-11.5, -7.5, 2.5, 6.5), box 1 -> (20.5, 16.5, 43.5, 38.5).
    out = GpuAugment(scale=(2.0, 2.0))(batch)
    torch.testing.assert_close(out.box, torch.tensor([[0.0, 0.0, 2.5, 6.5], [20.5, 16.5, 31.0, 31.0]]))
    assert out.has_box.tolist() == [True, True]
    out = GpuAugment(scale=(4.0, 4.0))(batch)  # box 0 -> x in [-38.5, -10.5]: out of the frame
    assert out.has_box.tolist() == [False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_everything_stays_there_and_moves_together() -> None:
    from samflow.testing import to_device

    torch.manual_seed(0)
    batch = to_device(_batch(), "cuda")
    out = GpuAugment(hflip=1.0)(batch)
    assert all(v.is_cuda for v in _tensors(out).values())
    torch.testing.assert_close(out.mask, batch.mask.flip(-1))
    augment = GpuAugment(rotation=45, scale=(0.5, 1.5), translate=0.1, color_jitter=0.2)
    checked = 0
    for _ in range(5):
        out = augment(to_device(_batch(), "cuda"))
        assert out.image.is_cuda and set(out.mask.unique().tolist()) <= {0.0, 1.0}
        for i in range(2):
            if out.point_labels[i, 0] == 1:  # the centre point still lies on the moved object
                x, y = out.points[i, 0].round().long().tolist()
                assert out.mask[i, 0, y, x] > 0
                checked += 1
    assert checked > 0  # the check above did run


def test_refuses_several_prompt_rows_per_image() -> None:
    batch = _batch()
    two_rows = batch.select_rows([0, 0, 1])  # image 0 has two prompt rows
    assert two_rows.num_rows == 3 and two_rows.image_index.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match=r"one prompt row per image.*3 rows for 2 images"):
        GpuAugment(hflip=1.0)(two_rows)
    with pytest.raises(ValueError, match=r"one prompt row per image"):
        GpuAugment()(two_rows)  # even when it would change nothing
    swapped = batch.select_rows([1, 0])  # one row per image, but not in image order
    with pytest.raises(ValueError, match=r"one prompt row per image, in order"):
        GpuAugment(hflip=1.0)(swapped)


def test_float64_batches_stay_float64() -> None:
    f64 = torch.float64
    batch = _batch(f64)
    out = GpuAugment(hflip=1.0)(batch)
    for name in ("image", "mask", "box", "points", "mask_prompt"):
        assert getattr(out, name).dtype == f64, name
    # A flip only moves values: exact, even at the 1e-12 parity tolerance.
    torch.testing.assert_close(out.image, batch.image.flip(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.points[0, 0], torch.tensor([25.0, 8.0], dtype=f64), rtol=0, atol=1e-12)
    torch.manual_seed(0)
    out = GpuAugment(rotation=30, scale=(0.5, 1.5), translate=0.1, color_jitter=0.3)(batch)
    for name in ("image", "mask", "box", "points", "mask_prompt"):
        assert getattr(out, name).dtype == f64, name
    assert out.point_labels.dtype == torch.long and out.has_box.dtype == torch.bool


def test_a_batch_survives_lightnings_device_transfer() -> None:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from samflow.data import SegmentationDataModule

    batch = _batch(torch.float64)
    for moved in (
        move_data_to_device(batch, torch.device("cpu")),
        move_data_to_device(batch, "cpu"),
        SegmentationDataModule(img_size=S).transfer_batch_to_device(batch, torch.device("cpu"), 0),
    ):
        assert type(moved) is SamBatch
        for f in dataclasses.fields(SamBatch):
            value, original = getattr(moved, f.name), getattr(batch, f.name)
            if isinstance(original, torch.Tensor):
                assert value.dtype == original.dtype and value.device.type == "cpu", f.name
                assert torch.equal(value, original), f.name
            elif f.name == "gt_original":
                assert len(value) == len(original) and all(map(torch.equal, value, original))
            else:
                assert value == original, f.name
    # A transfer that does move: every tensor (the gt_original list too) goes, dtypes and strings stay.
    meta = move_data_to_device(batch, torch.device("meta"))
    assert type(meta) is SamBatch and meta.id == batch.id
    for name, tensor in _tensors(meta).items():
        assert tensor.device.type == "meta" and tensor.dtype == _tensors(batch)[name].dtype, name
        assert tensor.shape == _tensors(batch)[name].shape, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lightnings_transfer_to_the_gpu_and_back_keeps_the_batch() -> None:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    batch = _batch(torch.float64)
    on_gpu = move_data_to_device(batch, torch.device("cuda", 0))
    assert type(on_gpu) is SamBatch and on_gpu.id == batch.id
    assert all(v.is_cuda for v in _tensors(on_gpu).values())
    out = GpuAugment(hflip=1.0)(on_gpu)
    assert out.image.dtype == torch.float64 and all(v.is_cuda for v in _tensors(out).values())
    back = move_data_to_device(on_gpu, "cpu")
    for name, value in _tensors(back).items():
        original = _tensors(batch)[name]
        assert value.device.type == "cpu" and value.dtype == original.dtype, name
        assert torch.equal(value, original), name
