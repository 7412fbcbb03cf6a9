"""Evaluation prompts belong to a sample, not to its position: adding or removing a file leaves every
other sample's validation / test prompt as it was (folder data: the stem and the seed; COCO: the image
id, the annotation id and the seed), and two samples of one split with the same id are refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from samflow.data import SegmentationDataModule
from samflow.data.errors import DataError
from samflow.data.folder import MaskFolderDataset

# random draws of every kind a sampler makes: points inside and outside, a jittered box, a noisy mask
POINTS = {"name": "points", "positive": 3, "negative": 2}
JITTERED_BOX = {"name": "box", "jitter": 0.3}
NOISY = {"name": "noisy_mask", "band": 0.2}
STEMS = ["a", "b", "c", "d", "e"]


def _folder(root: Path, pngs: SimpleNamespace, stems: list[str]) -> Path:
    """Pairs of 24 x 32 images whose mask is one large box, the same for every stem."""
    return pngs.pairs(root, stems, height=24, width=32, box=(3, 2, 25, 19))


def _prompts(dataset: MaskFolderDataset) -> dict[str, dict[str, torch.Tensor]]:
    """Each sample's prompt fields, by id."""
    fields = ("points", "point_labels", "box", "mask_prompt")
    return {
        item["id"]: {k: item[k] for k in fields if k in item}
        for item in map(dataset.__getitem__, range(len(dataset)))
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("prompt", [POINTS, JITTERED_BOX, NOISY], ids=["points", "box", "noisy_mask"])
def test_removing_a_file_keeps_every_other_eval_prompt(tmp_path, pngs, prompt) -> None:
    full = _folder(tmp_path / "full", pngs, STEMS)
    less = _folder(tmp_path / "less", pngs, [s for s in STEMS if s != "b"])
    before = _prompts(MaskFolderDataset(full, prompt=prompt, img_size=32, prompt_seed=11))
    after = _prompts(MaskFolderDataset(less, prompt=prompt, img_size=32, prompt_seed=11))
    assert set(before) - set(after) == {"b"}
    for stem in after:  # c, d, e moved one place up; their prompts did not change
        assert _same(before[stem], after[stem]), stem
    # the draws are random per sample and per seed: one mask, five stems, five different prompts
    assert all(not _same(before["a"], before[s]) for s in STEMS[1:])
    other = _prompts(MaskFolderDataset(full, prompt=prompt, img_size=32, prompt_seed=12))
    assert all(not _same(before[s], other[s]) for s in STEMS)


def test_a_sample_keeps_its_prompt_among_other_roots(tmp_path, pngs) -> None:
    """A root alone, or after another root (every index shifted): the same prompts."""
    alone = _folder(tmp_path / "alone", pngs, ["x", "y"])
    first = _folder(tmp_path / "first", pngs, ["p", "q", "r"])
    single = _prompts(MaskFolderDataset(alone, prompt=POINTS, img_size=32, prompt_seed=3))
    joined = _prompts(MaskFolderDataset([first, alone], prompt=POINTS, img_size=32, prompt_seed=3))
    assert all(_same(single[s], joined[s]) for s in ("x", "y"))


def test_datamodule_validation_prompts_survive_an_added_file(tmp_path, pngs) -> None:
    """What a researcher compares: two runs' validation batches, one image added to the second set."""
    val = _folder(tmp_path / "val", pngs, ["a", "c", "e"])
    grown = _folder(tmp_path / "grown", pngs, ["a", "b", "c", "d", "e"])

    def batch(root: Path):
        dm = SegmentationDataModule(val=root, eval_prompt=POINTS, img_size=32, batch_size=5, seed=4)
        dm.setup("validate")
        return next(iter(dm.val_dataloader()))

    small, large = batch(val), batch(grown)
    for i, stem in enumerate(small.id):
        j = large.id.index(stem)
        assert torch.equal(small.points[i], large.points[j]), stem
        assert torch.equal(small.point_labels[i], large.point_labels[j]), stem


def test_the_same_stem_in_two_roots_of_one_split_is_refused(tmp_path, pngs) -> None:
    one = _folder(tmp_path / "one", pngs, ["a", "b"])
    two = _folder(tmp_path / "two", pngs, ["b", "c"])
    with pytest.raises(DataError) as err:
        MaskFolderDataset([one, two], img_size=32)
    message = str(err.value)
    assert "\n" not in message and "'b'" in message
    assert str(one / "images" / "b.png") in message and str(two / "images" / "b.png") in message
    for split in ("train", "val", "test"):  # each split, when the datasets are built (predict: MaskWriter
        dm = SegmentationDataModule(**{split: [str(one), str(two)]}, img_size=32)  # names the output too)
        with pytest.raises(DataError, match=rf"data\.{split}: .*'b'"):
            dm.setup()


def test_one_root_listed_twice_is_not_refused(tmp_path, pngs) -> None:
    """The same files again (to weigh a root more in training) are not two samples with one id."""
    one = _folder(tmp_path / "one", pngs, ["a", "b"])
    assert [s.id for s in MaskFolderDataset([one, str(one) + "/"], img_size=32).samples] == ["a", "b"] * 2


def test_the_same_stem_in_two_sets_of_a_split_is_fine(tmp_path, pngs) -> None:
    """Named sets are datasets of their own: a stem may be in several."""
    one = _folder(tmp_path / "one", pngs, ["a", "b"])
    two = _folder(tmp_path / "two", pngs, ["b", "c"])
    dm = SegmentationDataModule(test_sets={"One": str(one), "Two": str(two)}, img_size=32)
    dm.setup("test")
    assert [len(dm.datasets[k]) for k in ("test/One", "test/Two")] == [2, 2]


# ---------------------------------------------------------------- COCO


def _coco_points(path: Path) -> dict[tuple[int, int], torch.Tensor]:
    from samflow.data.coco import CocoInstances

    dataset = CocoInstances(path, img_size=64, points_per_instance=3, seed=5)
    out = {}
    for index in range(len(dataset)):
        inst = dataset.instances(index)
        image_id = int(dataset.images[index]["id"])
        for ann_id, points in zip(inst["ann_ids"].tolist(), inst["points"], strict=True):
            out[image_id, ann_id] = points
    return out


def test_removing_a_coco_image_or_annotation_keeps_every_other_point(tmp_path) -> None:
    pytest.importorskip("pycocotools")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
    from tiny_coco import make_tiny_coco

    path, _ = make_tiny_coco(tmp_path / "coco")
    data = json.loads(path.read_text())
    data["images"] = [img for img in data["images"] if img["id"] != 1]  # the first image
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1 and a["id"] != 5]
    less = tmp_path / "coco" / "less.json"
    less.write_text(json.dumps(data))
    before, after = _coco_points(path), _coco_points(less)
    assert set(before) - set(after) == {(1, 1), (1, 2), (1, 3), (2, 5)}
    assert after and all(torch.equal(before[key], after[key]) for key in after)
    assert len({tuple(p.flatten().tolist()) for p in before.values()}) == len(before)  # all drawn apart
