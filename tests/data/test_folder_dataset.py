"""``MaskFolderDataset``: pairing rules, errors that name the file, items in the S x S frame."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from samflow.batch import PROMPT_FIELDS
from samflow.data import DataError, MaskFolderDataset, collate, find_samples


def test_pairs_are_sorted_and_matched_by_stem(pair_root: Path) -> None:
    samples = find_samples(pair_root)
    assert [s.id for s in samples] == ["a", "b", "c"]
    assert all(s.mask == pair_root / "masks" / f"{s.id}.png" for s in samples)


def test_missing_root_and_missing_folder_name_the_path(tmp_path: Path, pair_root: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        MaskFolderDataset(tmp_path / "nope")
    with pytest.raises(DataError, match=r"GT does not exist.*\['images', 'masks'\].*masks="):
        MaskFolderDataset(pair_root, masks="GT")


def test_empty_image_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"{tmp_path / 'images'} has no image files"):
        MaskFolderDataset(tmp_path)


def test_image_without_mask_lists_the_stems(pair_root: Path, pngs: SimpleNamespace) -> None:
    for i in range(12):
        pngs.image(pair_root / "images" / f"lonely{i:02d}.jpg", 12, 16)
    with pytest.raises(DataError, match=r"12 image\(s\).*lonely00, .*lonely09 and 2 more") as info:
        MaskFolderDataset(pair_root)
    assert "lonely10" not in str(info.value)


def test_mask_without_image_warns_and_is_ignored(pair_root: Path, pngs: SimpleNamespace) -> None:
    pngs.mask(pair_root / "masks" / "orphan.png", 12, 16)
    with pytest.warns(UserWarning, match="orphan"):
        dataset = MaskFolderDataset(pair_root)
    assert len(dataset) == 3


def test_two_files_with_one_stem_name_both(pair_root: Path, pngs: SimpleNamespace) -> None:
    pngs.image(pair_root / "images" / "a.jpg", 12, 16)
    with pytest.raises(DataError, match=r"stem 'a': a.jpg and a.png"):
        MaskFolderDataset(pair_root)


def test_size_mismatch_names_both_files(pair_root: Path, pngs: SimpleNamespace) -> None:
    pngs.mask(pair_root / "masks" / "b.png", 10, 16)
    dataset = MaskFolderDataset(pair_root, img_size=16)
    assert dataset[0]["mask"].shape == (1, 16, 16)  # the other pairs still read
    message = r"masks/b.png is 16x10 \(WxH\) but its image .*images/b.png is 16x12"
    with pytest.raises(DataError, match=message):
        dataset[1]


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_unreadable_file_is_named(pair_root: Path, kind: str) -> None:
    (pair_root / kind / "c.png").write_bytes(b"this is not a png")
    dataset = MaskFolderDataset(pair_root, img_size=16)
    with pytest.raises(DataError, match=f"{kind}/c.png: cannot read the file"):
        dataset[2]


def test_item_geometry_and_box_in_the_model_frame(tmp_path: Path, pngs: SimpleNamespace) -> None:
    # 100 x 200 image, square at columns 50..69 and rows 20..39; S = 64 -> scale 0.32, input 32 x 64.
    pngs.image(tmp_path / "images" / "x.png", 100, 200)
    pngs.mask(tmp_path / "masks" / "x.png", 100, 200, (50, 20, 69, 39))
    item = MaskFolderDataset(tmp_path, prompt="box", img_size=64)[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["input_size"].tolist() == [32, 64] and item["original_size"].tolist() == [100, 200]
    assert (item["image"][:, :32] > 0).all() and (item["image"][:, 32:] == 0).all()
    torch.testing.assert_close(item["box"], torch.tensor([16.0, 6.4, 22.08, 12.48]))
    assert item["gt_original"].shape == (100, 200) and item["gt_original"].sum() == 400
    # Nearest-exact: output pixel j reads source pixel floor((j + 0.5) / 0.32), so columns 16..21
    # (51.5 .. 67.2; 22 reads 70) and rows 6..12 (20.3 .. 39.1; 13 reads 42) are foreground.
    rows, cols = item["mask"][0].nonzero().unbind(-1)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 12, 16, 21)


def test_stretch_mode_and_points(tmp_path: Path, pngs: SimpleNamespace) -> None:
    pngs.image(tmp_path / "images" / "x.png", 100, 200)
    pngs.mask(tmp_path / "masks" / "x.png", 100, 200, (50, 20, 69, 39))
    points = {"name": "points", "positive": 4}
    dataset = MaskFolderDataset(tmp_path, prompt=points, img_size=64, resize_mode="stretch")
    item = dataset[0]
    assert item["input_size"].tolist() == [64, 64] and (item["image"] > 0).all()
    x, y = item["points"].unbind(-1)
    eps = 1e-4
    assert ((x >= 16 - eps) & (x <= 22.08 + eps)).all() and ((y >= 12.8 - eps) & (y <= 24.96 + eps)).all()


def test_mask_threshold_is_127(tmp_path: Path, pngs: SimpleNamespace) -> None:
    from PIL import Image

    from samflow.data.reading import ValueRangeWarning

    pngs.image(tmp_path / "images" / "x.png", 1, 3)
    (tmp_path / "masks").mkdir()
    Image.frombytes("L", (3, 1), bytes([127, 128, 255])).save(tmp_path / "masks" / "x.png")
    # Several non-zero values (a soft mask) reaching above 127: cut at > 127, with a warning.
    with pytest.warns(ValueRangeWarning, match="value > 127"):
        item = MaskFolderDataset(tmp_path, img_size=4)[0]
    assert item["gt_original"].tolist() == [[False, True, True]]


def test_palette_masks_use_the_index_not_the_colour(tmp_path: Path, pngs: SimpleNamespace) -> None:
    from PIL import Image

    pngs.image(tmp_path / "images" / "x.png", 1, 4)
    (tmp_path / "masks").mkdir()
    mask = Image.frombytes("P", (4, 1), bytes([0, 1, 2, 0]))
    mask.putpalette([0, 0, 0, 128, 0, 0, 255, 255, 255])  # index 1: dark red (grey level 38)
    mask.save(tmp_path / "masks" / "x.png")
    assert MaskFolderDataset(tmp_path, img_size=4)[0]["gt_original"].tolist() == [[False, True, True, False]]


def test_one_bit_masks(tmp_path: Path, pngs: SimpleNamespace) -> None:
    from PIL import Image

    pngs.image(tmp_path / "images" / "x.png", 1, 3)
    (tmp_path / "masks").mkdir()
    Image.frombytes("L", (3, 1), bytes([0, 255, 0])).convert("1").save(tmp_path / "masks" / "x.png")
    assert MaskFolderDataset(tmp_path, img_size=4)[0]["gt_original"].tolist() == [[False, True, False]]


def test_several_roots_with_their_own_folder_names(tmp_path: Path, pngs: SimpleNamespace) -> None:
    pngs.pairs(tmp_path / "kvasir", ["k1", "k2"])
    for stem in ["c1", "c2", "c3"]:  # COD10K names its folders Imgs / GT
        pngs.image(tmp_path / "cod" / "Imgs" / f"{stem}.jpg", 12, 16)
        pngs.mask(tmp_path / "cod" / "GT" / f"{stem}.png", 12, 16)
    for stem in ["p1"]:  # cascade_psp keeps images and masks in one folder
        pngs.image(tmp_path / "psp" / f"{stem}.jpg", 12, 16)
        pngs.mask(tmp_path / "psp" / f"{stem}.png", 12, 16)
    roots = [
        str(tmp_path / "kvasir"),
        {"root": str(tmp_path / "cod"), "images": "Imgs", "masks": "GT"},
        {
            "root": tmp_path / "psp",
            "images": ".",
            "masks": ".",
            "image_suffixes": [".jpg"],
            "mask_suffixes": [".png"],
        },
    ]
    dataset = MaskFolderDataset(roots, img_size=16)
    assert [s.id for s in dataset.samples] == ["k1", "k2", "c1", "c2", "c3", "p1"]
    assert dataset.samples[-1].mask == tmp_path / "psp" / "p1.png"


def test_one_folder_for_both_needs_distinct_suffixes(tmp_path: Path, pngs: SimpleNamespace) -> None:
    pngs.image(tmp_path / "p1.png", 4, 4)
    with pytest.raises(DataError, match="image_suffixes and mask_suffixes must differ"):
        MaskFolderDataset(tmp_path, images=".", masks=".", image_suffixes=[".png"], mask_suffixes=[".png"])


def test_masks_none_is_refused_where_masks_are_needed(pair_root: Path) -> None:
    with pytest.raises(DataError, match="needs them"):
        MaskFolderDataset(pair_root, masks=None)
    assert not MaskFolderDataset(pair_root, masks=None, require_masks=False, img_size=16).has_masks


def test_unknown_key_in_a_folder_spec(pair_root: Path) -> None:
    with pytest.raises(DataError, match=r"unknown keys \['image'\]"):
        MaskFolderDataset({"root": str(pair_root), "image": "images"})


def test_images_only_folder_for_predict(tmp_path: Path, pngs: SimpleNamespace) -> None:
    pngs.image(tmp_path / "photos" / "p.jpg", 10, 20)
    with pytest.raises(DataError, match="images does not exist"):
        MaskFolderDataset(tmp_path / "photos")
    dataset = MaskFolderDataset(tmp_path / "photos", prompt="box", img_size=32, require_masks=False)
    batch = collate([dataset[0]])
    assert not dataset.has_masks and batch.image.shape == (1, 3, 32, 32)
    assert batch.id == ["p"] and batch.path == [str(tmp_path / "photos" / "p.jpg")]
    assert batch.original_size.tolist() == [[10, 20]] and batch.input_size.tolist() == [[16, 32]]
    absent = ("mask", "gt_original", *PROMPT_FIELDS)  # no masks: no ground truth and no prompts
    assert all(getattr(batch, name) is None for name in absent)


def test_eval_prompts_are_seeded_per_sample(pair_root: Path) -> None:
    points = {"name": "points", "positive": 3}
    dataset = MaskFolderDataset(pair_root, prompt=points, img_size=16, prompt_seed=7)
    first = [dataset[i]["points"] for i in range(3)]
    again = [dataset[i]["points"] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])  # same mask, different id -> different points


def test_noisy_mask_prompt_is_at_quarter_resolution(pair_root: Path) -> None:
    item = MaskFolderDataset(pair_root, prompt="noisy_mask", img_size=32, prompt_seed=0)[0]
    assert item["mask_prompt"].shape == (1, 8, 8) and item["mask_prompt"].dtype == torch.float32
    assert set(item["mask_prompt"].unique().tolist()) <= {0.0, 1.0}
    # Without noise it is the ground truth at quarter resolution (area, > 0.5): rows 2..3, columns 1..2.
    clean = MaskFolderDataset(pair_root, prompt={"name": "noisy_mask", "std": 0.0}, img_size=32)[0]
    expected = torch.nn.functional.avg_pool2d(clean["mask"], 4) > 0.5
    assert torch.equal(clean["mask_prompt"], expected.float()) and expected.sum() == 4
    # With noise only the boundary band changes: no farther than one quarter-resolution cell.
    near = torch.nn.functional.max_pool2d(expected.float(), 3, stride=1, padding=1)
    assert item["mask_prompt"].sum() > 0 and (item["mask_prompt"] <= near).all()


def test_img_size_must_be_a_multiple_of_4(pair_root: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        MaskFolderDataset(pair_root, img_size=30)
