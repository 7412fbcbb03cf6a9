"""A sweep file checked against its experiment before any trial runs (misspelt option, value, metric,
experiment), a sweep with no completed trial exits 1, and the summary of a study that does not exist."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import samflow_here
from test_sweep_loop import write_sweep

import samflow.sweep
from samflow.cli import user_errors
from samflow.experiment_files import ExperimentError
from samflow.sweep import check, run
from samflow.sweep.load import load_sweep
from samflow.sweep.report import TrialMetricError
from samflow.sweep.spec import SweepError

LR = "model.optimizer.init_args.lr"


def quickstart_sweep(
    tmp_path: Path, parameters: dict, metric: str = "val/iou", flags: tuple = (), method: str = "grid"
) -> Path:
    path = tmp_path / "q.yaml"
    sweep = {
        "method": method,
        "metric": {"name": metric, "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "samflow", "fit", "--experiment", "quickstart", *flags, "${args}"],
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


def checked(path: Path) -> None:
    spec = load_sweep(str(path))
    check.check_sweep(spec, check.experiment_path(spec))


def test_a_misspelt_parameter_fails_before_anything_runs_naming_the_file_and_key(tmp_path):
    path = quickstart_sweep(tmp_path, {"model.optimizer.init_args.lrr": {"values": [1e-3, 5e-3]}})
    result = samflow_here(["sweep", str(path)], tmp_path, timeout=120)
    assert result.returncode == 1
    key = "parameters.model.optimizer.init_args.lrr"
    assert result.stderr.strip().splitlines() == [
        f"samflow: error: {path}: {key}: samflow fit refuses it: Option 'lrr' is not accepted"
    ]
    assert not (tmp_path / "runs").exists()  # nothing ran, no study was made


def test_values_fixed_flags_metric_and_experiment_are_checked(tmp_path):
    tokens = {"model.plugins.tokens.init_args.lr": {"min": 1e-4, "max": 1e-2}}
    checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}, **tokens}, method="random"))
    with pytest.raises(SweepError, match=rf"q.yaml: parameters.{LR}: samflow fit refuses it: --{LR}: .*abc"):
        checked(quickstart_sweep(tmp_path, {LR: {"values": ["abc", 1e-3]}}))
    with pytest.raises(SweepError, match=r"q.yaml: command: samflow fit refuses it: .*max_epochz"):
        checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}}, flags=("--trainer.max_epochz=1",)))
    with pytest.raises(
        SweepError,
        match=r"q.yaml: metric.name: experiment quickstart does not log 'val/iuo' "
        r"\(its validation metrics: val/dice, val/iou, val/mae\); fix metric.name.",
    ):
        checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}}, "val/iuo"))
    checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}}, "val/loss"))
    checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}}, "train/loss"))  # not knowable: not refused
    path = quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}})
    path.write_text(path.read_text().replace("- quickstart", "- quickstrat"))
    with pytest.raises(SweepError, match=r"q.yaml: command: No experiment named 'quickstrat'"):
        checked(path)


def test_a_sweep_with_no_completed_trial_exits_1_in_one_line(stub, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(check, "check_sweep", lambda spec, experiment: None)  # `x` is the stub's option
    path = write_sweep(tmp_path, "  x: {values: [bad]}\n")
    said: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = said.append  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(handler)  # Optuna's own handler writes "[W ...] ..."
    try:
        with pytest.raises(
            ExperimentError, match=r"no trial of study 's' has completed \(1 failed, 0 pruned\)"
        ):
            samflow.sweep.main([str(path)])
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert "trial 0 fail" in capfd.readouterr().out
    assert [r.getMessage() for r in said] == []  # not "There are no complete trials."


def test_a_trials_metric_error_is_a_one_line_user_error():
    assert issubclass(TrialMetricError, user_errors())  # samflow fit prints "samflow: error: ..."


def test_summary_of_a_study_that_does_not_exist_is_refused(stub, tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.5]}\n")))
    run.run_optuna(run.Sweep.open(spec, "made", None), None)
    sweep = run.Sweep.open(spec, "other", None)
    sweep.storage_url = run.Sweep.open(spec, "made", None).storage_url
    with pytest.raises(SweepError, match=r"--summary: there is no study 'other' in .*; its studies: made"):
        sweep.study(existing=True)
    assert optuna.get_all_study_names(sweep.storage_url) == ["made"]


def test_summary_shows_no_experimental_warning(stub, tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, "  x: {values: [0.5]}\n")))
    run.run_optuna(run.Sweep.open(spec, None, None), None)
    warnings.resetwarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.Sweep.open(spec, None, None).study(existing=True)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


def test_entity_goes_to_the_trials_and_the_summarys_wandb_runs(tmp_path, monkeypatch):
    import wandb

    from samflow.sweep import summary

    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, "  x: {values: [0.5]}\n", extra="entity: my-team\n")
    sweep = run.Sweep.open(load_sweep(str(path)), None, None)
    flags = run.trial_command(sweep, {"x": 1}, sweep.folder)
    logger = next(a for a in flags if a.startswith("--trainer.logger="))
    assert yaml.safe_load(logger.split("=", 1)[1])[1]["init_args"]["entity"] == "my-team"

    seen: dict = {}

    class Run:
        def log(self, data):
            pass

        def finish(self):
            pass

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or Run())
    summary.log_to_wandb(sweep, ["trial"], [["0"]], tmp_path)
    assert seen["entity"] == "my-team"

    # Without an account the summary run logs offline, and the sweep's process keeps its environment.
    import samflow.cli

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(samflow.cli, "wandb_credentials", lambda: False)
    modes: list = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: modes.append(os.environ.get("WANDB_MODE")) or Run())
    summary.log_to_wandb(sweep, ["trial"], [["0"]], tmp_path)
    assert modes == ["offline"] and "WANDB_MODE" not in os.environ


def test_flags_samflow_fit_takes_pass_the_check(tmp_path):
    """What ``samflow fit`` accepts in a sweep's ``command`` passes: the verbosity flags (taken out before
    the parser), the fit subcommand's own options (``--ckpt_path``), W&B's value forms (``--a=None``),
    also as a parameter's value."""
    ckpt = tmp_path / "x.ckpt"
    for flags in (("--quiet",), ("--verbose",), ("--ckpt_path", str(ckpt)), ("--model.sam.checkpoint=None",)):
        checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3]}}, flags=flags))
    checked(quickstart_sweep(tmp_path, {"model.sam.checkpoint": {"values": [None]}}))


def test_every_listed_value_and_a_misspelt_plugin_key_are_checked(tmp_path):
    """Only the first of a list of values was parsed, so ``[1.0e-3, abc]`` failed its trial alone; and
    ``model.plugins.tokenz...`` (no such plugin) added a plugin that does nothing to every trial."""
    with pytest.raises(SweepError, match=rf"q.yaml: parameters.{LR}: samflow fit refuses it: --{LR}: .*abc"):
        checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3, "abc"]}}))
    key = "model.plugins.tokenz.init_args.lr"
    with pytest.raises(
        SweepError,
        match=rf"q.yaml: parameters.{key}: .*model.plugins.tokenz has no class_path.*model.plugins.tokens\?",
    ):
        checked(quickstart_sweep(tmp_path, {key: {"values": [1e-3]}}))


def test_a_sweep_whose_trials_would_each_fail_before_sam_is_built_is_refused(tmp_path, monkeypatch):
    """What ``samflow fit`` refuses before SAM is built (``check_before_build``) failed each trial alone.
    Refused here: the base, and a listed value that fails with every value of the others; not what a
    value fixes, nor what a searched range may fix."""

    def built(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr("samflow.module.build_sam", built)
    size, small = "data.init_args.img_size", ("--data.init_args.img_size=64",)
    tokens = {"model.plugins.tokens.init_args.lr": {"min": 1e-4, "max": 1e-2}}
    with pytest.raises(SweepError, match=rf"q.yaml: command: every trial would fail .*{size} is 64 but"):
        checked(quickstart_sweep(tmp_path, tokens, flags=small, method="random"))
    with pytest.raises(SweepError, match=rf"q.yaml: parameters.{size}: every trial with the value 64 would"):
        checked(quickstart_sweep(tmp_path, {LR: {"values": [1e-3, 1e-2]}, size: {"values": [128, 64]}}))
    variant = {"model.sam.variant": {"values": ["tiny", "vit_b"]}}
    checked(quickstart_sweep(tmp_path, {**variant, size: {"values": [128, 1024]}}, flags=small))  # pairs
    searched = {size: {"distribution": "int_uniform", "min": 64, "max": 1024}}
    checked(quickstart_sweep(tmp_path, searched, flags=small, method="random"))  # not known in advance


def test_values_that_each_mend_one_of_two_faults_pass_together(tmp_path, monkeypatch):
    """The base has two faults (the data's size, no loss term); one parameter mends each. Every trial
    takes both, so every trial passes: checking one parameter at a time against the base (which still
    shows the other fault) refused these sweeps."""
    monkeypatch.setattr("samflow.module.build_sam", lambda *a, **k: pytest.fail("a trial ran"))
    size, losses = "data.init_args.img_size", "model.losses"
    broken = ("--data.init_args.img_size=64", "--model.losses={}")
    with pytest.raises(SweepError, match=r"command: every trial would fail .*img_size is 64 but"):
        checked(quickstart_sweep(tmp_path, {LR: {"value": 1e-3}}, flags=broken))
    checked(
        quickstart_sweep(tmp_path, {size: {"value": 128}, losses: {"values": [{"dice": 1.0}]}}, flags=broken)
    )
    checked(
        quickstart_sweep(tmp_path, {size: {"values": [128]}, losses: {"value": {"dice": 1.0}}}, flags=broken)
    )
    both = {size: {"values": [128, 64]}, losses: {"values": [{"dice": 1.0}, {"bce": 1.0}]}}
    with pytest.raises(SweepError, match=rf"parameters.{size}: every trial with the value 64 would fail"):
        checked(quickstart_sweep(tmp_path, both, flags=broken))
    with pytest.raises(
        SweepError,
        match=r"command: every trial would fail before it starts: model.losses: no loss terms",
    ):
        checked(quickstart_sweep(tmp_path, {size: {"value": 128}}, flags=broken))


def test_more_combinations_than_are_checked_refuse_nothing(tmp_path, monkeypatch):
    """Past ``_MOST_COMBINED`` combinations the check cannot know which trials fail: none is refused
    before it starts (each failing trial says why, before SAM is built)."""
    flags = ("--data.init_args.img_size=64",)
    sweep = quickstart_sweep(tmp_path, {LR: {"values": [1e-3, 1e-2, 1e-4]}}, flags=flags)
    with pytest.raises(SweepError, match=r"command: every trial would fail"):
        checked(sweep)
    monkeypatch.setattr(check, "_MOST_COMBINED", 2)
    checked(sweep)
