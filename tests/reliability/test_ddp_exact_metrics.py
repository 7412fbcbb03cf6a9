"""DDP evaluation counts every image once: odd-sized validation sets on 2 CPU ranks equal one process.

Lightning's default ``DistributedSampler`` pads the last round by repeating images, so 3 images on 2
ranks were evaluated as 4 (Dice 0.38990 instead of 0.39155). The data module now shards evaluation
sets without padding (a rank may get one image, and one batch, fewer) and the module sums metric
states and the loss over ranks, so the reduced numbers are those of one process on the whole set.

Each test's commands run in one Python process (``helpers.run_samflow_commands``): the imports are paid
once, not once a command.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_samflow_commands
from torch.utils.data import SequentialSampler

from samflow.data import DataError, SegmentationDataModule
from samflow.data.eval_shard import EvalShardSampler

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
ONE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
# Every number the quickstart experiment reports at validation: its metrics and the loss.
KEYS = ("val/iou", "val/dice", "val/mae", "val/loss")


def data_args(root: Path, n_val: int) -> list[str]:
    return [
        "--data.init_args.quickstart.root", str(root),
        "--data.init_args.quickstart.n_train", "4",
        "--data.init_args.quickstart.n_val", str(n_val),
    ]  # fmt: skip


def last_metrics(cwd: Path, folder: Path | None = None) -> dict[str, float]:
    """The last value of each metric in ``folder`` (default: the run folder of ``cwd``)."""
    folder = folder or cwd / "runs" / "quickstart" / "version_0"
    values: dict[str, float] = {}
    for row in csv.DictReader((folder / "metrics.csv").open()):
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def assert_same(two: dict[str, float], one: dict[str, float]) -> None:
    for key in KEYS:
        assert key in two and key in one, (key, sorted(two), sorted(one))
        assert two[key] == pytest.approx(one[key], abs=1e-6), (key, two[key], one[key])


def test_validate_three_images_on_two_ranks_equals_one_process(tmp_path):
    """3 images, 2 ranks (2 + 1 images, one batch each): IoU, Dice, MAE and loss equal one process."""
    common = ["validate", "--experiment", "quickstart", *data_args(tmp_path / "data", 3)]
    run_samflow_commands(tmp_path, {"two": [*common, *DDP], "one": [*common, *ONE]})
    assert_same(last_metrics(tmp_path / "two"), last_metrics(tmp_path / "one"))


def test_fit_five_images_uneven_batches_on_two_ranks_equals_one_process(tmp_path):
    """5 images at batch 2 on 2 ranks in a fit (sanity check and epoch end): rank 0 runs 2 batches and
    rank 1 one, through the DDP-wrapped model, without deadlock; the epoch's validation numbers equal a
    one-process ``validate`` of the checkpoint it saved."""
    data = data_args(tmp_path / "data", 5)
    fit = [
        "fit", "--experiment", "quickstart", *data, *DDP, "--data.init_args.batch_size", "2",
        "--data.init_args.eval_batch_size", "2", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1",
    ]  # fmt: skip
    version = tmp_path / "two" / "runs" / "quickstart" / "version_0"
    ckpt = version / "checkpoints" / "last.ckpt"
    validate = [
        "validate", "--experiment", "quickstart", *data, *ONE, "--data.init_args.eval_batch_size", "2",
    ]  # fmt: skip
    # the quickstart's sanity check covers the whole set (num_sanity_val_steps -1): the numbers before
    # training equal a one-process validate of the untrained model ("start": the same seed builds the
    # same one)
    plan = {"two": fit, "one": [*validate, "--ckpt_path", str(ckpt)], "start": validate}
    run_samflow_commands(tmp_path, plan)
    two = last_metrics(tmp_path / "two")
    before = json.loads((version / "val_before_after.json").read_text())["before"]
    assert set(before) >= {"val/iou", "val/dice", "val/mae"}  # the uneven sanity check reduced too
    assert_same(two, last_metrics(tmp_path / "one", version / "validate"))  # the run's validate/ folder
    start = last_metrics(tmp_path / "start")
    for key in ("val/iou", "val/dice", "val/mae"):
        assert before[key] == pytest.approx(start[key], abs=1e-6), (key, before[key], start[key])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_index_once_in_order(world):
    for total in range(world, 12):
        shards = [list(EvalShardSampler(range(total), world, rank)) for rank in range(world)]
        # contiguous, in order, nothing repeated; len() is what the iterator gives
        assert [i for shard in shards for i in shard] == list(range(total))
        assert [len(EvalShardSampler(range(total), world, r)) for r in range(world)] == list(map(len, shards))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1 and min(map(len, shards)) >= 1


def test_a_set_smaller_than_the_process_count_is_refused():
    with pytest.raises(DataError, match=r"data.val has 1 image\(s\), fewer than the 2 processes"):
        EvalShardSampler(range(1), 2, 1, key="data.val")


def fake_trainer(world: int, rank: int, use_distributed_sampler: bool = True) -> SimpleNamespace:
    kwargs = {"num_replicas": world, "rank": rank} if world > 1 else None
    connector = SimpleNamespace(use_distributed_sampler=use_distributed_sampler)
    return SimpleNamespace(
        distributed_sampler_kwargs=kwargs, _accelerator_connector=connector, global_rank=rank
    )


def test_eval_loaders_are_sharded_under_ddp_only(tmp_path):
    root = {"root": str(tmp_path / "data"), "n_train": 4, "n_val": 5}
    dm = SegmentationDataModule(img_size=32, batch_size=2, quickstart=root)
    dm.prepare_data()
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)  # no trainer: one process
    dm.trainer = fake_trainer(2, 1)  # type: ignore[assignment]
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert isinstance(loader.sampler, EvalShardSampler)
        assert [b.id for b in loader] == [["val_0003", "val_0004"]]  # rank 1 of 2: the last 2 of 5
    assert not isinstance(dm.train_dataloader().sampler, EvalShardSampler)  # Lightning pads training
    dm.trainer = fake_trainer(2, 0, use_distributed_sampler=False)  # type: ignore[assignment]
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)
    dm.trainer = fake_trainer(8, 0)  # type: ignore[assignment]
    with pytest.raises(DataError, match=r"data.quickstart has 5 image\(s\), fewer than the 8 processes"):
        dm.val_dataloader()
