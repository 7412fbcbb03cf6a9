"""``SegmentationDataModule``: splits, prompt seeding, predict without masks, config parsing, Trainer use."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from samflow.batch import SamBatch
from samflow.data import DataError, GpuAugment, SegmentationDataModule


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
    assert isinstance(batch, SamBatch)
    assert batch.image.shape == (4, 3, 32, 32) and batch.box.shape == (4, 4)
    assert len(next(iter(dm.test_dataloader())).id) == 4  # test falls back to the quickstart's val


def test_val_prompts_repeat_each_epoch_train_prompts_change_with_the_epoch(quickstart_root: Path) -> None:
    dm = _module(quickstart_root, prompt={"name": "points", "positive": 2, "negative": 2})
    dm.setup("fit")
    val = [torch.cat([b.points for b in dm.val_dataloader()]) for _ in range(2)]
    assert torch.equal(val[0], val[1])
    train_loader = dm._loader("train", shuffle=False)
    train = []
    for epoch in (0, 1, 0):
        train_loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch's start
        train.append(torch.cat([b.points for b in train_loader]))
    assert not torch.equal(train[0], train[1])  # new prompts each epoch
    assert torch.equal(train[0], train[2])  # drawn from (seed, epoch, index): a resumed epoch repeats them


def test_eval_prompt_overrides_prompt(quickstart_root: Path) -> None:
    dm = _module(quickstart_root, prompt="box", eval_prompt="noisy_mask")
    assert dm.batch_example("train").box is not None and dm.batch_example("val").box is None
    assert dm.batch_example("val").mask_prompt.shape == (2, 1, 8, 8)


def test_predict_on_a_plain_image_folder(tmp_path: Path, pngs: SimpleNamespace) -> None:
    for i in range(3):
        pngs.image(tmp_path / "photos" / f"p{i}.jpg", 10 + i, 20)
    dm = SegmentationDataModule(predict=str(tmp_path / "photos"), img_size=32, batch_size=2)
    with pytest.warns(UserWarning, match="without prompts"):
        dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [len(b.id) for b in batches] == [2, 1] and batches[0].mask is None
    assert batches[0].gt_original is None and batches[0].box is None  # no masks: no prompts
    assert batches[0].original_size.tolist() == [[10, 20], [11, 20]]


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

    def training_step(self, batch: SamBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, SamBatch)
        self.seen["train"].append(batch.input_size.clone())
        return (self.weight - batch.image.mean()) ** 2

    def validation_step(self, batch: SamBatch, batch_idx: int) -> None:
        assert isinstance(batch, SamBatch)
        self.seen["val"].append(batch.input_size.clone())

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
    assert len(probe.seen["train"]) == 2  # both training batches were seen (all() of nothing is True)
    assert all((size == 32).all() for size in probe.seen["train"])  # augmented: the S x S frame
    assert len(probe.seen["val"]) == 1 and (probe.seen["val"][0] < 32).any()  # not augmented


# ---- named evaluation sets (val_sets / test_sets) ----
def _sets(tmp_path: Path, pngs: SimpleNamespace, sizes: dict[str, int]) -> dict[str, str]:
    """One root per name with ``n`` pairs each; names keep their (non-alphabetical) order."""
    return {
        name: str(pngs.pairs(tmp_path / name, [f"{name}{i}" for i in range(n)])) for name, n in sizes.items()
    }


def test_named_test_sets_give_one_loader_each_in_order(tmp_path: Path, pngs: SimpleNamespace) -> None:
    roots = _sets(tmp_path, pngs, {"Zeta": 3, "Alpha": 2})
    dm = SegmentationDataModule(test_sets=roots, img_size=16, batch_size=2)
    assert dm.test_names == ["Zeta", "Alpha"] and dm.val_names == []
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and [len(loader.dataset) for loader in loaders] == [3, 2]
    assert next(iter(loaders[1])).id == ["Alpha0", "Alpha1"]
    assert dm.batch_example("test/Alpha").id == ["Alpha0", "Alpha1"]
    assert dm.batch_example("test").id == ["Zeta0", "Zeta1"]  # a bare split means its first set


def test_named_val_sets_and_dict_specs(tmp_path: Path, pngs: SimpleNamespace) -> None:
    roots = _sets(tmp_path, pngs, {"B": 1, "A": 2})
    val_sets = {"B": roots["B"], "A": {"root": roots["A"], "images": "images", "masks": "masks"}}
    dm = SegmentationDataModule(train=roots["A"], val_sets=val_sets, img_size=16)
    assert dm.val_names == ["B", "A"]
    dm.setup("fit")
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [1, 2]
    assert set(dm.datasets) == {"train", "val/B", "val/A"}


def test_plain_splits_are_named_after_the_split(pair_root: Path, quickstart_root: Path) -> None:
    dm = SegmentationDataModule(val=str(pair_root), test=str(pair_root), img_size=16)
    assert dm.val_names == ["val"] and dm.test_names == ["test"]
    assert not isinstance(dm.test_dataloader(), list)  # one set: one loader, as before
    assert SegmentationDataModule(train=str(pair_root)).test_names == []
    assert _module(quickstart_root).test_names == ["test"]  # the quickstart's val stands in


def test_named_set_forms_are_unambiguous(pair_root: Path) -> None:
    with pytest.raises(ValueError, match="data.test or data.test_sets, not both"):
        SegmentationDataModule(test=str(pair_root), test_sets={"A": str(pair_root)})
    with pytest.raises(ValueError, match=r"data.test is a mapping without a 'root' key.*use data.test_sets"):
        SegmentationDataModule(test={"COD10K": str(pair_root), "CAMO": str(pair_root)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        SegmentationDataModule(val_sets={})
    with pytest.raises(ValueError, match=r"data.val_sets.A has no split spec"):
        SegmentationDataModule(val_sets={"A": None})
    with pytest.raises(ValueError, match=r"data.test_sets.A is a mapping without a 'root' key"):
        SegmentationDataModule(test_sets={"A": {"images": "Imgs"}})


def test_missing_root_fails_at_setup_naming_the_key_and_path(tmp_path: Path, pair_root: Path) -> None:
    missing = tmp_path / "nowhere" / "CAMO" / "test"
    dm = SegmentationDataModule(test_sets={"COD10K": str(pair_root), "CAMO": str(missing)}, img_size=16)
    assert dm.test_names == ["COD10K", "CAMO"]  # building the module checks no path
    with pytest.raises(DataError, match=rf"data.test_sets.CAMO: Dataset root {missing} does not exist"):
        dm.setup("test")
    with pytest.raises(ValueError, match=r"no test set named 'NC4K'; the sets are \['COD10K', 'CAMO'\]"):
        dm.batch_example("test/NC4K")


def test_a_fit_finds_the_test_paths_too_without_checking_their_files(
    tmp_path: Path, pair_root: Path, pngs: SimpleNamespace
) -> None:
    """setup("fit") lists the test sets (a wrong path stops the fit before training) but builds,
    keeps and file-checks only train and val: a corrupt test image is found by `samflow test`."""
    missing = tmp_path / "nowhere" / "CAMO" / "test"
    dm = SegmentationDataModule(
        train=str(pair_root), val=str(pair_root), test_sets={"CAMO": str(missing)}, img_size=16
    )
    with pytest.raises(DataError, match=rf"data.test_sets.CAMO: Dataset root {missing} does not exist"):
        dm.setup("fit")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pair_root, corrupt)
    next((corrupt / "images").iterdir()).write_bytes(b"not an image")
    dm = SegmentationDataModule(
        train=str(pair_root), val=str(pair_root), test_sets={"CAMO": str(corrupt)}, img_size=16
    )
    dm.setup("fit")
    assert sorted(dm.datasets) == ["train", "val"]
    with pytest.raises(DataError, match=r"data.test_sets.CAMO: 1 of \d+ files cannot be used"):
        dm.setup("test")


def test_named_sets_parse_like_lightning_cli(pair_root: Path) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(SegmentationDataModule, "data")
    config = parser.parse_args(
        [
            "--data.img_size=16",
            f"--data.test_sets={{A: {pair_root}, B: {{root: {pair_root}, images: images}}}}",
            f"--data.test_sets.C={pair_root}",  # one set added or replaced on the command line
        ]
    )
    dm = parser.instantiate_classes(config).data
    assert dm.test_names == ["A", "B", "C"]
    dm.setup("test")
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [3, 3, 3]


def test_module_suffixes_metrics_with_the_set_names(tmp_path: Path, pngs: SimpleNamespace) -> None:
    from samflow.module import SamflowModule, SamSpec

    roots = _sets(tmp_path, pngs, {"COD10K": 2, "CAMO": 1})
    dm = SegmentationDataModule(test_sets=roots, img_size=128, batch_size=2)
    module = SamflowModule(sam=SamSpec(variant="tiny"), metrics=["iou"])
    trainer = L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    trainer.test(module, datamodule=dm, verbose=False)
    assert set(module.test_results) == {"test/iou/COD10K", "test/iou/CAMO"}
    fresh = SamflowModule(sam=SamSpec(variant="tiny"), metrics=["iou"])
    one = SegmentationDataModule(test_sets={"CAMO": roots["CAMO"]}, img_size=128)
    trainer.test(fresh, datamodule=one, verbose=False)
    assert set(fresh.test_results) == {"test/iou"}  # one set: no suffix
