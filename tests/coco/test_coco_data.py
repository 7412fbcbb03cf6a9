"""COCO instances: exact decoding, quasi-centre points, crowd / empty rules, batches, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoDataModule, CocoInstances
from samflow.data.coco_batch import collate_coco
from samflow.data.coco_points import qc_point, qc_weights
from samflow.data.errors import DataError


@pytest.fixture
def coco(tmp_path):
    return make_tiny_coco(tmp_path)


def test_masks_decode_exactly_and_boxes_classes(coco):
    path, truth = coco
    ds = CocoInstances(path, img_size=64)
    assert len(ds) == 3  # image 4 has no annotation: skipped
    for i in range(len(ds)):
        inst = ds.instances(i)
        img_id = ds.images[i]["id"]
        assert inst["ann_ids"].tolist() == sorted(truth[img_id])  # the crowd (99) is not a row
        for m, a, box in zip(inst["instance_masks"], inst["ann_ids"].tolist(), inst["boxes"]):
            assert np.array_equal(m.numpy(), truth[img_id][a])
            ys, xs = np.nonzero(truth[img_id][a])
            assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
        assert inst["classes"].tolist() == [0, 1, 0]  # category ids 1, 2 -> indices 0, 1
        assert inst["category_ids"].tolist() == [1, 2, 1]
    # the polygon rectangle of image 1 covers exactly 28 x 20 pixels
    assert int(ds.instances(0)["instance_masks"][0].sum()) == 28 * 20
    assert int(ds.instances(0)["crowd_mask"].sum()) == 80


def test_crowd_keep_and_empty_keep(coco):
    path, _ = coco
    ds = CocoInstances(path, img_size=64, crowd="keep", empty="keep")
    assert len(ds) == 4
    assert ds.instances(0)["ann_ids"].tolist() == [1, 2, 3, 99]
    assert ds.instances(3)["ann_ids"].numel() == 0


def test_qc_points_inside_reproducible_and_central(coco):
    path, truth = coco
    a = CocoInstances(path, img_size=64, points_per_instance=3, seed=5)
    b = CocoInstances(path, img_size=64, points_per_instance=3, seed=5)
    c = CocoInstances(path, img_size=64, points_per_instance=3, seed=6)
    for i in range(len(a)):
        pa, pb, pc = a.instances(i)["points"], b.instances(i)["points"], c.instances(i)["points"]
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
        masks = a.instances(i)["instance_masks"]
        for m, pts in zip(masks, pa):
            for x, y in pts.tolist():
                assert m[round(y), round(x)], (x, y)
    # order independence: reading image 2 alone gives the same points
    assert torch.equal(
        CocoInstances(path, img_size=64, seed=5).instances(2)["points"][:, :1],
        a.instances(2)["points"][:, :1],
    )


def test_qc_point_rule_central_ellipse():
    """A 40 x 40 square: the ellipse has semi-axes 5 px about the centre (19.5, 19.5); every draw lies in it."""
    m = torch.zeros(60, 60, dtype=torch.bool)
    m[10:50, 10:50] = True
    gen = torch.Generator().manual_seed(0)
    pts = torch.stack([qc_point(m, gen) for _ in range(300)])
    d = ((pts.round() - 29.5) ** 2).sum(1).sqrt()
    assert d.max() <= 5.0 + 1e-9
    # a ring-shaped mask whose centre is empty: falls back to the whole mask
    ring = m.clone()
    ring[20:40, 20:40] = False
    p = qc_point(ring, torch.Generator().manual_seed(1))
    assert ring[int(p[1].round()), int(p[0].round())]


def test_points_from_annotation(coco, tmp_path):
    path, _ = coco
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann.setdefault("point", [[7.0, 8.0], [9.0, 10.0]])
    p2 = tmp_path / "pts.json"
    p2.write_text(json.dumps(data))
    ds = CocoInstances(p2, img_size=64, points="annotation")
    inst = ds.instances(0)
    assert inst["points"][0].tolist() == [[7.0, 8.0]]
    assert inst["points"][2].tolist() == [[50.0, 35.0]]  # the L's own point [w - 6, h - 5]
    ds3 = CocoInstances(p2, img_size=64, points="annotation", points_per_instance=2)
    with pytest.raises(DataError, match=r"pts.json: annotation id 3 .*'point' has 1 point\(s\), 2 wanted"):
        ds3.instances(0)


def test_batch_shapes_and_rows(coco):
    path, truth = coco
    ds = CocoInstances(path, img_size=64, points_per_instance=2)
    batch = collate_coco([ds[0], ds[1], ds[2]])
    assert batch.num_images == 3 and batch.num_rows == 9
    assert batch.image_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.points.shape == (9, 2, 2) and batch.point_labels.shape == (9, 2)
    assert batch.box.shape == (9, 4) and batch.instance_mask.shape == (9, 1, 64, 64)
    assert batch.row_mask.shape == (9, 1, 64, 64)
    # image 1 is 40 x 56 -> input 46 x 64 (scale 64 / 56): points and boxes scale by it
    scale = 64 / 56
    assert torch.allclose(batch.points[0], ds[0]["points"][0] * torch.tensor([scale, 46 / 40]))
    assert batch.input_size[0].tolist() == [46, 64]
    # the union mask of an image is the union of its rows
    assert torch.equal(batch.mask[1, 0] > 0, batch.instance_mask[3:6, 0].amax(0) > 0)
    sub = batch.select_images([2])
    assert sub.num_rows == 3 and sub.classes.tolist() == [0, 1, 0] and sub.instance_mask.shape[0] == 3


def test_datamodule_loader(coco):
    path, _ = coco
    dm = CocoDataModule(train={"annotations": str(path)}, img_size=64, batch_size=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b.num_images for b in batches] == [2, 1]
    assert sum(b.num_rows for b in batches) == 9
    assert dm.val_dataloader() == []  # no val split: fit runs without validation
    with pytest.raises(DataError, match=r"data.test: give"):
        dm.test_dataloader()


def test_bad_files_name_file_and_key(tmp_path, coco):
    path, _ = coco
    data = json.loads(path.read_text())
    data["annotations"][1]["segmentation"] = {"counts": 5, "size": [1, 2]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad.json: annotation id 2 \(image id 1\): 'segmentation'"):
        CocoInstances(bad, img_size=64).instances(0)
    del data["annotations"][0]["category_id"]
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad.json: annotations\[0\] \(id 1\) has no 'category_id'"):
        CocoInstances(bad, img_size=64)
    data["annotations"][0]["category_id"] = 1
    del data["annotations"][1]["id"]  # an id names the instance's row, proposals and results: no stand-in
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"bad.json: annotations\[1\] \(id None\) has no 'id'"):
        CocoInstances(bad, img_size=64)
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        CocoInstances(bad)
    with pytest.raises(DataError, match=r"missing.json not found"):
        CocoInstances(tmp_path / "missing.json")
    (tmp_path / "images" / "im2.png").unlink()
    with pytest.raises(DataError, match=r"image id 2: file .*im2.png not found"):
        CocoInstances(path, img_size=64)[1]


def test_qc_weights_by_hand():
    """A 9 x 17 box (x 2..18, y 1..9): centre (10, 5); ellipse semi-axes 17/8 = 2.125 and 9/8 = 1.125.

    Inside: dy = 0 with |dx| <= 2, and dy = +-1 with (dx/2.125)^2 <= 1 - (1/1.125)^2 = 0.2099, i.e. dx = 0.
    Weight exp(-((dx/16)^2 + (dy/8)^2) / 0.125).
    """
    m = torch.zeros(12, 22, dtype=torch.bool)
    m[1:10, 2:19] = True
    m[5, 11] = False  # a hole: not a candidate
    xs, ys, w = qc_weights(m)
    got = sorted(zip(xs.tolist(), ys.tolist(), w.tolist()))
    expect_xy = [(8, 5), (9, 5), (10, 4), (10, 5), (10, 6), (12, 5)]
    assert [(x, y) for x, y, _ in got] == expect_xy
    for x, y, weight in got:
        assert weight == pytest.approx(
            np.exp(-(((x - 10) / 16) ** 2 + ((y - 5) / 8) ** 2) / 0.125), rel=1e-12
        )


def test_category_ids_map_to_contiguous_indices(tmp_path, coco):
    path, _ = coco
    data = json.loads(path.read_text())
    new_id = {1: 90, 2: 7}  # COCO-like gaps, listed out of order
    data["categories"] = [
        {"id": 90, "name": "thing"},
        {"id": 7, "name": "disc"},
        {"id": 13, "name": "unused"},
    ]
    for ann in data["annotations"]:
        ann["category_id"] = new_id[ann["category_id"]]
    gapped = tmp_path / "gapped.json"
    gapped.write_text(json.dumps(data))
    ds = CocoInstances(gapped, img_size=64)
    assert ds.category_ids == [7, 13, 90] and ds.label_of == {7: 0, 13: 1, 90: 2}
    batch = collate_coco([ds[0]])
    assert batch.category_ids.tolist() == [90, 7, 90] and batch.classes.tolist() == [2, 0, 2]
    assert [ds.category_ids[k] for k in batch.classes.tolist()] == batch.category_ids.tolist()
    assert CocoDataModule(train={"annotations": str(gapped)}).category_ids == [7, 13, 90]
    data["annotations"][1]["category_id"] = 5
    gapped.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"gapped.json: annotations\[1\] \(id 2\) has category_id 5, which is not"
    ):
        CocoInstances(gapped, img_size=64)
    del data["categories"]  # no list: the ids found in the annotations
    gapped.write_text(json.dumps(data))
    assert CocoInstances(gapped, img_size=64).category_ids == [5, 7, 90]


def test_aux_masks_per_instance_in_the_input_frame(tmp_path, coco):
    path, truth = coco
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann["mps"] = [ann["segmentation"], ann["segmentation"]]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(data))
    ds = CocoInstances(extra, img_size=64, aux_masks="mps")
    item = ds[0]
    assert item["aux_masks"].shape == (3, 2, 40, 56)
    assert torch.equal(item["aux_masks"][:, 1], item["instance_masks"])
    batch = collate_coco([ds[0], ds[1]])
    assert batch.aux_masks.shape == (6, 2, 64, 64) and batch.aux_masks.dtype == torch.bool
    assert torch.equal(batch.aux_masks[:, 0], batch.instance_mask[:, 0] > 0.5)  # the same resize as the rows'
    assert torch.equal(batch.select_rows([5, 0]).aux_masks, batch.aux_masks[[5, 0]])
    dm = CocoDataModule(
        train={"annotations": str(extra)}, val={"annotations": str(path)}, img_size=64, aux_masks="mps"
    )
    assert dm.dataset("train").aux_masks == "mps" and dm.dataset("val").aux_masks is None  # train split only
    del data["annotations"][0]["mps"]
    extra.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotation id 1 .*no 'mps' list of masks"):
        CocoInstances(extra, img_size=64, aux_masks="mps")[0]


def test_evaluation_splits_are_sharded_without_repeats_under_ddp(coco):
    from types import SimpleNamespace

    path, _ = coco
    dm = CocoDataModule(test={"annotations": str(path)}, img_size=64, batch_size=1)
    assert dm.test_dataloader().sampler.__class__.__name__ == "SequentialSampler"  # one process
    ids = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
        )
        ids.append([b.image_ids[0] for b in dm.test_dataloader()])
    assert ids == [[1, 2], [3]]  # 3 images: contiguous, unpadded (DistributedSampler would repeat one)


def test_images_are_resized_as_segment_anything_by_default(coco):
    """The image frame is ResizeLongestSide.apply_image of the file, bit for bit, padded with zeros;
    image_resize='bilinear' is the fast path (within one grey level) and another data fingerprint."""
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    path, _ = coco
    ds = CocoInstances(path, img_size=64)
    fast = CocoInstances(path, img_size=64, image_resize="bilinear")
    for i in range(len(ds)):
        pixels = np.asarray(Image.open(ds.root / ds.images[i]["file_name"]).convert("RGB"))
        ref = torch.from_numpy(ResizeLongestSide(64).apply_image(pixels)).permute(2, 0, 1).double() / 255
        h, w = ref.shape[-2:]
        item = ds[i]
        expected = torch.zeros_like(item["image"])
        expected[:, :h, :w] = ref.to(expected.dtype)
        assert torch.equal(item["image"], expected)
        assert item["input_size"].tolist() == [h, w]
        other = fast[i]["image"]
        assert (other - item["image"]).abs().max() <= 1 / 255 + 1e-6
    assert ds.fingerprint != fast.fingerprint
    with pytest.raises(ValueError, match="image_resize"):
        CocoInstances(path, img_size=64, image_resize="nearest")
    dm = CocoDataModule(train={"annotations": str(path)}, img_size=64, image_resize="bilinear")
    assert dm.dataset("train").image_resize == "bilinear"
