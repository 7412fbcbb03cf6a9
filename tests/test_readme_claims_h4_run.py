"""README, "What a run prints" and "Resume and run folders", claims the other tests left open (H4 audit):

- `validate`, `test` and `predict` of a checkpoint that `samflow fit` wrote print no Lightning warning
  that a callback of the checkpoint is missing ("Please add the following callbacks:
  ['SameExperiment']"): the fit's resume check is a callback whose state every samflow checkpoint
  holds, and the other commands carry it too (it reads nothing there), so the only warnings left are
  real ones;
- a resume allows other devices with a warning that names them, and refuses a changed loss, optimizer,
  scheduler, precision or data option other than the batch size, with the key and both values
  (`test_resume_edges.py` covers the batch size, seed, a plugin option and `accumulate_grad_batches`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import wandb

from samflow.callbacks.resume_config import ResumeError, check_resume, training_settings
from samflow.cli import main

TINY = [
    "--experiment", "quickstart",
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "1",
    "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_progress_bar", "false",
    "--data.init_args.batch_size", "4",
    "--data.init_args.quickstart.n_train", "4",
    "--data.init_args.quickstart.n_val", "4",
]  # fmt: skip


def samflow(command: str, *args: str, data: Path) -> list[str]:
    """``samflow COMMAND`` on the tiny quickstart in this process; the warnings it raised."""
    argv = sys.argv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            assert main([command, *TINY, "--data.init_args.quickstart.root", str(data), *args]) == 0
        finally:
            sys.argv = argv
            wandb.finish()
    return [str(w.message) for w in caught]


MISSING = "callbacks used to create the checkpoint need to be provided"


def test_commands_on_a_fit_checkpoint_warn_of_no_missing_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samflow("fit", data=tmp_path / "data")
    ckpt = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    images = tmp_path / "data" / "val" / "images"
    for command, extra in (
        ("validate", []),
        ("test", []),
        ("predict", ["--data.init_args.predict", str(images)]),
    ):
        said = samflow(command, "--ckpt_path", str(ckpt), *extra, data=tmp_path / "data")
        assert not [w for w in said if MISSING in w], (command, said)


# ---- a resume whose experiment changed (check_resume, as `samflow fit --resume` runs it) ----
BASE = {
    "seed_everything": 0,
    "model": {
        "plugins": {"tokens": {"class_path": "ExtraTokens", "init_args": {"num_tokens": 4}}},
        "losses": {"dice": 1.0},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}},
        "scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2}},
    },
    "data": {"class_path": "SegmentationDataModule", "init_args": {"batch_size": 4, "prompt": "box"}},
    "trainer": {"max_epochs": 2, "devices": 1, "precision": "32-true"},
}


def _changed(path: str, value: object) -> dict:
    import copy

    config = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value
    return config


@pytest.mark.parametrize(
    ("path", "value", "old", "new"),
    [
        ("model.losses.dice", 2.0, "1.0", "2.0"),
        ("model.optimizer.init_args.lr", 1e-4, "0.001", "0.0001"),
        ("model.scheduler.init_args.step_size", 3, "2", "3"),
        ("trainer.precision", "bf16-mixed", '"32-true"', '"bf16-mixed"'),
        ("data.init_args.prompt", "points", '"box"', '"points"'),
    ],
)
def test_a_resume_refuses_a_changed_loss_optimizer_scheduler_precision_or_data_option(path, value, old, new):
    with pytest.raises(ResumeError, match=rf"{path}: run {old}, now {new}"):
        check_resume(training_settings(BASE), training_settings(_changed(path, value)))


def test_a_resume_on_other_devices_is_allowed_with_a_warning_naming_them():
    with pytest.warns(UserWarning) as caught:
        settings = check_resume(training_settings(BASE), training_settings(_changed("trainer.devices", 2)))
    assert settings["trainer.devices"] == "2"
    assert [str(w.message) for w in caught] == ["samflow: resuming with trainer.devices 2 (the run had 1)."]


@pytest.mark.parametrize(
    "sam",
    [
        {"encoder_cache": 64},
        {"encoder_cache": 64, "encoder_cache_stages": ["eval"]},
        {"checkpoint_blocks": [0, 1]},
        {"embedding_store": "store"},
        {"checkpoint": "/elsewhere/sam.pth"},
    ],
)
def test_a_resume_allows_silently_what_only_changes_the_encoders_speed_or_files(sam, recwarn):
    """The encoder cache (and its stages), activation checkpointing, the store and the SAM file's path do
    not change the numbers: set or changed on a resume, neither refused nor warned about."""
    saved = training_settings(_changed("model.sam", {"variant": "tiny"}))
    settings = check_resume(saved, training_settings(_changed("model.sam", {"variant": "tiny", **sam})))
    assert settings == saved and not recwarn.list
    with pytest.raises(ResumeError, match="model.sam.variant"):  # the model itself is still the run's
        check_resume(saved, training_settings(_changed("model.sam", {"variant": "vit_b", **sam})))
