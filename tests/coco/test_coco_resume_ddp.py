"""``CocoDataModule``'s training loader on 2 DDP ranks (SAPNet's runs): each rank its own shard, the
two together the epoch once, and a run killed mid-epoch resumes every rank's remaining batches.

The ranks are a faked process group in this process: ``ResumableSampler`` reads the world from
``torch.distributed`` (``is_initialized`` / ``get_world_size`` / ``get_rank``) when iterated, and
nothing else of the loader depends on it (worker processes get indices, not the sampler), so
patching those three functions is what a gloo run gives the sampler. ``test_resume_ddp.py`` in
tests/reliability runs the real 2-process fit for the default data module.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("pycocotools")

import helpers
from helpers import rank_of_two
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoDataModule

COPIES = 3  # the tiny set's 4 images (one without instances) 3 times: 9 images with instances, 12 in all
SIZES = {"9_images_uneven": "skip", "12_images_even": "keep"}  # empty= -> images in the epoch


def key(batch) -> tuple:
    """A batch as its images and what the model sees of them (pixels, prompt points)."""
    return tuple(batch.image_ids), batch.image.double().sum().item(), batch.points.double().sum().item()


def run_epoch(loader, epoch: int, stop: int | None = None) -> list[tuple]:
    return helpers.run_epoch(loader, epoch, key, stop)


def images(batches: list[tuple]) -> list[int]:
    return [image for batch in batches for image in batch[0]]


@pytest.fixture(scope="module")
def annotations(tmp_path_factory) -> str:
    """The tiny COCO set, each image and its annotations listed ``COPIES`` times under new ids."""
    path, _ = make_tiny_coco(tmp_path_factory.mktemp("coco_ddp"))
    data = json.loads(path.read_text())
    imgs, anns = [], []
    for k in range(COPIES):
        imgs += [{**img, "id": img["id"] + 100 * k} for img in data["images"]]
        anns += [
            {**ann, "id": ann["id"] + 1000 * k, "image_id": ann["image_id"] + 100 * k}
            for ann in data["annotations"]
        ]
    path.write_text(json.dumps({**data, "images": imgs, "annotations": anns}))
    return str(path)


@pytest.fixture
def make_loader(annotations, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")

    def make(empty: str, workers: int):
        data = CocoDataModule(
            train={"annotations": annotations}, img_size=64, batch_size=2, empty=empty, num_workers=workers
        )
        data.setup("fit")
        return data.train_dataloader()

    return make


@pytest.mark.parametrize("workers", [0, 2], ids=["0_workers", "2_workers"])
@pytest.mark.parametrize("empty", SIZES.values(), ids=SIZES.keys())
def test_each_rank_trains_its_own_shard_and_the_two_cover_the_epoch_once(make_loader, empty, workers):
    """Per epoch, the two ranks' images are those of one process, each once, except the padding
    ``DistributedSampler`` documents for a size the ranks do not divide (it repeats the first images
    of the epoch's order so both ranks run the same number of batches); each epoch in its own order."""
    single = make_loader(empty, workers)  # one process: the epoch's images
    per_rank: dict[int, list[list[tuple]]] = {}
    for rank in (0, 1):
        with rank_of_two(rank):
            loader = make_loader(empty, workers)
            per_rank[rank] = [run_epoch(loader, 0), run_epoch(loader, 1)]
            assert len(loader) == len(per_rank[rank][1])  # the steps Lightning plans are those it gets
    for epoch in (0, 1):
        everything = images(run_epoch(single, epoch))
        n = len(everything)
        assert n == {"skip": 9, "keep": 12}[empty] and len(set(everything)) == n
        shards = [images(per_rank[rank][epoch]) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == -(-n // 2)  # the same number of samples on each rank
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch])  # and of batches: no rank waits alone
        counts = Counter(shards[0] + shards[1])
        assert set(counts) == set(everything)  # none missing, none from elsewhere
        pad = -n % 2  # the repeats that pad the epoch to a multiple of the ranks
        assert sorted(counts.values()) == [1] * (n - pad) + [2] * pad  # each once, but for the padding
        assert shards[0] != shards[1]
    for rank in (0, 1):
        assert images(per_rank[rank][0]) != images(per_rank[rank][1])  # a new order (and shard) each epoch


@pytest.mark.parametrize("workers", [0, 2], ids=["0_workers", "2_workers"])
@pytest.mark.parametrize("empty", SIZES.values(), ids=SIZES.keys())
def test_a_two_rank_run_killed_mid_epoch_resumes_each_ranks_remaining_batches(make_loader, empty, workers):
    """Killed after the first batch of epoch 1 on both ranks and resumed in fresh processes, whose
    loaders are built before the process group starts and restored from rank 0's loader state (the
    checkpoint's), every rank trains the rest of the batches its uninterrupted run trains."""
    uninterrupted, trained, states = {}, {}, []
    for rank in (0, 1):
        with rank_of_two(rank):
            loader = make_loader(empty, workers)
            run_epoch(loader, 0)
            uninterrupted[rank] = run_epoch(loader, 1)
            killed = make_loader(empty, workers)
            run_epoch(killed, 0)
            trained[rank] = run_epoch(killed, 1, stop=1)
            states.append(killed.state_dict())
        assert len(uninterrupted[rank]) == 3  # 5 or 6 images a rank, 2 a batch: the resume is mid-epoch
    assert states[0] == states[1] == {"seed": 0, "epoch": 1, "batches": 1}  # no rank's own position
    for rank in (0, 1):
        resumed = make_loader(empty, workers)  # a fresh process: the loader exists before DDP does
        with rank_of_two(rank):
            resumed.load_state_dict(states[0])  # every rank restores rank 0's checkpoint
            rest = run_epoch(resumed, 1)
        assert len(rest) == 2
        assert trained[rank] + rest == uninterrupted[rank], rank
    assert images(uninterrupted[0]) != images(uninterrupted[1])
