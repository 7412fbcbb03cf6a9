"""Resumed equals uninterrupted beyond the plugins: a warm-up on an epoch scheduler with gradient
accumulation, a fit that reads SAM's outputs from the embedding store, and one with the encoder cache.

Fits, interruption and comparison are those of ``test_resume_plugins.py``. With
``accumulate_grad_batches 2`` ``last.ckpt`` is written only after an optimizer step (the gradients of
a first accumulated batch are in no checkpoint), so a run stopped between the two accumulated batches
resumes from the step before them and trains both again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_resume_plugins import (
    assert_same_training,
    make_data,
    make_module,
    uninterrupted_and_resumed,
)

from samflow.callbacks.resume import LastCheckpoint
from samflow.callbacks.warmup import LinearWarmup
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.writer import write_store
from samflow.sam_spec import SamSpec

WARMUP = {"steps": 3, "ratio": 0.1}  # 4 optimizer steps in all: the warm-up spans the interruption


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("resume_schedules"), n_train=4, n_val=2, seed=2)


def _halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


# 4 batches of 1 an epoch, 2 epochs: optimizer steps after batches 2, 4 | 6, 8. Stopped after batch 3
# (between two accumulated batches: last.ckpt at step 1), 5 (between two accumulated batches after the
# first epoch's end: last.ckpt at that end, after its validation) and 6 (at a step, mid-epoch)
@pytest.mark.parametrize("stop", [3, 5, 6])
def test_warmup_scheduler_and_accumulation_resume_to_the_uninterrupted_run(tmp_path, data_root, stop):
    rates: dict[str, list[float]] = {}

    class Rates(L.Callback):
        """The rate of each optimizer step (inside it: warmed), by run."""

        def __init__(self, run: str) -> None:
            self.run = run

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            tokens = next(group for group in optimizer.param_groups if group["name"] == "tokens")
            rates.setdefault(self.run, []).append(tokens["lr"])

    runs = iter(["whole", "cut", "resumed"])
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, {"tokens": {}, "decoder_tuning": {"lr": 2e-3}}, lambda: make_data(data_root, batch_size=1),
        stop=stop, module_args={"scheduler": _halving}, callbacks=lambda: (LinearWarmup(**WARMUP), Rates(next(runs))),
        accumulate_grad_batches=2,
    )  # fmt: skip
    assert whole[1].global_step == 4
    assert_same_training(whole, resumed)
    assert whole[1].lr_scheduler_configs[0].scheduler.state_dict() == (
        resumed[1].lr_scheduler_configs[0].scheduler.state_dict()
    )
    # the rates of the steps: warmed (0.1, 0.4, 0.7 of the regular rate), halved in the second epoch
    regular = [1e-3, 1e-3, 5e-4, 5e-4]  # tokens' group: AdamW's default 1e-3
    assert rates["whole"] == pytest.approx([r * f for r, f in zip(regular, [0.1, 0.4, 0.7, 1.0])])
    saved = torch.load(tmp_path / "cut" / LastCheckpoint.FILE, map_location="cpu", weights_only=False)
    assert rates["cut"][: saved["global_step"]] + rates["resumed"] == rates["whole"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("resume_store") / "store"
    data = make_data(data_root, augment=None)
    data.setup("fit")
    write_store(root, make_module({"hq_sam": {}}), data, batch_size=2, shard_size=3)
    return root


def test_a_fit_from_the_embedding_store_resumes_to_the_uninterrupted_run(tmp_path, data_root, store):
    """HQ-SAM (its loss points from ``ctx.rand``) on stored embeddings and early-block features."""
    plugins = {"hq_sam": {"num_points": 256}}
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, plugins, lambda: make_data(data_root, augment=None),
        module_args={"sam": SamSpec(variant="tiny", embedding_store=str(store))},
    )  # fmt: skip
    assert whole[0].model.embedding_store is not None and resumed[0].model.embedding_store is not None
    assert_same_training(whole, resumed)


def test_a_fit_with_the_encoder_cache_resumes_to_the_uninterrupted_run(tmp_path, data_root):
    """Unaugmented images come back each epoch: the uninterrupted run's second epoch takes them from the
    cache (filled in the first epoch, in other batches), the resumed run's from the encoder."""
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, {"pa_sam": {"mining_start_epoch": 0}}, lambda: make_data(data_root, augment=None),
        module_args={"sam": SamSpec(variant="tiny", encoder_cache=8)},
    )  # fmt: skip
    cache = whole[0].model.encoder_cache
    assert cache is not None and cache.counts["train"][0] > 0  # hits in the second epoch
    assert_same_training(whole, resumed)
