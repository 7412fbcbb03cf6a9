"""W&B's agent: every value form it passes parses in `samflow fit`, each agent run gets its own folder,
and `--backend wandb` maps the sweep file (or says it needs an account) without any network."""

from __future__ import annotations

import sys

import pytest
import yaml

from samflow.cli import main
from samflow.sweep.agent import agent_values, wandb_sweep_config
from samflow.sweep.load import load_sweep


def test_agent_values_become_json():
    args = ["fit", "--a=None", "--b=True", "--c=False", "--d=[1, 'x', None]", "--e=1e-05", "--f={'k': None}"]
    assert agent_values(args) == [
        "fit", "--a=null", "--b=true", "--c=false", '--d=[1, "x", null]', "--e=1e-05", '--f={"k": null}'
    ]  # fmt: skip
    kept = [
        "--g=/data/x",
        "--h=adamw",
        "--i=5",
        "--j",
        "None",
        '--k={"class_path": "X", "init_args": {"a": true}}',
    ]
    assert agent_values(kept) == kept  # not Python literals, or not --key=value: unchanged


def print_config(args: list[str], monkeypatch, capsys) -> dict:
    """``samflow fit --experiment quickstart ARGS --print_config`` in this process -> the config."""
    monkeypatch.setattr(sys, "argv", ["samflow"])
    with pytest.raises(SystemExit) as done:
        main(["fit", "--experiment", "quickstart", *args, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_every_wandb_value_form_parses_in_fit(monkeypatch, capsys):
    config = print_config(
        [
            "--model.sam.checkpoint=None",
            "--trainer.max_epochs=None",
            "--trainer.max_steps=7",
            "--trainer.deterministic=True",
            "--model.metrics=['iou', 'dice']",
            "--model.optimizer.init_args.lr=1e-05",
            "--model.optimizer.init_args.betas=[0.8, 0.99]",
            "--data.init_args.augment=None",
        ],
        monkeypatch,
        capsys,
    )
    model, trainer = config["model"], config["trainer"]
    assert model["sam"]["checkpoint"] is None  # not a file named "None"
    assert trainer["max_epochs"] is None and trainer["max_steps"] == 7 and trainer["deterministic"] is True
    assert model["metrics"] == ["iou", "dice"]
    assert model["optimizer"]["init_args"]["lr"] == 1e-05
    assert model["optimizer"]["init_args"]["betas"] == [0.8, 0.99]
    assert config["data"]["init_args"]["augment"] is None


def test_each_wandb_agent_run_gets_its_own_folder_and_run(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw3ep")
    folders = []
    for run in ("run1", "run2"):
        monkeypatch.setenv("WANDB_RUN_ID", run)
        trainer = print_config(["--trainer.max_epochs=1"], monkeypatch, capsys)["trainer"]
        assert [entry["class_path"].rsplit(".", 1)[-1] for entry in trainer["logger"]] == [
            "CSVLogger",
            "SamflowWandbLogger",  # samflow's own W&B logger class, as in runs outside sweeps
        ]
        csv, wandb = (entry["init_args"] for entry in trainer["logger"])
        folder = f"runs/quickstart/sweeps/sw3ep/{run}"
        assert trainer["default_root_dir"] == folder
        assert (csv["save_dir"], csv["name"], csv["version"]) == ("runs/quickstart/sweeps/sw3ep", "", run)
        assert (wandb["id"], wandb["group"]) == (run, "sw3ep")  # the agent's own W&B run
        folders.append(folder)
    assert folders[0] != folders[1]


def test_wandb_backend_maps_the_sweep_file():
    config = wandb_sweep_config(load_sweep("quickstart_lr"))
    assert config["method"] == "grid" and config["metric"] == {"name": "val/iou", "goal": "maximize"}
    assert config["parameters"] == {
        "model.optimizer.init_args.lr": {"values": [1.0e-3, 5.0e-3]},
        "model.plugins.tokens.init_args.lr": {"values": [1.0e-3, 5.0e-3]},
    }
    assert config["command"] == [
        "${env}", "samflow", "fit", "--experiment", "quickstart", "--trainer.max_epochs=5", "${args}"
    ]  # fmt: skip


def test_wandb_backend_maps_nested_parameters(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text(
        "method: random\nmetric: {name: val/iou}\nprogram: quickstart\n"
        "parameters:\n  model:\n    parameters:\n      optimizer.init_args.lr: {min: 0.001, max: 0.01}\n"
    )
    config = wandb_sweep_config(load_sweep(str(path)))
    assert config["parameters"] == {"model.optimizer.init_args.lr": {"min": 0.001, "max": 0.01}}
    assert config["command"][3:5] == ["--experiment", "quickstart"]


def test_wandb_backend_without_an_account_says_so(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["sweep", "quickstart_lr", "--backend", "wandb"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("samflow: error: --backend wandb needs a W&B account") and "\n" not in err
    assert "--backend optuna" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: file"),
        (["quickstart_lr", "--backend", "ray"], "invalid choice: 'ray'"),
        (["quickstart_lr", "--trials", "0"], "--trials must be at least 1"),
        (["nope.yaml"], "Sweep file 'nope.yaml' does not exist"),
        (["quickstart_lr", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_sweep_command_errors_are_one_line(args, message, capsys):
    assert main(["sweep", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("samflow: error:") and message in err and "\n" not in err
