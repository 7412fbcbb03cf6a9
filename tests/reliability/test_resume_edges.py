"""Resume edge cases: a plateau scheduler, a checkpoint between two accumulated batches, and a resume
whose experiment was changed.

Fits, interruption and comparison are those of ``test_resume_plugins.py`` (4 training images, batch 1,
one validation batch after every epoch). Numbers before the fixes: a ``ReduceLROnPlateau`` run resumed
anywhere in its first 2 epochs kept the rate 1e-3 in the third epoch where the uninterrupted run had
5e-4 (Lightning leaves out the plateau update at the resumed epoch's end); a run resumed from a
checkpoint written after the first of 2 accumulated batches ended with weights 3.7e-3 off (the first
batch's gradient lost); a resume with another batch size, seed or plugin option went on silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ReduceLROnPlateau
from quickstart_tiny import samflow as run_tiny
from test_resume_plugins import assert_same_training, make_data, make_module, uninterrupted_and_resumed

from samflow.callbacks.accumulation import AccumulatedGradients
from samflow.callbacks.resume import BestCheckpoint, LastCheckpoint, PlateauResume, RandomState
from samflow.callbacks.resume_config import ResumeError, SameExperiment, check_resume, training_settings
from samflow.data.quickstart import make_quickstart_data
from samflow.experiment_files import resolve_experiment
from samflow.module import ModelConfigError, SamflowModule


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_quickstart_data(tmp_path_factory.mktemp("resume_edges"), n_train=4, n_val=2, seed=2)


class Rates(L.Callback):
    """The tokens' rate at each optimizer step, by run."""

    def __init__(self, rates: dict[str, list[float]], run: str) -> None:
        self.rates, self.run = rates, run

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates.setdefault(self.run, []).append(optimizer.param_groups[0]["lr"])


def _rates_of(tmp_path, data_root, stop, scheduler, extra=(), **trainer):
    rates: dict[str, list[float]] = {}
    runs = iter(["whole", "cut", "resumed"])
    whole, resumed = uninterrupted_and_resumed(
        tmp_path, {"tokens": {}}, lambda: make_data(data_root, batch_size=1), stop=stop,
        module_args={"scheduler": scheduler}, callbacks=lambda: (*extra, Rates(rates, next(runs))), **trainer,
    )  # fmt: skip
    saved = torch.load(tmp_path / "cut" / LastCheckpoint.FILE, map_location="cpu", weights_only=False)
    return whole, resumed, rates, saved["global_step"]


def _plateau(optimizer):
    # nothing counts as an improvement after the first epoch: the rate halves at every later epoch end
    return ReduceLROnPlateau(
        optimizer, monitor="val/iou", mode="max", factor=0.5, patience=0, threshold=10, threshold_mode="abs"
    )


# 4 steps an epoch, 3 epochs; stopped mid first epoch (2), at its end (4: last.ckpt of the epoch end,
# after its validation) and mid second epoch (6)
@pytest.mark.parametrize("stop", [2, 4, 6])
def test_a_plateau_scheduler_resumes_to_the_uninterrupted_rates(tmp_path, data_root, stop):
    whole, resumed, rates, step = _rates_of(
        tmp_path, data_root, stop, _plateau, extra=(PlateauResume(),), max_epochs=3
    )
    assert rates["whole"] == [1e-3] * 8 + [5e-4] * 4
    assert rates["cut"][:step] + rates["resumed"] == rates["whole"]
    assert_same_training(whole, resumed)
    plateau = [t.lr_scheduler_configs[0].scheduler.state_dict() for t in (whole[1], resumed[1])]
    assert plateau[0] == plateau[1]


def _per_step(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


@pytest.mark.parametrize("stop", [3, 4, 6])
def test_a_per_step_scheduler_with_accumulation_resumes_to_the_uninterrupted_rates(
    tmp_path, data_root, stop, monkeypatch
):
    configure = SamflowModule.configure_optimizers

    def per_step(self):
        out = configure(self)
        out["lr_scheduler"]["interval"] = "step"
        return out

    monkeypatch.setattr(SamflowModule, "configure_optimizers", per_step)
    whole, resumed, rates, step = _rates_of(tmp_path, data_root, stop, _per_step, accumulate_grad_batches=2)
    assert rates["whole"] == pytest.approx([1e-3 * 0.7**k for k in range(4)])
    assert rates["cut"][:step] + rates["resumed"] == rates["whole"]
    assert_same_training(whole, resumed)


def _module_scheduler(trainer_callbacks, scheduler):
    module = make_module({"tokens": {}}, scheduler=scheduler)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=trainer_callbacks)
    return module.configure_optimizers()


def test_the_modules_plateau_scheduler_watches_the_checkpoint_monitor_in_its_mode():
    plateau = lambda mode: lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode)
    best = ModelCheckpoint(monitor="val/iou", mode="max")
    assert _module_scheduler([best], plateau("max"))["lr_scheduler"]["monitor"] == "val/iou"
    with pytest.raises(ModelConfigError, match=r"mode='min'\) watches val/iou.*init_args.mode max"):
        _module_scheduler([ModelCheckpoint(monitor="val/iou", mode="max")], plateau("min"))
    with pytest.raises(ModelConfigError, match=r"--checkpoint.monitor"):
        _module_scheduler([], plateau("max"))


def test_lr_scheduler_and_optimizer_flags_set_the_modules_own(tmp_path, monkeypatch):
    """LightningCLI ignored ``--lr_scheduler`` alone, and ``--optimizer`` made one group of all 466k
    parameters (frozen SAM included) instead of one per plugin."""
    from samflow.lightning_cli import SamflowCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    flags = ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.monitor", "val/iou"]
    for optimizer in ([], ["--optimizer", "SGD", "--optimizer.lr", "0.1"]):
        args = [
            "--config",
            str(resolve_experiment("quickstart")),
            "--trainer.logger",
            "false",
            *flags,
            *optimizer,
        ]
        model = SamflowCLI("test", args=args, run=False).model
        out = model.configure_optimizers()
        assert isinstance(out["lr_scheduler"]["scheduler"], ReduceLROnPlateau)
        assert out["lr_scheduler"]["monitor"] == "val/iou"
        groups = out["optimizer"].param_groups
        assert [g["name"] for g in groups] == [g["name"] for g in model.plugins.optimizer_groups()]
        params = sum(p.numel() for g in groups for p in g["params"])
        assert params == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert type(out["optimizer"]).__name__ == ("SGD" if optimizer else "AdamW")


# ---- a checkpoint between two accumulated batches ----
def _fit_validating_every_3(folder: Path, data_root: Path, ckpt: Path | None = None, accumulate: int = 2):
    """2 epochs of 4 batches, accumulating 2, validated after batch 3 of each: a best checkpoint there
    is written after the first of 2 accumulated batches."""
    L.seed_everything(0, verbose=False)
    if ckpt is not None:
        torch.rand(5)
    best = BestCheckpoint(
        dirpath=str(folder / "best"), monitor="val/iou", mode="max", save_top_k=-1, filename="{epoch}-{step}"
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=folder, deterministic=True, max_epochs=2, limit_val_batches=1,
        num_sanity_val_steps=0, accumulate_grad_batches=accumulate, val_check_interval=3,
        callbacks=[best, RandomState(), AccumulatedGradients()],
    )  # fmt: skip
    module = make_module({"tokens": {}})
    trainer.fit(module, datamodule=make_data(data_root, batch_size=1), ckpt_path=ckpt)
    return module, trainer


def test_a_checkpoint_between_accumulated_batches_resumes_to_the_uninterrupted_run(tmp_path, data_root):
    whole = _fit_validating_every_3(tmp_path / "whole", data_root)
    inside = tmp_path / "whole" / "best" / "epoch=0-step=1.ckpt"  # after batch 3: 1 step, 1 batch more
    saved = torch.load(inside, map_location="cpu", weights_only=True)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3
    grads = saved["callbacks"]["AccumulatedGradients"]["grads"]
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    resumed = _fit_validating_every_3(tmp_path / "resumed", data_root, ckpt=inside)
    assert_same_training(whole, resumed)


def test_a_resume_inside_an_accumulation_window_refuses_another_window_or_several_processes():
    trainer = SimpleNamespace(ckpt_path="run/checkpoints/best.ckpt", accumulate_grad_batches=4)
    callback = AccumulatedGradients()
    callback.load_state_dict({"grads": {}, "batches": 2})
    with pytest.raises(
        ResumeError, match=r"best.ckpt was written inside a window of .*accumulate_grad_batches 2"
    ):
        callback.on_train_start(trainer, None)
    callback.load_state_dict({"processes": 2, "batches": 2})
    with pytest.raises(ResumeError, match=r"by 2 processes.*resume from the run's checkpoints/last.ckpt"):
        callback.on_train_start(trainer, None)


# ---- a resumed experiment that was changed ----
BASE = {
    "seed_everything": 0,
    "model": {"plugins": {"lora": {"class_path": "Lora", "init_args": {"rank": 4}}}, "threshold": 0.5},
    "data": {"class_path": "SegmentationDataModule", "init_args": {"batch_size": 4, "train": "a", "num_workers": 2}},
    "trainer": {"max_epochs": 2, "accumulate_grad_batches": 1, "devices": 1},
}  # fmt: skip


def _changed(**changes: object) -> dict:
    config = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


@pytest.mark.parametrize(
    ("change", "key", "old", "new"),
    [
        ({"data__init_args__batch_size": 8}, "data.init_args.batch_size", "4", "8"),
        ({"seed_everything": 1}, "seed_everything", "0", "1"),
        ({"model__plugins__lora__init_args__rank": 8}, "model.plugins.lora.init_args.rank", "4", "8"),
        ({"trainer__accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches", "1", "2"),
    ],
)
def test_a_resume_refuses_a_change_that_changes_the_training(change, key, old, new):
    with pytest.raises(ResumeError, match=rf"{key}: run {old}, now {new}.*start a new run"):
        check_resume(training_settings(BASE), training_settings(_changed(**change)))


def test_a_resume_allows_more_epochs_and_warns_about_a_changed_data_folder_or_threshold():
    allowed = _changed(trainer__max_epochs=5, data__init_args__num_workers=0)
    assert check_resume(training_settings(BASE), training_settings(allowed)) == training_settings(allowed)
    moved = _changed(data__init_args__train="b", model__threshold=0.6)
    with pytest.warns(UserWarning) as caught:
        check_resume(training_settings(BASE), training_settings(moved))
    assert sorted(str(w.message) for w in caught) == [
        'samflow: resuming with data.init_args.train "b" (the run had "a").',
        "samflow: resuming with model.threshold 0.6 (the run had 0.5).",
    ]


def test_a_resume_of_a_run_with_a_random_seed_takes_the_runs_seed():
    run, now = training_settings(_changed(seed_everything=5)), training_settings(_changed(seed_everything=77))
    assert check_resume(run, now, random_seed=True)["seed_everything"] == "5"
    callback = SameExperiment(now, random_seed=True)
    callback.load_state_dict(SameExperiment(run).state_dict())
    assert callback.settings["seed_everything"] == "5" and torch.initial_seed() == 5


def test_samflow_fit_refuses_a_resume_with_another_batch_size_before_it_writes_anything(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert run_tiny("fit", data=tmp_path / "data") == 0
    run = tmp_path / "runs" / "quickstart" / "version_0"
    config = (run / "config.yaml").read_text()
    capsys.readouterr()
    more = ["--resume", str(run), "--trainer.max_epochs", "2"]
    assert run_tiny("fit", *more, "--data.init_args.batch_size", "2", data=tmp_path / "data") == 1
    err = capsys.readouterr().err
    assert (
        "samflow: error: the resumed run was trained with other settings (data.init_args.batch_size: run 4, now 2)"
        in err
    )
    assert (run / "config.yaml").read_text() == config
    assert run_tiny("fit", *more, data=tmp_path / "data") == 0
    saved = torch.load(run / "checkpoints" / LastCheckpoint.FILE, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2  # 1 step an epoch: the second epoch ran
    assert saved["callbacks"]["SameExperiment"]["settings"]["data.init_args.batch_size"] == "4"
