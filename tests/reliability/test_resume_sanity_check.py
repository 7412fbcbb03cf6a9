"""A fit resumed from a checkpoint of an epoch end keeps its numbers from before training.

Lightning counts a run resumed from a checkpoint written at an epoch end (``last.ckpt`` after the
epoch's validation, the one a run killed early in the next epoch leaves) as not restarting and runs the
sanity check again, on the checkpoint's trained weights (``Trainer._run_sanity_check``: only
``val_loop.restarting`` skips it), also when no epoch is left to train. That validation is not "before
training": the resumed run keeps the first run's before-numbers (``RandomState`` carries them in the
checkpoint), logs no second ``before/`` row and leaves the first run's ``samples/val_sanity.png`` alone. The resume tests run
without a sanity check; the quickstart runs a whole one (``num_sanity_val_steps: -1``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from quickstart_tiny import samflow

from samflow.callbacks import ImprovementReport
from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin

SANITY = ("--trainer.num_sanity_val_steps", "-1")  # the quickstart experiment's value


def _before_rows(metrics: Path) -> list[dict[str, str]]:
    with metrics.open() as f:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]
    return [row for row in rows if any(k.startswith("before/") for k in row)]


def test_a_fit_resumed_at_an_epoch_end_keeps_its_before_training_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    assert samflow("fit", *SANITY, data=data) == 0  # one epoch: last.ckpt of its end
    run = tmp_path / "runs" / "quickstart" / "version_0"
    first = json.loads((run / "val_before_after.json").read_text())
    picture = (run / "samples" / "val_sanity.png").read_bytes()
    assert first["before"] != first["after"]  # training moved the numbers: a mix-up shows

    assert samflow("fit", *SANITY, "--trainer.max_epochs", "2", "--resume", str(run), data=data) == 0
    resumed = json.loads((run / "val_before_after.json").read_text())
    assert resumed["before"] == first["before"]  # not the checkpoint's numbers (first["after"])
    assert resumed["after"] != first["after"]  # the second epoch trained
    rows = _before_rows(run / "metrics.csv")
    assert [row["step"] for row in rows] == ["0"], rows  # logged once, before the first step
    assert (run / "samples" / "val_sanity.png").read_bytes() == picture

    # resumed with no epoch left: Lightning checks again but never starts training (no on_train_start)
    assert samflow("fit", *SANITY, "--trainer.max_epochs", "2", "--resume", str(run), data=data) == 0
    again = json.loads((run / "val_before_after.json").read_text())
    assert again == {"before": first["before"], "after": resumed["after"]}
    assert len(_before_rows(run / "metrics.csv")) == 1


class SanityChecks(Callback):
    def __init__(self) -> None:
        self.ran = 0

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ran += 1


def test_the_sanity_check_of_a_resumed_fit_is_not_before_training(tmp_path):
    """Through Lightning's Trainer: the resumed fit's sanity check runs (what Lightning does), and neither
    the module (also one that fit before, in this process) nor ``ImprovementReport`` takes it for the
    validation before training."""
    root = make_quickstart_data(tmp_path / "data", n_train=2, n_val=2, seed=1)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"decoder": create_plugin("decoder_tuning")})

    def fit(name: str, epochs: int, ckpt: Path | None = None) -> tuple[L.Trainer, SanityChecks]:
        checks = SanityChecks()
        trainer = L.Trainer(
            default_root_dir=tmp_path / name,
            max_epochs=epochs,
            num_sanity_val_steps=-1,
            logger=CSVLogger(tmp_path / name, name="", version=""),
            callbacks=[checks, ImprovementReport()],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = SegmentationDataModule(
            train=str(root / "train"), val=str(root / "val"), img_size=128, batch_size=2
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        return trainer, checks

    first, _ = fit("first", 1)
    before = dict(module.initial_val_metrics)
    assert before and _before_rows(tmp_path / "first" / "metrics.csv")
    ckpt = tmp_path / "epoch_end.ckpt"
    first.save_checkpoint(ckpt)  # after the fit: the epoch's end
    assert module.last_val_metrics != before

    resumed, checks = fit("resumed", 2, ckpt)
    assert checks.ran == 1  # Lightning ran the sanity check of the resumed fit
    assert resumed.global_step == 2 * first.global_step
    assert module.initial_val_metrics == before
    assert _before_rows(tmp_path / "resumed" / "metrics.csv") == []
