"""`samflow proposals`: six proposals per point on the tiny SAM, resume gives identical bytes, stale key refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from tiny_coco import make_tiny_coco  # noqa: E402

from samflow.data.coco import CocoInstances  # noqa: E402
from samflow.data.coco_batch import collate_coco  # noqa: E402
from samflow.proposals import KINDS, ProposalStoreError, propose_batch, write_proposals  # noqa: E402
from samflow.sam import HookedSam  # noqa: E402


@pytest.fixture
def data(tmp_path):
    path, _ = make_tiny_coco(tmp_path / "coco")
    return CocoInstances(path, img_size=128, points_per_instance=2, seed=3)


def test_six_per_point_and_store_contents(tiny_sam, data, tmp_path):
    final = write_proposals(tmp_path / "store", tiny_sam, data, batch_size=2, shard_size=2)
    out = json.loads(final.read_text())
    anns = out["annotations"]
    assert len(anns) == 9 * 2  # 9 instances x 2 points
    assert out["info"]["proposal_kinds"] == list(KINDS)
    first = data.instances(0)
    for ann in anns:
        assert len(ann["bbox"]) == len(ann["segmentation"]) == len(ann["scores"]) == 6
        img = next(i for i in out["images"] if i["id"] == ann["image_id"])
        for rle, box in zip(ann["segmentation"], ann["bbox"]):
            m = mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            assert m.shape == (img["height"], img["width"])
            ys, xs = np.nonzero(m)
            expect = (
                [0, 0, 0, 0]
                if not len(xs)
                else [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            )
            assert box == [float(v) for v in expect]
    a0 = anns[0]
    assert a0["point"] == [round(v, 4) for v in first["points"][0, 0].tolist()]
    x0, y0, x1, y1 = first["boxes"][0].tolist()
    assert a0["true_bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def test_proposals_are_sam_outputs(tiny_sam, data):
    """Proposals 0-3 are SAM's tokens 1, 2, 3, 0 for the point; 4 re-prompts with the best token's box."""
    batch = collate_coco([data[0]])
    rows = batch.select_rows([0]).replace(
        points=batch.points[:1, :1], point_labels=torch.ones(1, 1, dtype=torch.long)
    )
    model = HookedSam(tiny_sam).eval()
    logits, scores = propose_batch(model, rows)
    assert logits.shape[:2] == (1, 6) and scores.shape == (1, 6)
    ref = model(rows.replace(box=None, has_box=None))
    assert torch.equal(logits[0, :3], ref.masks["sam"][0, 1:4])
    assert torch.equal(logits[0, 3], ref.masks["sam"][0, 0])
    best = int(ref.iou_pred[0, 1:4].argmax())
    up = F.interpolate(ref.masks["sam"][:, 1 + best : 2 + best], (128, 128), mode="bilinear") > 0
    h, w = rows.input_size[0].tolist()
    up[..., h:, :] = False
    up[..., :, w:] = False
    ys, xs = torch.nonzero(up[0, 0], as_tuple=True)
    box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=torch.float32)
    ref2 = model(rows.replace(box=box, has_box=torch.tensor([True])))
    assert torch.allclose(logits[0, 4], ref2.masks["sam"][0, 0], atol=1e-5)
    assert torch.allclose(scores[0, 4], ref2.iou_pred[0, 0], atol=1e-6)


def test_resume_after_interruption_is_byte_identical(tiny_sam, data, tmp_path):
    whole = write_proposals(tmp_path / "a", tiny_sam, data, batch_size=1, shard_size=1)
    assert write_proposals(tmp_path / "b", tiny_sam, data, batch_size=1, shard_size=1, max_shards=2) is None
    assert sorted(p.name for p in (tmp_path / "b" / "shards").glob("*.json")) == [
        "000000.json",
        "000001.json",
    ]
    assert not (tmp_path / "b" / "proposals.json").exists()
    ticks: list[int] = []
    resumed = write_proposals(
        tmp_path / "b", tiny_sam, data, batch_size=1, shard_size=1, progress=lambda total: ticks.append
    )
    assert ticks == [2, 3, 3]  # finished shards: two found done, then the one computed (and at the end)
    assert resumed.read_bytes() == whole.read_bytes()


def test_stale_store_refused(tiny_sam, data, tmp_path):
    write_proposals(tmp_path / "s", tiny_sam, data, shard_size=2)
    other = HookedSam(tiny_sam).sam  # the same module: change one weight
    with torch.no_grad():
        other.mask_decoder.iou_prediction_head.layers[0].bias.add_(1.0)
    with pytest.raises(ProposalStoreError, match=r"made with other settings \(differs in: sam\)"):
        write_proposals(tmp_path / "s", other, data, shard_size=2)
    seeded = CocoInstances(data.file, img_size=128, points_per_instance=2, seed=4)
    with pytest.raises(ProposalStoreError, match=r"differs in: sam, data"):
        write_proposals(tmp_path / "s", other, seeded, shard_size=2)
    again = write_proposals(tmp_path / "s", other, data, shard_size=2, overwrite=True)
    assert json.loads(again.read_text())["info"]["samflow_key"]["sam"] != ""


def test_rank_split_gives_the_same_file(tiny_sam, data, tmp_path):
    """Two ranks (run one after the other, no process group): shard i on rank i % 2; the merge equals one process's."""
    whole = write_proposals(tmp_path / "one", tiny_sam, data, shard_size=1)
    root = tmp_path / "two"
    assert write_proposals(root, tiny_sam, data, shard_size=1, rank=0, world=2, max_shards=0) is None
    write_proposals(root, tiny_sam, data, shard_size=1, rank=1, world=2)
    assert sorted(p.name for p in (root / "shards").glob("*.json")) == ["000001.json"]
    seen: list[tuple[int, int]] = []
    final = write_proposals(
        root, tiny_sam, data, shard_size=1, rank=0, world=2, progress=lambda t: lambda n: seen.append((n, t))
    )
    assert seen == [(1, 3), (2, 3), (3, 3), (3, 3)]  # rank 0's bar counts rank 1's shard too, of all 3
    assert final.read_bytes() == whole.read_bytes()


def test_encoder_runs_once_per_image(tiny_sam, data, tmp_path):
    """The re-prompting pass reads the embeddings of the first pass: one patch embedding per image."""
    calls: list[int] = []
    tiny_sam.image_encoder.patch_embed.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    write_proposals(tmp_path / "c", tiny_sam, data, batch_size=3, shard_size=3)
    assert sum(calls) == len(data) == 3


def test_every_rank_refuses_a_stale_store_before_the_barrier(tiny_sam, data, tmp_path):
    """Under DDP only rank 0 used to check the manifest: the others waited at the barrier (a hang, rank 0
    having stopped) and would have written shards of other data into the stale store."""
    root = tmp_path / "s"
    write_proposals(root, tiny_sam, data, shard_size=1)
    before = {p.name: p.read_bytes() for p in (root / "shards").glob("*.json")}
    seeded = CocoInstances(data.file, img_size=128, points_per_instance=2, seed=4)
    barriers: list[int] = []
    for rank in (0, 1):
        with pytest.raises(ProposalStoreError, match=r"differs in: data"):
            write_proposals(
                root, tiny_sam, seeded, shard_size=1, rank=rank, world=2, barrier=lambda: barriers.append(1)
            )
    assert barriers == []
    assert {p.name: p.read_bytes() for p in (root / "shards").glob("*.json")} == before


def test_stored_masks_decode_to_sams_postprocessed_proposals(tiny_sam, data, tmp_path):
    """Each stored RLE is SAM's own ``postprocess_masks`` of the proposal's logits, thresholded at 0, and
    the annotations are the instances' points in order (image, instance, point)."""
    final = write_proposals(tmp_path / "store", tiny_sam, data, batch_size=2, shard_size=2)
    anns = iter(json.loads(final.read_text())["annotations"])
    model = HookedSam(tiny_sam).eval()
    seen = 0
    for index in range(len(data)):  # each image alone, one row per (instance, point)
        batch = collate_coco([data[index]])
        n, p = batch.points.shape[:2]
        rows = batch.select_rows(torch.arange(n).repeat_interleave(p)).replace(
            points=batch.points.reshape(n * p, 1, 2), point_labels=torch.ones(n * p, 1, dtype=torch.long)
        )
        logits, scores = propose_batch(model, rows)
        size, original = tuple(batch.input_size[0].tolist()), tuple(batch.original_size[0].tolist())
        for r in range(n * p):
            ann = next(anns)
            seen += 1
            assert (ann["id"], ann["image_id"], ann["ann_id"], ann["point_index"]) == (
                seen,
                batch.image_ids[0],
                int(batch.ann_ids[r // p]),
                r % p,
            )
            masks = tiny_sam.postprocess_masks(logits[r : r + 1], size, original)[0] > 0
            decoded = [
                mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
                for rle in ann["segmentation"]
            ]
            assert np.array_equal(np.stack(decoded), masks.numpy())
            assert ann["scores"] == pytest.approx(scores[r].tolist(), abs=1e-6)
    assert next(anns, None) is None
