"""A batch without sample seeds (a third party's loader) is augmented per image, keyed by its id.

``GpuAugment`` draws each image's transform from its ``sample_seed`` (``ResumableLoader``); a loader that
gives none used to take one draw for the whole batch from the global generator, so an image's transform
depended on its batch-mates, its place in the batch and whatever had drawn before. Now such an image is
keyed as ``ForwardContext.rand`` keys it: its id, the run's seed (``torch.initial_seed()``) and the
epoch (``GpuAugment.set_epoch``, which the data module calls before it augments a training batch).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import DEVICES
from test_augment_per_sample import STRONG, _seeded
from torch.utils.data import DataLoader

from samflow.data import GpuAugment
from samflow.data.batch import collate
from samflow.seeding import stable_seed

S = 32
FIELDS = ("image", "mask", "box", "has_box", "points", "point_labels")


def _items() -> list[dict]:
    """Two loader items without a sample seed: an image with a square object, its box and a point."""
    gen = torch.Generator().manual_seed(0)
    items = []
    for n, (y0, x0) in enumerate([(4, 2), (16, 18)]):
        mask = torch.zeros(1, S, S)
        mask[0, y0 : y0 + 10, x0 : x0 + 10] = 1
        items.append(
            {
                "image": torch.rand(3, S, S, generator=gen) * 0.5 + mask * 0.5,
                "mask": mask,
                "gt_original": mask[0] > 0,
                "input_size": [S, S],
                "original_size": [S, S],
                "id": f"item{n}",
                "box": torch.tensor([x0, y0, x0 + 9, y0 + 9], dtype=torch.float32),
                "points": torch.tensor([[x0 + 5.0, y0 + 5.0]]),
                "point_labels": torch.tensor([1]),
            }
        )
    return items


def _loader(batch_size: int) -> list:
    return list(DataLoader(_items(), batch_size=batch_size, collate_fn=collate))


def _rows(batch) -> list[dict[str, torch.Tensor]]:
    return [{name: getattr(batch, name)[i] for name in FIELDS} for i in range(batch.num_images)]


def test_a_row_is_augmented_alike_alone_and_in_a_batch_of_two():
    (pair,) = _loader(2)
    alone = _loader(1)
    assert pair.sample_seed == [] and pair.id == ["item0", "item1"]  # a loader without seeds
    aug = GpuAugment(**STRONG)
    torch.manual_seed(7)
    together = _rows(aug(pair))
    torch.manual_seed(7)
    singles = [_rows(aug(batch))[0] for batch in alone]
    for i in range(2):
        for name in FIELDS:
            torch.testing.assert_close(singles[i][name], together[i][name], rtol=0, atol=0, msg=name)
    # the two rows were transformed differently (their own draws, not one draw repeated)
    assert not torch.equal(together[0]["image"], together[1]["image"])


def test_the_draw_is_that_of_the_images_key_and_leaves_the_global_generator_alone():
    (pair,) = _loader(2)
    aug = GpuAugment(rotation=40.0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    out = aug(pair)
    assert torch.equal(torch.get_rng_state(), state)
    # the reference: kornia's own draw for one image under the key's seed (id, run seed, epoch)
    ref = GpuAugment(rotation=40.0)
    seed = stable_seed("id", "item1", 7, 0, "augment")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        params = ref.geometric.forward_parameters(torch.Size([1, 3, S, S]))
    expected = ref.geometric({"image": pair.image[1:]}, params=params)["image"]
    torch.testing.assert_close(out.image[1:], expected, rtol=0, atol=0)


def test_epochs_and_runs_draw_afresh():
    (pair,) = _loader(2)
    aug = GpuAugment(**STRONG)
    torch.manual_seed(7)
    first = aug(pair).image
    again = aug(pair).image
    aug.set_epoch(1)
    next_epoch = aug(pair).image
    aug.set_epoch(0)
    torch.manual_seed(8)
    other_run = aug(pair).image
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # one epoch of one run: the same draw
    for i in range(2):
        assert not torch.allclose(next_epoch[i], first[i])
        assert not torch.allclose(other_run[i], first[i])


def test_without_seeds_or_ids_the_batch_takes_one_draw_from_the_global_generator():
    aug = GpuAugment(**STRONG)
    batch = _seeded(2, []).replace(id=[])
    torch.manual_seed(0)
    first = aug(batch)
    torch.manual_seed(0)
    again = aug(batch)
    torch.manual_seed(1)
    other = aug(batch)
    torch.testing.assert_close(again.image, first.image)
    assert not torch.allclose(other.image, first.image)


def test_the_data_module_hands_the_trainers_epoch_to_the_augmentation():
    """Whatever the LightningModule: the data module sets the epoch before it augments a batch."""
    from samflow.data import SegmentationDataModule

    aug = GpuAugment(hflip=0.5)
    dm = SegmentationDataModule(img_size=64, augment=aug)
    dm.trainer = SimpleNamespace(training=True, current_epoch=3)
    seen = []
    aug.forward = lambda batch: seen.append(aug.epoch) or batch  # type: ignore[method-assign]
    dm.on_after_batch_transfer(_seeded(2, [1, 2]), 0)
    assert seen == [3]


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_is_augmented_alike_alone_and_in_a_batch_on_the_device(device):
    (pair,) = _loader(2)
    alone = _loader(1)
    aug = GpuAugment(**STRONG)
    together = _rows(aug(pair.to(device)))
    singles = [_rows(aug(batch.to(device)))[0] for batch in alone]
    for i in range(2):
        for name in FIELDS:
            assert together[i][name].device.type == device, name
            torch.testing.assert_close(singles[i][name], together[i][name], rtol=1e-6, atol=1e-6, msg=name)
    assert not torch.equal(together[0]["image"], together[1]["image"])


def test_a_batch_keyed_by_id_without_set_epoch_warns_once():
    """Without ``set_epoch`` every epoch would transform an image alike: said once, by name."""
    (pair,) = _loader(2)
    aug = GpuAugment(**STRONG)
    with pytest.warns(UserWarning, match=r"GpuAugment: .*set_epoch was never called"):
        aug(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aug(pair)  # once per augmentation
        told = GpuAugment(**STRONG)
        told.set_epoch(0)
        told(pair)  # told the epoch: nothing to say
        GpuAugment(**STRONG)(_seeded(2, [5, 6]))  # sample seeds: the epoch is in them


class _Recording(torch.nn.Module):
    """An augmentation that records the epochs it is told and marks the batches it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def forward(self, batch):
        return batch.replace(id=[f"augmented {i}" for i in batch.id])


@pytest.mark.parametrize("kind", ["segmentation", "slide"])
def test_each_data_module_tells_its_augmentation_the_epoch_before_a_training_batch(kind):
    from samflow.data import SegmentationDataModule
    from samflow.data.wsi.datamodule import SlideDataModule

    dm = SegmentationDataModule(img_size=S) if kind == "segmentation" else SlideDataModule(img_size=S)
    dm.augment = _Recording()
    (pair,) = _loader(2)
    dm.trainer = SimpleNamespace(training=True, current_epoch=3)
    assert dm.on_after_batch_transfer(pair, 0).id == ["augmented item0", "augmented item1"]
    assert dm.augment.epochs == [3]
    dm.trainer = SimpleNamespace(training=False, current_epoch=4)  # evaluation: not augmented
    assert dm.on_after_batch_transfer(pair, 0).id == ["item0", "item1"] and dm.augment.epochs == [3]
