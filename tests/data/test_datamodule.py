"""``SegmentationDataModule``: splits, prompt seeding, predict without masks, config parsing, Trainer use."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from samflow.data import GpuAugment, SegmentationDataModule


@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quickstart")


def _module(root: Path, **kwargs) -> SegmentationDataModule:
    options = dict(img_size=32, batch_size=4, quickstart={"root": str(root), "n_train": 8, "n_val": 4})
    return SegmentationDataModule(**{**options, **kwargs})


def test_quickstart_fills_train_val_and_test(quickstart_root: Path) -> None:
    dm = _module(quickstart_root)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["val"]) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["boxes"].shape == (4, 4)
    assert len(next(iter(dm.test_dataloader()))["id"]) == 4  # test falls back to the quickstart's val


def test_val_prompts_repeat_each_epoch_train_prompts_do_not(quickstart_root: Path) -> None:
    dm = _module(quickstart_root, prompt={"name": "points", "positive": 2, "negative": 2})
    dm.setup("fit")
    val = [torch.cat([b["points"] for b in dm.val_dataloader()]) for _ in range(2)]
    assert torch.equal(val[0], val[1])
    train_loader = dm._loader("train", shuffle=False)
    train = [torch.cat([b["points"] for b in train_loader]) for _ in range(2)]
    assert not torch.equal(train[0], train[1])
    torch.manual_seed(5)  # but seed_everything makes them reproducible
    first = next(iter(train_loader))["points"]
    torch.manual_seed(5)
    assert torch.equal(first, next(iter(train_loader))["points"])


def test_eval_prompt_overrides_prompt(quickstart_root: Path) -> None:
    dm = _module(quickstart_root, prompt="box", eval_prompt="noisy_mask")
    assert "boxes" in dm.batch_example("train") and "boxes" not in dm.batch_example("val")
    assert dm.batch_example("val")["mask_prompt"].shape == (2, 1, 8, 8)


def test_predict_on_a_plain_image_folder(tmp_path: Path, pngs: SimpleNamespace) -> None:
    for i in range(3):
        pngs.image(tmp_path / "photos" / f"p{i}.jpg", 10 + i, 20)
    dm = SegmentationDataModule(predict=str(tmp_path / "photos"), img_size=32, batch_size=2)
    with pytest.warns(UserWarning, match="without prompts"):
        dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [len(b["id"]) for b in batches] == [2, 1] and "mask" not in batches[0]
    assert batches[0]["original_size"].tolist() == [[10, 20], [11, 20]]


def test_missing_split_says_which_key_to_set(pair_root: Path) -> None:
    dm = SegmentationDataModule(train=str(pair_root), img_size=16)
    dm.setup("fit")
    assert dm.val_dataloader() == []  # no validation is allowed
    with pytest.raises(ValueError, match="set data.test"):
        dm.test_dataloader()


def test_builds_from_a_config_like_lightning_cli(pair_root: Path) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "train": [{"root": str(pair_root), "images": "images"}, str(pair_root)],
                "val": {"root": str(pair_root)},
                "img_size": 16,
                "prompt": {"name": "box", "jitter": 0.1},
                "augment": {"class_path": "samflow.data.GpuAugment", "init_args": {"hflip": 0.5}},
            }
        }
    )
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm.augment, GpuAugment)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 3


class _Probe(L.LightningModule):
    """Records what reaches training_step and validation_step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[str, list] = {"train": [], "val": []}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch["input_size"].clone())
        return (self.weight - batch["image"].mean()) ** 2

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen["val"].append(batch["input_size"].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_augments_training_batches_only(quickstart_root: Path) -> None:
    dm = _module(quickstart_root, augment=GpuAugment(hflip=1.0))
    probe = _Probe()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(probe, datamodule=dm)
    assert all((size == 32).all() for size in probe.seen["train"])  # augmented: the S x S frame
    assert len(probe.seen["val"]) == 1 and (probe.seen["val"][0] < 32).any()  # not augmented
