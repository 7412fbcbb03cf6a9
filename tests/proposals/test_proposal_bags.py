"""Proposal bags reach the batches: CocoInstances / CocoDataModule read `samflow proposals`' store, refuse a stale one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from tiny_coco import make_tiny_coco  # noqa: E402

from samflow.data.coco import CocoDataModule, CocoInstances  # noqa: E402
from samflow.data.coco_batch import collate_coco  # noqa: E402
from samflow.data.errors import DataError  # noqa: E402
from samflow.proposals import write_proposals  # noqa: E402


@pytest.fixture
def store(tiny_sam, tmp_path):
    path, _ = make_tiny_coco(tmp_path / "coco")
    data = CocoInstances(path, img_size=128, points_per_instance=2, seed=3)
    return path, write_proposals(tmp_path / "store", tiny_sam, data, shard_size=2)


def _decode(rle):
    return mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_rows_carry_their_first_points_bag(store):
    path, final = store
    stored = {(a["ann_id"], a["point_index"]): a for a in json.loads(final.read_text())["annotations"]}
    ds = CocoInstances(path, img_size=128, points_per_instance=2, seed=3, proposals=final.parent)
    items = [ds[0], ds[1]]
    batch = collate_coco(items)
    assert batch.proposals.shape == (6, 6, 4) and batch.proposal_scores.shape == (6, 6)
    assert len(batch.proposal_rles) == 6 and all(len(r) == 6 for r in batch.proposal_rles)
    for r in range(batch.num_rows):
        ann = stored[(int(batch.ann_ids[r]), 0)]
        b = int(batch.image_index[r])
        assert batch.proposal_rles[r] == ann["segmentation"]
        assert batch.proposal_scores[r].tolist() == pytest.approx(ann["scores"])
        (h, w), (ih, iw) = batch.original_size[b].tolist(), batch.input_size[b].tolist()
        for k in range(6):
            m = _decode(ann["segmentation"][k])
            ys, xs = np.nonzero(m)
            # exclusive-end mask extent in original pixels, scaled to the input frame
            expect = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
            scale = torch.tensor([iw / w, ih / h, iw / w, ih / h])
            assert torch.allclose(batch.proposals[r, k], torch.tensor(expect, dtype=torch.float32) * scale)
    sub = batch.select_rows([4, 1])
    assert sub.proposal_rles == [batch.proposal_rles[4], batch.proposal_rles[1]]
    assert torch.equal(sub.proposals, batch.proposals[[4, 1]])


def test_a_store_of_other_data_or_unfinished_is_refused(tiny_sam, store, tmp_path):
    path, final = store
    with pytest.raises(
        DataError, match=r"proposals.json: proposals of other data \(differs in: data\).*samflow proposals"
    ):
        CocoInstances(path, img_size=128, points_per_instance=2, seed=4, proposals=final)
    with pytest.raises(DataError, match=r"differs in: img_size"):
        CocoInstances(path, img_size=64, points_per_instance=2, seed=3, proposals=final)
    data = CocoInstances(path, img_size=128, points_per_instance=2, seed=3)
    assert write_proposals(tmp_path / "half", tiny_sam, data, shard_size=1, max_shards=1) is None
    with pytest.raises(DataError, match=r"half: the proposal store is unfinished.*--out .*half again"):
        CocoInstances(path, img_size=128, points_per_instance=2, seed=3, proposals=tmp_path / "half")
    with pytest.raises(DataError, match=r"proposals .*nowhere.json not found"):
        CocoInstances(path, img_size=128, points_per_instance=2, seed=3, proposals=tmp_path / "nowhere.json")


def test_datamodule_checks_the_runs_sam(tiny_sam, store):
    path, final = store
    dm = CocoDataModule(
        train={"annotations": str(path)}, img_size=128, points_per_instance=2, seed=3, proposals=str(final)
    )
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model=SimpleNamespace(sam=tiny_sam)))
    dm.setup("fit")  # the same SAM: accepted
    assert next(iter(dm.train_dataloader())).proposals.shape[1] == 6
    other = CocoDataModule(
        train={"annotations": str(path)}, img_size=128, points_per_instance=2, seed=3, proposals=str(final)
    )
    with torch.no_grad():
        tiny_sam.mask_decoder.iou_prediction_head.layers[0].bias.add_(1.0)
    other.trainer = dm.trainer
    with pytest.raises(DataError, match=r"proposals of another SAM checkpoint.*differs in: sam"):
        other.setup("fit")
    val_only = CocoDataModule(val={"annotations": str(path)}, img_size=128, proposals=str(final))
    val_only.setup("validate")  # the store belongs to the train split only
    assert val_only.dataset("val").proposals is None
