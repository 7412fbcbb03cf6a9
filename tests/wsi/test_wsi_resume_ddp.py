"""``SlideDataModule``'s training patches on 2 DDP ranks (WSI-SAM's runs): each rank its own shard of
the epoch's patches, the two together every patch once, and a run killed mid-epoch resumes every
rank's remaining patches (centres, order, flips, jitter and prompts).

The ranks are a faked process group in this process: ``ResumableSampler`` reads the world from
``torch.distributed`` (``is_initialized`` / ``get_world_size`` / ``get_rank``) when iterated, and
nothing else of the loader depends on it (worker processes get indices, not the sampler), so
patching those three functions is what a gloo run gives the sampler. ``test_resume_ddp.py`` in
tests/reliability runs the real 2-process fit for the default data module.
"""

from __future__ import annotations

from collections import Counter

import pytest

pytest.importorskip("tiffslide")

import helpers
from helpers import rank_of_two
from synthetic_slide import write_geojson, write_slide

from samflow.data.wsi import SlideDataModule

SIZES = {"9_patches_uneven": 9, "10_patches_even": 10}  # patches_per_slide of the one slide


def key(batch) -> tuple:
    """A batch as its patches (slide@centre) and what the model sees of them: both views (flips,
    colour jitter) and the prompts."""
    prompts = [t for t in (batch.points, batch.box, batch.mask_prompt) if t is not None]
    return (
        tuple(batch.id),
        batch.image.double().sum().item(),
        batch.context_image.double().sum().item(),
        [p.double().sum().item() for p in prompts],
    )


def run_epoch(loader, epoch: int, stop: int | None = None) -> list[tuple]:
    return helpers.run_epoch(loader, epoch, key, stop)


def patches(batches: list[tuple]) -> list[str]:
    return [patch for batch in batches for patch in batch[0]]


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("slide_ddp")
    path, _ = write_slide(folder)
    return {"slide": str(path), "annotations": str(write_geojson(folder))}


@pytest.fixture
def make_loader(entry, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")

    def make(size: int, workers: int):
        data = SlideDataModule(
            train=[entry],
            patch_size=32,
            img_size=32,
            patches_per_slide=size,
            batch_size=2,
            hflip_jitter=True,
            num_workers=workers,
        )
        data.setup("fit")
        return data.train_dataloader()

    return make


@pytest.mark.parametrize("workers", [0, 2], ids=["0_workers", "2_workers"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_each_rank_trains_its_own_shard_and_the_two_cover_the_epoch_once(make_loader, size, workers):
    """Per epoch, the two ranks' patches are those of one process, each once, except the padding
    ``DistributedSampler`` documents for a size the ranks do not divide (it repeats the first patches
    of the epoch's order so both ranks run the same number of batches); each epoch new centres."""
    single = make_loader(size, workers)  # one process: the epoch's patches
    per_rank: dict[int, list[list[tuple]]] = {}
    for rank in (0, 1):
        with rank_of_two(rank):
            loader = make_loader(size, workers)
            per_rank[rank] = [run_epoch(loader, 0), run_epoch(loader, 1)]
            assert len(loader) == len(per_rank[rank][1])  # the steps Lightning plans are those it gets
    for epoch in (0, 1):
        everything = patches(run_epoch(single, epoch))
        assert len(everything) == len(set(everything)) == size
        shards = [patches(per_rank[rank][epoch]) for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == -(-size // 2)  # the same number of patches on each rank
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch])  # and of batches: no rank waits alone
        counts = Counter(shards[0] + shards[1])
        assert set(counts) == set(everything)  # none missing, none from elsewhere
        pad = -size % 2  # the repeats that pad the epoch to a multiple of the ranks
        assert sorted(counts.values()) == [1] * (size - pad) + [2] * pad  # each once, but for the padding
        assert shards[0] != shards[1]
    for rank in (0, 1):
        assert not set(patches(per_rank[rank][0])) & set(patches(per_rank[rank][1]))  # new centres


@pytest.mark.parametrize("workers", [0, 2], ids=["0_workers", "2_workers"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_two_rank_run_killed_mid_epoch_resumes_each_ranks_remaining_batches(make_loader, size, workers):
    """Killed after the first batch of epoch 1 on both ranks and resumed in fresh processes, whose
    loaders are built before the process group starts and restored from rank 0's loader state (the
    checkpoint's), every rank trains the rest of the patches its uninterrupted run trains, with the
    same views and prompts."""
    uninterrupted, trained, states = {}, {}, []
    for rank in (0, 1):
        with rank_of_two(rank):
            loader = make_loader(size, workers)
            run_epoch(loader, 0)
            uninterrupted[rank] = run_epoch(loader, 1)
            killed = make_loader(size, workers)
            run_epoch(killed, 0)
            trained[rank] = run_epoch(killed, 1, stop=1)
            states.append(killed.state_dict())
        assert len(uninterrupted[rank]) == 3  # 5 patches a rank, 2 a batch: the resume is mid-epoch
    assert states[0] == states[1] == {"seed": 0, "epoch": 1, "batches": 1}  # no rank's own position
    for rank in (0, 1):
        resumed = make_loader(size, workers)  # a fresh process: the loader exists before DDP does
        with rank_of_two(rank):
            resumed.load_state_dict(states[0])  # every rank restores rank 0's checkpoint
            rest = run_epoch(resumed, 1)
        assert len(rest) == 2
        assert trained[rank] + rest == uninterrupted[rank], rank
    assert patches(uninterrupted[0]) != patches(uninterrupted[1])
