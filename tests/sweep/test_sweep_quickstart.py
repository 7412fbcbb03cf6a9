"""`samflow sweep` end to end: two worker processes share one SQLite study and run a 4-trial grid on
the quickstart (tiny sizes, 1 epoch), each trial a real `samflow fit` in its own folder."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import optuna
import yaml

from samflow.data.quickstart import make_quickstart_data

LRS = [1.0e-3, 5.0e-3]


def test_two_workers_share_one_study_and_cover_the_grid_once(tmp_path: Path):
    data = tmp_path / "data"
    make_quickstart_data(data, n_train=8, n_val=4)  # once, before the workers start
    sweep = {
        "name": "grid4",
        "method": "grid",
        "metric": {"name": "val/iou", "goal": "maximize"},
        "parameters": {
            "model.optimizer.init_args.lr": {"values": LRS},
            "model.plugins.tokens.init_args.lr": {"values": LRS},
        },
        "command": [
            "${env}", "samflow", "fit", "--experiment", "quickstart",
            "--trainer.max_epochs=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            f"--data.init_args.quickstart={{root: {data}, n_train: 8, n_val: 4}}",
            "--data.init_args.batch_size=4",
            "--data.init_args.img_size=64",
            "--model.sam.img_size=64",
            "${args}",
        ],
    }  # fmt: skip
    (tmp_path / "grid4.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    env.pop("SAMFLOW_DEBUG", None)
    command = [sys.executable, "-m", "samflow", "sweep", "grid4.yaml"]
    workers = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    folder = tmp_path / "runs" / "quickstart" / "sweeps" / "grid4"
    study = optuna.load_study(study_name="grid4", storage=f"sqlite:///{folder / 'study.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4, [
        (t.number, t.user_attrs.get("error")) for t in trials
    ]
    points = sorted(tuple(t.params[k] for k in sweep["parameters"]) for t in trials)
    assert points == sorted(itertools.product(LRS, LRS))  # every point once, none twice
    ran = [
        {line.split(":")[0] for line in out.splitlines() if line.startswith("trial ") and "=" in line}
        for out in outputs
    ]
    assert not ran[0] & ran[1]  # no trial started by both workers

    for t in trials:
        trial = folder / f"trial-{t.number}"
        config = yaml.safe_load((trial / "config.yaml").read_text())  # the trial's resolved config
        assert config["model"]["optimizer"]["init_args"]["lr"] == t.params["model.optimizer.init_args.lr"]
        assert (
            config["model"]["plugins"]["tokens"]["init_args"]["lr"]
            == t.params["model.plugins.tokens.init_args.lr"]
        )
        assert (trial / "metrics.csv").is_file() and list((trial / "checkpoints").glob("*.ckpt"))
        assert t.intermediate_values.keys() == {0} and t.value == t.intermediate_values[0]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("trial-")) == [
        f"trial-{n}" for n in range(4)
    ]

    # the summary: table, CSV, best config, plots (printed by the worker that finished last, and both)
    assert any("best: trial" in out and "trial  state" in out for out in outputs)
    assert len((folder / "trials.csv").read_text().splitlines()) == 5
    best = yaml.safe_load((folder / "grid4_best.yaml").read_text())
    best_trial = max(trials, key=lambda t: t.value)
    assert best["model"]["optimizer"]["init_args"]["lr"] == best_trial.params["model.optimizer.init_args.lr"]
    assert "logger" not in best["trainer"] and not best["trainer"].get("callbacks")
    assert (folder / "plots" / "history.png").is_file()
