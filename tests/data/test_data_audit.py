"""Audit of the folder data path: listing and pairing, prompts in SAM's frame, invariance, augmentation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from samflow.batch import SamBatch
from samflow.data import DataError, GpuAugment, MaskFolderDataset, SegmentationDataModule, find_samples


# ---- listing and pairing ----
def test_pairs_are_sorted_by_stem_not_by_file_name(tmp_path: Path, pngs: SimpleNamespace) -> None:
    # By file name "a (1).png" < "a-1.png" < "a.png" (" " and "-" sort before "."); by stem "a" comes first.
    root = pngs.pairs(tmp_path, ["a-1", "a", "a (1)"])
    assert [s.id for s in find_samples(root)] == ["a", "a (1)", "a-1"]


@pytest.mark.parametrize(
    ("suffixes", "shared"),
    [
        ({"image_suffixes": [".jpg", ".png"], "mask_suffixes": [".png"]}, "both with ['.png']"),
        ({}, "'.jpg', '.png'"),
    ],
)
def test_one_folder_for_both_refuses_shared_suffixes_naming_them(
    tmp_path: Path, pngs: SimpleNamespace, suffixes: dict, shared: str
) -> None:
    # Before: "x has no mask" (the .png taken for neither) or "no image files" (.jpg taken for neither).
    pngs.image(tmp_path / "x.jpg", 4, 4)
    pngs.mask(tmp_path / "x.png", 4, 4)
    with pytest.raises(DataError, match=rf"share no suffix.*{re.escape(shared)}"):
        find_samples(tmp_path, images=".", masks=".", **suffixes)
    pair = find_samples(tmp_path, images=".", masks=".", image_suffixes=[".jpg"], mask_suffixes=[".png"])
    assert [(s.image.name, s.mask.name) for s in pair] == [("x.jpg", "x.png")]


def test_images_in_subfolders_are_named_not_silently_left_out(tmp_path: Path, pngs: SimpleNamespace) -> None:
    root = pngs.pairs(tmp_path / "ds", ["x"])
    pngs.pairs(root / "images" / "city", ["y"])  # images/city/images/y.png: not read
    with pytest.warns(UserWarning, match=r"subfolders with images, which are not read.*images/city"):
        assert [s.id for s in find_samples(root)] == ["x"]
    only_nested = tmp_path / "nested"
    pngs.image(only_nested / "images" / "a" / "y.png", 4, 4)
    (only_nested / "masks").mkdir()
    with pytest.raises(DataError, match=r"has no image files.*its subfolders a hold images"):
        find_samples(only_nested)


def test_no_subfolder_warning_for_the_usual_layouts(tmp_path: Path, pngs: SimpleNamespace) -> None:
    root = pngs.pairs(tmp_path / "ds", ["x"])  # images/ and masks/ side by side
    (root / "images" / "notes").mkdir()
    (root / "images" / "notes" / "readme.txt").write_text("no image here")  # a subfolder without images
    flat = tmp_path / "flat"  # images in the root, masks in a subfolder of it
    pngs.image(flat / "x.jpg", 4, 4)
    pngs.mask(flat / "gt" / "x.png", 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_samples(root)) == 1
        assert len(find_samples(flat, images=".", masks="gt", image_suffixes=[".jpg"])) == 1


def test_missing_mask_error_points_at_case_and_suffix_near_misses(
    tmp_path: Path, pngs: SimpleNamespace
) -> None:
    pngs.image(tmp_path / "images" / "Cat.png", 4, 4)
    pngs.mask(tmp_path / "masks" / "cat.png", 4, 4)
    pngs.image(tmp_path / "images" / "dog.png", 4, 4)
    pngs.image(tmp_path / "masks" / "dog.webp", 4, 4)  # a suffix mask_suffixes does not hold
    with pytest.raises(DataError, match=r"2 image\(s\).*Cat -> cat.png; rename.*other suffixes: dog.webp"):
        find_samples(tmp_path)


# ---- prompts in SAM's frame, against segment-anything's own transform ----
def test_prompts_land_where_segment_anything_puts_them(tmp_path: Path, pngs: SimpleNamespace) -> None:
    from segment_anything.utils.transforms import ResizeLongestSide

    height, width, size = 37, 53, 64  # not square, not a divisor: rounding matters
    pngs.image(tmp_path / "images" / "x.png", height, width)
    pngs.mask(tmp_path / "masks" / "x.png", height, width, (11, 5, 40, 30))
    sam = ResizeLongestSide(size)
    box = MaskFolderDataset(tmp_path, prompt="box", img_size=size)[0]
    expected = sam.apply_boxes(torch.tensor([[11.0, 5.0, 40.0, 30.0]]).numpy(), (height, width))[0]
    torch.testing.assert_close(box["box"], torch.from_numpy(expected).float())
    assert box["input_size"].tolist() == list(sam.get_preprocess_shape(height, width, size))
    points = {"name": "points", "positive": 8, "negative": 8}
    item = MaskFolderDataset(tmp_path, prompt=points, img_size=size, prompt_seed=3)[0]
    # The drawn pixels, back in the original frame, lie on (label 1) or off (label 0) the mask.
    original = item["points"] * torch.tensor([width / item["input_size"][1], height / item["input_size"][0]])
    cols, rows = original.round().long().unbind(-1)
    assert item["gt_original"][rows, cols].tolist() == [True] * 8 + [False] * 8
    sam_points = sam.apply_coords(original.numpy(), (height, width))
    torch.testing.assert_close(item["points"], torch.from_numpy(sam_points).float())


# ---- invariance to batch size and worker count (README: draws from (seed, epoch, index)) ----
def _prompts_by_id(loader: DataLoader) -> dict[str, tuple[list, list | None]]:
    """Each image's prompt (points without the batch's padding slots, box or None), by id."""
    prompts: dict[str, tuple[list, list | None]] = {}
    for batch in loader:
        for row, key in enumerate(batch.id):  # one prompt row per image
            points = [] if batch.points is None else batch.points[row][batch.point_labels[row] != -1].tolist()
            box = batch.box[row].tolist() if batch.box is not None and batch.has_box[row] else None
            prompts[key] = (points, box)
    return prompts


@pytest.mark.parametrize("split", ["train", "val"])
def test_prompts_do_not_depend_on_batch_size_or_workers(
    tmp_path: Path, pngs: SimpleNamespace, split: str
) -> None:
    root = str(pngs.pairs(tmp_path, [f"s{i}" for i in range(5)]))
    mixed = {"name": "mixed", "samplers": [{"name": "box", "jitter": 0.5}, {"name": "points", "positive": 3}]}
    runs = []
    for batch_size, workers in ((1, 0), (3, 2)):
        dm = SegmentationDataModule(
            train=root,
            val=root,
            img_size=16,
            prompt=mixed,
            batch_size=batch_size,
            num_workers=workers,
            seed=5,
        )
        dm.setup("fit")
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        if split == "train":
            loader.sampler.set_epoch(2)
        runs.append(_prompts_by_id(loader))
    assert runs[0] == runs[1]
    assert set(runs[0]) == {f"s{i}" for i in range(5)}
    # The samples' prompts differ (same mask, other draws): the equality above compares draws.
    assert len({str(prompt) for prompt in runs[0].values()}) == 5


# ---- data.augment built in Python as the CLI builds it ----
def test_augment_given_as_a_dict_in_python_is_built(pair_root: Path) -> None:
    dm = SegmentationDataModule(train=str(pair_root), img_size=16, augment={"hflip": 1.0})
    assert isinstance(dm.augment, GpuAugment)  # before: the dict itself, "not callable" at the first step
    spec = {"class_path": "GpuAugment", "init_args": {"vflip": 1.0}}
    assert isinstance(SegmentationDataModule(img_size=16, augment=spec).augment, GpuAugment)
    with pytest.raises(ValueError, match=r"data.augment: .*hflp"):
        SegmentationDataModule(img_size=16, augment={"hflp": 1.0})
    with pytest.raises(TypeError, match=r"data.augment must be"):
        SegmentationDataModule(img_size=16, augment="hflip")


# ---- augmentation: image and mask moved by the same transform ----
def test_affine_moves_image_and_mask_together() -> None:
    size = 32
    mask = torch.zeros(3, 1, size, size)
    mask[0, 0, 4:12, 2:10] = 1
    mask[1, 0, 16:28, 18:30] = 1
    mask[2, 0, 3:29, 10:14] = 1
    batch = SamBatch(
        image=mask.expand(-1, 3, -1, -1).clone(), mask=mask, gt_original=[m[0] > 0 for m in mask]
    )
    torch.manual_seed(0)
    augment = GpuAugment(rotation=40, scale=(0.6, 1.6), translate=0.2)
    for _ in range(4):
        out = augment(batch)
        assert not torch.equal(out.mask, batch.mask)
        # The image is the mask in three channels: bilinear vs nearest sampling differ at a few edge pixels.
        differ = ((out.image[:, :1] > 0.5) != (out.mask > 0.5)).sum(dim=(1, 2, 3))
        assert (differ <= 2).all(), differ
