"""Fail fast, leave nothing behind.

A mistake the config alone shows (data framed at another size than SAM's input, ``losses: {}`` with no
plugin that brings a loss, a fit without plugins, ``--predictions.resume`` with ``--predictions.overwrite``)
is refused in one line before SAM is built (20 s for ``vit_b`` on a CPU) and before a run folder is made:
here ``build_sam`` raises if it is called. A new fit that fails later but before its first training step
(its data, the sanity check) removes the ``version_N`` it made; a resumed run's folder always stays.
``samflow`` runs in this process on the tiny quickstart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import samflow_in_process
from jsonargparse import Namespace
from quickstart_tiny import TINY


@pytest.fixture
def no_sam_build(monkeypatch, tmp_path):
    """``build_sam`` raises: a refusal that comes after it fails the test with this error."""

    def built(*args, **kwargs):
        raise AssertionError("SAM was built before the config was checked")

    monkeypatch.setattr("samflow.module.build_sam", built)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def samflow(args: list[str], capsys) -> tuple[int, str]:
    """``samflow ARGS`` in this process: the exit status and stderr."""
    status = samflow_in_process(args)
    return status, capsys.readouterr().err


def one_error_line(args: list[str], capsys) -> str:
    status, err = samflow(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("samflow: error:")]
    assert status == 1 and "Traceback" not in err and len(errors) == 1, err[-3000:]
    return errors[0]


def run_folders(work: Path) -> list[Path]:
    return sorted(work.rglob("version_*"))


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_data_framed_at_another_size_than_sams_input_is_refused_before_sam_is_built(
    no_sam_build, capsys, command
):
    """Was: at the model's setup, after the build, the run header and a new ``version_N``."""
    line = one_error_line([command, *TINY, "--data.init_args.img_size", "64"], capsys)
    assert "data.init_args.img_size is 64 but model.sam.img_size is 128, the tiny variant's default" in line
    assert "--model.sam.img_size 64 --data.init_args.img_size 64" in line
    assert not (no_sam_build / "runs").exists()


def test_a_sam_img_size_given_is_named_as_given(no_sam_build, capsys):
    size = ["--model.sam.img_size", "256", "--data.init_args.img_size", "128"]
    line = one_error_line(["fit", *TINY, *size], capsys)
    assert "data.init_args.img_size is 128 but model.sam.img_size is 256: " in line


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_hq_sam_switched_to_a_plugin_without_a_loss_is_refused_before_sam_is_built(
    no_sam_build, capsys, command
):
    """``hq_sam_hqseg`` has ``losses: {}`` (HQ-SAM brings its loss); with SAM-Adapter instead nothing
    gives a loss. Was: at the sanity check, after building ViT-L (54 s on vit_b)."""
    plugins = ["--model.plugins", "{}", "--model.plugins.adapter.class_path", "SamAdapter"]
    line = one_error_line([command, "--experiment", "hq_sam_hqseg", *plugins], capsys)
    assert "model.losses: no loss terms" in line and "plugins: adapter)" in line
    assert "--model.losses '{bce: 1.0, dice: 1.0}'" in line
    assert not (no_sam_build / "runs").exists()


def test_empty_losses_pass_with_a_plugin_that_brings_its_loss_or_one_not_importable_here():
    from samflow.config_checks import ConfigError, check_before_build

    def config(class_path: str, losses: dict | None) -> Namespace:
        plugins = {"p": Namespace(class_path=class_path, init_args=Namespace())}
        return Namespace(model=Namespace(plugins=plugins, losses=losses), data=None)

    for command in ("fit", "validate", "test", "predict"):
        check_before_build(config("samflow_plugins.hq_sam.HQSam", {}), command)
        check_before_build(config("not_installed.Plugin", {}), command)  # the model checks its terms
        check_before_build(config("samflow_plugins.sam_adapter.SamAdapter", None), command)  # defaults
    check_before_build(config("samflow_plugins.sam_adapter.SamAdapter", {}), "predict")  # computes no loss
    with pytest.raises(ConfigError, match="model.losses: no loss terms"):
        check_before_build(config("samflow_plugins.sam_adapter.SamAdapter", {}), "test")


def test_a_fit_without_plugins_is_refused_before_sam_is_built(no_sam_build, capsys):
    line = one_error_line(["fit", *TINY, "--model.plugins", "{}"], capsys)
    assert "model.plugins: nothing to train" in line and "(plugins: none)" in line
    assert not (no_sam_build / "runs").exists()


def test_predict_resume_with_overwrite_is_refused_before_sam_is_built(no_sam_build, capsys):
    flags = ["--predictions.resume", "true", "--predictions.overwrite", "true"]
    line = one_error_line(["predict", *TINY, *flags], capsys)
    assert "--predictions.resume true continues the run" in line and "pass one of them" in line
    assert not (no_sam_build / "runs").exists()


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


QUICKSTART = ["--data.init_args.quickstart.root", "data"]


def test_a_fit_failing_on_its_data_leaves_no_run_folder(work, capsys):
    """Was: an empty ``runs/quickstart/version_0`` (the CSV logger's), taking a number. A bad file is
    found at the data's setup, after the run folder is made (a missing folder is refused before it)."""
    bad = work / "bad"
    for folder in ("images", "masks"):
        (bad / folder).mkdir(parents=True)
        (bad / folder / "a.png").write_bytes(b"not a PNG")
    line = one_error_line(["fit", *TINY, *QUICKSTART, "--data.init_args.train", str(bad)], capsys)
    assert "data.train: " in line and str(bad / "images" / "a.png") in line
    assert run_folders(work) == []


def test_a_fit_failing_at_the_sanity_check_leaves_no_run_folder_and_the_next_takes_its_number(work, capsys):
    """Was: ``version_0`` with config.yaml, hparams.yaml, run.json and the sanity check's pictures, and
    the next fit in ``version_1``."""
    sanity = ["--trainer.num_sanity_val_steps", "1", "--checkpoint.monitor", "val/nonexistent"]
    line = one_error_line(["fit", *TINY, *QUICKSTART, *sanity], capsys)
    assert "--checkpoint.monitor 'val/nonexistent': the run logs no such metric" in line
    assert run_folders(work) == []
    status, err = samflow(["fit", *TINY, *QUICKSTART, "--trainer.limit_val_batches", "0"], capsys)
    assert status == 0, err[-3000:]
    assert run_folders(work) == [work / "runs" / "quickstart" / "version_0"]


def test_a_fit_interrupted_before_its_first_step_leaves_no_run_folder(work, capsys, monkeypatch):
    """Ctrl-C (or a SIGTERM) in the sanity check, after the run's config, hparams and ``run.json`` were
    written. Was: that ``version_0`` stayed (only an empty claimed folder was removed on a signal)."""
    from samflow.module import SamflowModule

    def interrupted(*args, **kwargs):
        assert (work / "runs" / "quickstart" / "version_0" / "run.json").is_file()  # written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(SamflowModule, "validation_step", interrupted)
    with pytest.raises(SystemExit) as stop:  # Lightning's exit after a Ctrl-C
        samflow_in_process(["fit", *TINY, *QUICKSTART, "--trainer.num_sanity_val_steps", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "no checkpoint was written yet" in err, err[-3000:]
    assert run_folders(work) == []


def test_a_resumed_run_failing_before_its_first_step_keeps_its_folder(work, capsys):
    """A run continued with ``--resume`` that fails at once (its validation folder gone) is left as it
    was: its checkpoint, config and metrics, for the next ``--resume``."""
    status, err = samflow(["fit", *TINY, *QUICKSTART], capsys)
    assert status == 0, err[-3000:]
    run = work / "runs" / "quickstart" / "version_0"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert Path("checkpoints/last.ckpt") in before
    shutil.rmtree(work / "data" / "val")
    resume = ["--resume", "last", "--trainer.max_epochs", "2", "--data.init_args.val", "data/val"]
    line = one_error_line(["fit", *TINY, *QUICKSTART, *resume], capsys)
    assert "data.val: Dataset root data/val does not exist" in line
    assert run_folders(work) == [run]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_validate_whose_model_cannot_be_built_leaves_no_subfolder_in_the_run(work, capsys):
    """The run's ``validate/`` subfolder is claimed as it is named, before the build; a SAM file that
    cannot be loaded removes it again."""
    status, err = samflow(["fit", *TINY, *QUICKSTART, "--trainer.limit_val_batches", "0"], capsys)
    assert status == 0, err[-3000:]
    run = work / "runs" / "quickstart" / "version_0"
    garbage = work / "sam.pth"
    garbage.write_text("not a checkpoint")
    ckpt = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--model.sam.checkpoint", str(garbage)]
    line = one_error_line(["validate", *TINY, *QUICKSTART, *ckpt], capsys)
    assert str(garbage) in line
    assert not list(run.glob("validate*"))


PLATEAU = ["--model.scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"]


def test_a_plateau_scheduler_ranking_the_checkpoint_metric_the_other_way_is_refused_before_sam_is_built(
    no_sam_build, capsys
):
    """Was: in ``configure_optimizers``, after SAM was built and the run folder made."""
    line = one_error_line(["fit", *TINY, *PLATEAU], capsys)  # mode min; val/iou is ranked max
    assert "ReduceLROnPlateau(mode='min') watches val/iou" in line and "init_args.mode max" in line
    own = ["--model.scheduler.mode", "min", "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "max"]
    line = one_error_line(["fit", *TINY, *PLATEAU, *own], capsys)
    assert "watches val/loss, which the checkpoint ranks with mode 'max'" in line
    assert not (no_sam_build / "runs").exists()


def test_a_plateau_scheduler_that_can_run_passes_the_check():
    from samflow.config_checks import check_before_build

    def config(scheduler: str, **options) -> Namespace:
        spec = Namespace(class_path=scheduler, init_args=Namespace(mode="max", **options))
        return Namespace(
            model=Namespace(plugins={"p": None}, losses=None, scheduler=spec, metrics=None), data=None
        )

    check_before_build(config("torch.optim.lr_scheduler.ReduceLROnPlateau"), "fit")  # no monitor known here
    plateau = config("torch.optim.lr_scheduler.ReduceLROnPlateau")
    plateau["checkpoint"] = Namespace(monitor="val/iou", mode="max")
    check_before_build(plateau, "fit")
    plateau["model.scheduler.init_args.mode"] = "min"
    check_before_build(plateau, "validate")  # configure_optimizers runs in fit only
    own = config("lightning.pytorch.cli.ReduceLROnPlateau", monitor="val/loss")
    own["model.scheduler.init_args.mode"] = "min"
    own["checkpoint"] = Namespace(monitor="val/iou", mode="max")
    check_before_build(own, "fit")  # its own monitor


@pytest.mark.parametrize(
    ("command", "split", "problem"),
    [
        ("fit", "val", "missing"),
        ("validate", "val", "empty"),
        ("test", "test", "missing"),
        ("fit", "test", "empty"),
    ],
)
def test_a_data_folder_setup_would_refuse_is_refused_before_sam_is_built_in_its_words(
    no_sam_build, capsys, command, split, problem
):
    """A missing split folder or an empty one (every split that is set is listed, the command's or not).
    Was: at the data module's setup, after SAM was built (~10 s for vit_b) and the run folder made."""
    from samflow.data.datamodule import SegmentationDataModule
    from samflow.data.errors import DataError
    from samflow.data.quickstart import make_quickstart_data

    data = make_quickstart_data(no_sam_build / "data", n_train=1, n_val=1, size=(32, 48))
    folder = no_sam_build / "gone"
    if problem == "empty":
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
    splits = {"train": str(data / "train"), "val": str(data / "val"), split: str(folder)}
    with pytest.raises(DataError) as setup:  # what the data module's setup says
        SegmentationDataModule(**splits, img_size=128).setup(command)
    flags = [f"--data.init_args.{key}={value}" for key, value in splits.items()]
    line = one_error_line([command, *TINY, "--data.init_args.quickstart", "false", *flags], capsys)
    assert line == f"samflow: error: {setup.value}"
    assert f"data.{split}: " in line
    assert not (no_sam_build / "runs").exists()
