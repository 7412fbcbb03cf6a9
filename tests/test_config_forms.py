"""How a config chooses components and how several configs and flags combine.

- every component is chosen by ``class_path`` (+ ``init_args``), a third party's too, and the short
  names stay aliases: prompts, losses, metrics and augmentation;
- a later ``--config`` adds to and changes the plugin map by key, it does not replace it;
- flags before ``--experiment`` override the experiment as flags after it do.

The configs are parsed in-process with ``--print_config`` (nothing is built), or built with
``SamflowCLI(run=False)`` (a tiny SAM, no data read).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from samflow.cli import main
from samflow.commands import experiment_from_argv
from samflow.data import BoxPrompt, GpuAugment, PointPrompt
from samflow.data.augment import BatchAugment
from samflow.losses import SoftIoULoss


class Cutout(BatchAugment):
    """A third party's batch augmentation (never run here)."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size

    def forward(self, batch):
        return batch


def resolved(args: list[str], cwd: Path, capsys: pytest.CaptureFixture, monkeypatch) -> dict:
    """The config ``samflow <args> --print_config`` prints, parsed in this process."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["samflow"])  # main() rewrites sys.argv for DDP children
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


TWO_PLUGINS = {
    "model": {
        "sam": {"variant": "tiny"},
        "plugins": {
            "hq": {"class_path": "HQSam", "init_args": {"output": "hq", "num_points": 64}},
            "tokens": {
                "class_path": "ExtraTokens",
                "init_args": {"num_tokens": 2, "lr": 5.0e-3, "predict": False},
            },
        },
    },
    "data": {
        "class_path": "samflow.data.SegmentationDataModule",
        "init_args": {"quickstart": True, "img_size": 128},
    },
}
ONE_OPTION = {"model": {"plugins": {"hq": {"init_args": {"lr": 1.0e-4}}}}}


# ---- a second config keeps the other plugins ----
def test_a_second_config_changes_one_plugin_option_and_keeps_the_other_plugins(tmp_path, capsys, monkeypatch):
    experiment = write(tmp_path / "two_plugins.yaml", TWO_PLUGINS)
    small = write(tmp_path / "small.yaml", ONE_OPTION)
    config = resolved(
        ["fit", "--experiment", str(experiment), "--config", str(small)], tmp_path, capsys, monkeypatch
    )
    plugins = config["model"]["plugins"]
    assert list(plugins) == ["hq", "tokens"]
    hq, tokens = plugins["hq"], plugins["tokens"]
    assert hq["class_path"] == "samflow_plugins.hq_sam.HQSam"
    assert hq["init_args"]["lr"] == 1.0e-4  # the option changed
    assert hq["init_args"]["output"] == "hq" and hq["init_args"]["num_points"] == 64  # its other options stay
    assert tokens["class_path"] == "samflow_plugins.tokens.ExtraTokens"
    assert tokens["init_args"]["num_tokens"] == 2 and tokens["init_args"]["lr"] == 5.0e-3


def test_a_second_config_on_a_packaged_experiment_adds_a_plugin(tmp_path, capsys, monkeypatch):
    extra = write(tmp_path / "extra.yaml", {"model": {"plugins": {"hq": {"class_path": "HQSam"}}}})
    small = write(tmp_path / "small.yaml", {"model": {"plugins": {"tokens": {"init_args": {"lr": 1.0e-4}}}}})
    args = ["fit", "--experiment", "quickstart", "--config", str(small), "--config", str(extra)]
    plugins = resolved(args, tmp_path, capsys, monkeypatch)["model"]["plugins"]
    assert list(plugins) == ["decoder", "tokens", "hq"]
    assert plugins["tokens"]["init_args"]["lr"] == 1.0e-4


def test_a_plugin_map_given_as_a_flag_replaces_the_map(tmp_path, capsys, monkeypatch):
    """The documented way to drop the experiment's plugins."""
    args = ["fit", "--experiment", "quickstart", "--model.plugins", "{only: {class_path: DecoderTuning}}"]
    assert list(resolved(args, tmp_path, capsys, monkeypatch)["model"]["plugins"]) == ["only"]


def test_the_merged_plugins_are_the_ones_built(tmp_path, monkeypatch):
    from samflow.lightning_cli import SamflowCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    experiment = write(tmp_path / "two_plugins.yaml", TWO_PLUGINS)
    small = write(tmp_path / "small.yaml", ONE_OPTION)
    args = ["--config", str(experiment), "--config", str(small), "--trainer.logger", "false"]
    model = SamflowCLI("test", args=args, run=False).model
    assert list(model.plugins.keys()) == ["hq", "tokens"]
    assert model.plugins["hq"].lr == 1.0e-4 and model.plugins["tokens"].lr == 5.0e-3


# ---- flags before --experiment ----
def test_flags_before_the_experiment_override_it(tmp_path, capsys, monkeypatch):
    small = write(tmp_path / "small.yaml", {"data": {"init_args": {"batch_size": 3}}})
    args = [
        "fit",
        "--trainer.max_epochs",
        "3",
        "--config",
        str(small),
        "--experiment",
        "quickstart",
        "--trainer.log_every_n_steps",
        "7",
    ]
    config = resolved(args, tmp_path, capsys, monkeypatch)
    assert config["trainer"]["max_epochs"] == 3  # quickstart says 20
    assert config["data"]["init_args"]["batch_size"] == 3  # quickstart says 16
    assert config["trainer"]["log_every_n_steps"] == 7


def test_the_experiment_config_goes_right_after_the_subcommand():
    args, name = experiment_from_argv(
        ["fit", "--trainer.max_epochs", "3", "--experiment=quickstart", "--x", "1"]
    )
    assert name == "quickstart"
    assert args[0] == "fit" and args[1] == "--config" and args[2].endswith("quickstart.yaml")
    assert args[3:] == ["--trainer.max_epochs", "3", "--x", "1"]


# ---- components by class_path, short names as aliases ----
def test_prompts_by_class_path_and_by_alias(tmp_path, capsys, monkeypatch):
    args = [
        "fit",
        "--experiment",
        "quickstart",
        "--data.init_args.prompt",
        "{class_path: PointPrompt, init_args: {positive: 2}}",
        "--data.init_args.eval_prompt",
        "BoxPrompt",
        "--data.init_args.eval_prompt.jitter",
        "0.1",
    ]
    data = resolved(args, tmp_path, capsys, monkeypatch)["data"]["init_args"]
    assert data["prompt"] == {
        "class_path": "samflow.data.PointPrompt",
        "init_args": {"positive": 2, "negative": 0},
    }
    assert data["eval_prompt"]["init_args"]["jitter"] == 0.1
    alias = resolved(["fit", "--experiment", "quickstart"], tmp_path, capsys, monkeypatch)["data"][
        "init_args"
    ]
    assert alias["prompt"] == "box"


def test_components_by_class_path_reach_the_run(tmp_path, monkeypatch):
    """A third party's augmentation, a prompt, a loss term and a metric, each by class_path."""
    from samflow.lightning_cli import SamflowCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    config = {
        "model": {
            "sam": {"variant": "tiny"},
            "plugins": {"decoder": {"class_path": "DecoderTuning"}},
            "losses": {
                "bce": 1.0,
                "iou": {"class_path": "SoftIoULoss", "init_args": {"eps": 0.5}, "weight": 0.5},
            },
            "metrics": [
                "iou",
                {"class_path": "torchmetrics.classification.BinaryAccuracy", "init_args": {"threshold": 0.4}},
            ],
        },
        "data": {
            "class_path": "samflow.data.SegmentationDataModule",
            "init_args": {
                "quickstart": True,
                "img_size": 128,
                "prompt": {"class_path": "BoxPrompt", "init_args": {"jitter": 0.2}},
                "augment": {"class_path": "Cutout", "init_args": {"size": 4}},
            },
        },
    }
    args = ["--config", str(write(tmp_path / "exp.yaml", config)), "--trainer.logger", "false"]
    cli = SamflowCLI("test", args=args, run=False)
    assert isinstance(cli.datamodule.augment, Cutout) and cli.datamodule.augment.size == 4
    assert isinstance(cli.datamodule.prompt, BoxPrompt) and cli.datamodule.prompt.jitter == 0.2
    loss = cli.model.loss
    assert isinstance(loss.losses["iou"], SoftIoULoss) and loss.weights == {"bce": 1.0, "iou": 0.5}
    metrics = cli.model._metric_set("val", 0)
    assert set(metrics.keys()) == {"iou", "binary_accuracy"}
    assert metrics["binary_accuracy"].threshold == 0.4


def test_augment_arguments_alone_still_mean_gpu_augment(tmp_path, capsys, monkeypatch):
    small = write(tmp_path / "small.yaml", {"data": {"init_args": {"augment": {"vflip": 0.5}}}})
    config = resolved(
        ["fit", "--experiment", "quickstart", "--config", str(small)], tmp_path, capsys, monkeypatch
    )
    augment = config["data"]["init_args"]["augment"]
    assert augment["class_path"] == "samflow.data.GpuAugment"
    assert augment["init_args"]["hflip"] == 0.5 and augment["init_args"]["vflip"] == 0.5
    assert isinstance(GpuAugment(**augment["init_args"]), GpuAugment)


def test_a_bad_class_path_fails_when_the_config_is_parsed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    bad = "{class_path: BoxPrompt, init_args: {jiter: 0.1}}"
    code = main(["fit", "--experiment", "quickstart", "--data.init_args.prompt", bad])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("samflow: error: --data.init_args.prompt")
    assert "Option 'jiter' is not accepted" in lines[0]


def test_a_bad_alias_argument_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    code = main(["fit", "--experiment", "quickstart", "--data.init_args.prompt", "{name: box, jiter: 0.1}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("samflow: error: ValueError: data.prompt: prompt 'box' (BoxPrompt)")
    assert "jiter" in last


def test_prompt_samplers_draw_what_their_class_says():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 2:5] = True
    assert PointPrompt(positive=2)(mask, torch.Generator().manual_seed(0))["points"].shape == (2, 2)


# ---- a misspelt plugin key is refused, not added as a plugin that does nothing ----
@pytest.mark.parametrize("form", ["flag", "config"])
def test_options_of_a_misspelt_plugin_key_are_refused_naming_the_key(tmp_path, capsys, monkeypatch, form):
    """``tokenz`` with options and no class_path became ``samflow.SamPlugin`` (a plugin that does
    nothing) beside ``tokens``, whose learning rate stayed as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    misspelt = {"model": {"plugins": {"tokenz": {"init_args": {"lr": 1.0e-4}}}}}
    if form == "flag":
        args = ["--model.plugins.tokenz.init_args.lr", "1e-4"]
    else:
        args = ["--config", str(write(tmp_path / "lr.yaml", misspelt))]
    quick = ["--trainer.max_epochs", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false"]
    code = main(["fit", "--experiment", "quickstart", *args, *quick])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("samflow: error:")]
    assert code == 1 and len(lines) == 1
    assert "model.plugins.tokenz has no class_path" in lines[0]
    assert "(decoder, tokens)" in lines[0] and "did you mean model.plugins.tokens?" in lines[0]


# ---- a misspelt option: the file and full key it is written at, and the closest option ----
def error_line(args: list[str], capsys) -> str:
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("samflow: error:")]
    assert code == 1 and len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    ("config", "key", "closest"),
    [
        ({"trainer": {"max_epoch": 2}}, "trainer.max_epoch", "max_epochs"),
        ({"data": {"init_args": {"batch_sise": 2}}}, "data.init_args.batch_sise", "batch_size"),
        (
            {"model": {"plugins": {"tokens": {"init_args": {"lrr": 0.1}}}}},
            "model.plugins.tokens.init_args.lrr",
            "lr",
        ),
    ],
)
def test_a_misspelt_option_in_a_config_names_the_file_the_key_and_the_closest(
    tmp_path, capsys, monkeypatch, config, key, closest
):
    """jsonargparse's line named neither the file nor the full key (``--model.plugins: Option 'lrr' is not
    accepted``, ``Group 'trainer' does not accept option 'max_epoch'``) and suggested nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    path = write(tmp_path / "typo.yaml", config)
    line = error_line(["fit", "--experiment", "quickstart", "--config", str(path)], capsys)
    option = key.rpartition(".")[2]
    assert f"samflow: error: {path}: {key}: unknown option {option!r}; did you mean {closest!r}?" in line


def test_a_misspelt_flag_or_experiment_names_the_closest(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    line = error_line(["fit", "--experiment", "quickstart", "--trainer.max_epohcs", "2"], capsys)
    assert "--trainer.max_epohcs: unknown option; did you mean --trainer.max_epochs?" in line
    flag = "--model.plugins.tokens.init_args.num_tokenz"
    line = error_line(["fit", "--experiment", "quickstart", flag, "2"], capsys)
    assert f"{flag} '2': unknown option 'num_tokenz'; did you mean 'num_tokens'?" in line
    line = error_line(["fit", "--experiment", "quikstart"], capsys)
    assert "No experiment named 'quikstart'. Did you mean 'quickstart'?" in line
