"""Each training image's augmentation is drawn from its own sample seed, not from the batch.

``ResumableLoader`` gives every training item a seed from (run seed, epoch, index); ``GpuAugment`` draws
each image's flips, affine and colour from it. Before, one draw from the process's global generator
served the batch: an image's transform depended on its place in the batch and the batch's size, and DDP
ranks, which share one global generator state, applied the same transforms to their i-th images.
"""

from __future__ import annotations

import pytest
import torch
from test_gpu_augment import S, _batch

from samflow.data import GpuAugment
from samflow.data.batch import collate
from samflow.data.resumable import ResumableLoader, SeededSamples
from samflow.sam.build import build_sam

STRONG = dict(hflip=0.5, vflip=0.5, rotation=40.0, scale=(0.6, 1.4), translate=0.2, color_jitter=0.3)


def _seeded(n: int, seeds: list[int]):
    """``n`` images with boxes, points and mask prompts (the hand-made pair of test_gpu_augment, repeated
    with fresh pixels) carrying ``seeds``."""
    batches = [_batch() for _ in range(-(-n // 2))]
    whole = batches[0]
    for more in batches[1:]:
        whole = whole.replace(
            **{
                name: torch.cat([getattr(whole, name), getattr(more, name)])
                for name in ("image", "mask", "input_size", "original_size", "box", "has_box", "points")
                + ("point_labels", "mask_prompt", "has_mask_prompt")
            },
            gt_original=whole.gt_original + more.gt_original,
            id=whole.id + more.id,
            image_index=torch.arange(len(whole.id) + len(more.id)),
        )
    return whole.select_images(list(range(n))).replace(sample_seed=seeds)


FIELDS = ("image", "mask", "box", "has_box", "points", "point_labels", "mask_prompt")


def _row(batch, i):
    return {name: getattr(batch, name)[i] for name in FIELDS}


def test_an_image_is_augmented_alike_alone_in_any_batch_and_at_any_place():
    aug = GpuAugment(**STRONG)
    seeds = [11, 12, 13, 14]
    batch = _seeded(4, seeds)
    together = aug(batch)
    reordered = batch.select_images([3, 2, 1, 0])
    backwards = aug(reordered.select_rows(torch.argsort(reordered.image_index)))
    for i in range(4):
        alone = aug(batch.select_images([i]))
        for name, value in _row(together, i).items():
            torch.testing.assert_close(_row(alone, 0)[name], value, msg=name)
            torch.testing.assert_close(_row(backwards, 3 - i)[name], value, msg=name)


def test_one_image_under_other_seeds_gets_other_transforms_and_the_same_seed_the_same():
    aug = GpuAugment(rotation=40.0, color_jitter=0.3)
    many = _seeded(6, [1, 2, 3, 4, 5, 1])
    many = many.replace(image=many.image[:1].repeat(6, 1, 1, 1), mask=many.mask[:1].repeat(6, 1, 1, 1))
    out = aug(many)
    images = out.image
    assert all(not torch.allclose(images[i], images[j]) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(images[5], images[0])


def test_seeded_draws_leave_the_global_generator_and_cuda_alone(monkeypatch):
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    batch, aug = _seeded(2, [5, 6]), GpuAugment(**STRONG)
    state = torch.get_rng_state()
    aug(batch)
    build_sam("tiny", seed=3)
    SeededSamples([{"x": 1}])[(7, 0)]
    assert torch.equal(torch.get_rng_state(), state)
    assert reseeded == [], "a sample's or SAM's seed went into the process's CUDA generator"


@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_carry_each_items_sample_seed(workers):
    items = [{"image": torch.full((3, S, S), float(i)), "input_size": [S, S], "original_size": [S, S],
              "id": str(i)} for i in range(5)]  # fmt: skip
    loader = ResumableLoader(items, batch_size=2, shuffle=True, collate_fn=collate, num_workers=workers)
    seen = {}
    for batch in loader:
        assert len(batch.sample_seed) == batch.num_images
        seen.update(zip(batch.id, batch.sample_seed))
    assert sorted(seen) == [str(i) for i in range(5)] and len(set(seen.values())) == 5
    assert collate([{k: v for k, v in items[0].items()}]).sample_seed == []
