"""W&B sweep files -> Optuna: every distribution, the grid, the sampler and pruner, one-line errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from samflow.experiment_files import ExperimentError, list_experiments
from samflow.sweep.load import load_sweep, parse_sweep
from samflow.sweep.spec import QUANTILE, SweepError

COMMAND = ["${env}", "samflow", "fit", "--experiment", "quickstart", "${args}"]


def spec_of(parameters: dict, method: str = "random", **extra):
    raw = {"method": method, "metric": {"name": "val/iou", "goal": "maximize"}, "parameters": parameters}
    return parse_sweep({"command": COMMAND, **raw, **extra}, Path("s.yaml"))


def param(spec: dict, method: str = "random"):
    return spec_of({"x": spec}, method).params["x"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"values": [1, 2, 3]}, CategoricalDistribution([1, 2, 3])),
        ({"distribution": "categorical", "values": ["a", "b"]}, CategoricalDistribution(["a", "b"])),
        ({"min": 1, "max": 8}, IntDistribution(1, 8)),  # integers: int_uniform, as W&B infers
        ({"min": 0.0, "max": 1.5}, FloatDistribution(0.0, 1.5)),  # floats: uniform
        ({"distribution": "int_uniform", "min": -2, "max": 5}, IntDistribution(-2, 5)),
        ({"distribution": "uniform", "min": 0.1, "max": 0.5}, FloatDistribution(0.1, 0.5)),
        (
            {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
            FloatDistribution(0.0, 1.0, step=0.25),
        ),
        ({"distribution": "q_uniform", "min": 8, "max": 64, "q": 8}, IntDistribution(8, 64, step=8)),
        (
            {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2},
            FloatDistribution(1e-5, 1e-2, log=True),
        ),
        (
            {"distribution": "log_uniform", "min": -3, "max": 1},
            FloatDistribution(math.exp(-3), math.exp(1), log=True),
        ),
        (
            {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1},
            FloatDistribution(0.01, 1.0, log=True),
        ),
        (
            {"distribution": "inv_log_uniform", "min": 0, "max": 2},
            FloatDistribution(math.exp(-2), 1.0, log=True),
        ),
        (
            {"distribution": "q_log_uniform_values", "min": 1, "max": 100, "q": 2},
            FloatDistribution(1, 100, log=True),
        ),
        ({"distribution": "normal", "mu": 1, "sigma": 2}, FloatDistribution(*QUANTILE)),
        ({"distribution": "beta", "a": 2, "b": 5}, FloatDistribution(*QUANTILE)),
    ],
)
def test_each_wandb_distribution_is_the_right_optuna_distribution(spec, expected):
    assert param(spec).distribution == expected


def test_constants_are_not_sampled_and_pass_their_value():
    spec = spec_of(
        {"a": {"value": 3}, "b": {"distribution": "constant", "value": None}, "c": {"values": [1, 2]}}
    )
    assert set(spec.sampled) == {"c"}
    assert spec.overrides({"c": 2}) == {"a": 3, "b": None, "c": 2}


def test_transforms_follow_wandb_definitions():
    from scipy.stats import beta, norm

    assert param({"distribution": "normal", "mu": 1, "sigma": 2}).value(0.5) == pytest.approx(1.0)
    assert param({"distribution": "normal", "mu": 1, "sigma": 2}).value(0.975) == pytest.approx(
        1 + 2 * norm.ppf(0.975)
    )
    assert param({"distribution": "log_normal", "mu": 0, "sigma": 1}).value(0.5) == pytest.approx(1.0)
    assert param({"distribution": "q_normal", "mu": 10, "sigma": 5, "q": 4}).value(0.6) == 4 * round(
        (10 + 5 * norm.ppf(0.6)) / 4
    )
    assert param({"distribution": "beta", "a": 2, "b": 5}).value(0.3) == pytest.approx(beta.ppf(0.3, 2, 5))
    assert param({"distribution": "q_log_uniform_values", "min": 1, "max": 100, "q": 2}).value(7.3) == 8
    assert param({"distribution": "q_log_uniform", "min": 0, "max": 3, "q": 0.5}).value(1.3) == 1.5
    assert param({"distribution": "log_uniform_values", "min": 1e-5, "max": 1}).value(3e-4) == 3e-4


def test_values_optuna_cannot_store_round_trip_as_json():
    p = param({"values": [[1, 2], {"a": None}, "x"]})
    assert all(isinstance(c, str) for c in p.distribution.choices)
    assert [p.value(c) for c in p.distribution.choices] == [[1, 2], {"a": None}, "x"]


def test_nested_wandb_parameters_become_dotted_options():
    spec = spec_of(
        {"model": {"parameters": {"optimizer.init_args.lr": {"values": [1, 2]}, "x": {"value": 0}}}}
    )
    assert set(spec.params) == {"model.optimizer.init_args.lr", "model.x"}


def test_grid_enumerates_exactly_the_product():
    spec = spec_of(
        {
            "a": {"values": [1, 2, 3]},
            "b": {"distribution": "int_uniform", "min": 0, "max": 1},
            "c": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.25},
            "d": {"value": "fixed"},
        },
        method="grid",
    )
    grid = spec.grid()
    assert grid == {"a": [1, 2, 3], "b": [0, 1], "c": [0.0, 0.25, 0.5]}
    assert spec.grid_size() == 18
    # Optuna's GridSampler visits each point of the product once
    study = optuna.create_study(sampler=spec.sampler(seed=0))
    dists = {k: p.distribution for k, p in spec.sampled.items()}
    trials = [study.ask(dists) for _ in range(18)]
    seen = [tuple(t.params[k] for k in grid) for t in trials]
    assert sorted(seen) == sorted(itertools.product(*grid.values()))


def test_samplers_and_pruners():
    assert isinstance(spec_of({"a": {"values": [1]}}, "grid").sampler(), optuna.samplers.GridSampler)
    assert isinstance(spec_of({"a": {"values": [1]}}, "random").sampler(), optuna.samplers.RandomSampler)
    assert isinstance(spec_of({"a": {"values": [1]}}, "bayes").sampler(), optuna.samplers.TPESampler)
    assert isinstance(spec_of({"a": {"values": [1]}}).pruner(), optuna.pruners.NopPruner)
    hb = spec_of(
        {"a": {"values": [1]}}, early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3}
    ).pruner()
    assert isinstance(hb, optuna.pruners.HyperbandPruner)
    assert (hb._min_resource, hb._max_resource, hb._reduction_factor) == (2, "auto", 3)
    hb = spec_of(
        {"a": {"values": [1]}}, early_terminate={"type": "hyperband", "max_iter": 27, "s": 2}
    ).pruner()
    assert (hb._min_resource, hb._max_resource) == (3, 27)  # W&B: max_iter / eta^s
    median = spec_of({"a": {"values": [1]}}, early_terminate={"type": "median", "n_warmup_steps": 2}).pruner()
    assert isinstance(median, optuna.pruners.MedianPruner)


def test_command_names_the_experiment_and_fixed_flags():
    spec = spec_of(
        {"a": {"values": [1]}},
        command=[
            "${env}",
            "samflow",
            "fit",
            "--experiment",
            "quickstart",
            "--trainer.max_epochs=2",
            "${args}",
        ],
    )
    assert (spec.experiment, spec.args) == ("quickstart", ["--trainer.max_epochs=2"])
    raw = {
        "method": "grid",
        "metric": {"name": "m"},
        "parameters": {"a": {"values": [1]}},
        "program": "quickstart",
    }
    spec = parse_sweep(raw, Path("p.yaml"))
    assert (spec.experiment, spec.goal, spec.name) == ("quickstart", "minimize", "p")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "bogus"}, "method must be one of grid, random, bayes"),
        ({"metric": {"goal": "maximize"}}, "metric needs a name"),
        ({"metric": {"name": "m", "goal": "up"}}, "metric.goal must be minimize or maximize"),
        (
            {"parameters": {"lr": {"distribution": "uniformm", "min": 0, "max": 1}}},
            "parameters.lr: unknown distribution 'uniformm'",
        ),
        ({"parameters": {"lr": {"min": 1.0, "max": 0.5}}}, "parameters.lr: min must be below max"),
        (
            {"parameters": {"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}}},
            "parameters.lr: log_uniform_values needs min > 0",
        ),
        ({"parameters": {"lr": {"values": []}}}, "parameters.lr: values must be a non-empty list"),
        ({"parameters": {"lr": {"min": "a", "max": 1}}}, "parameters.lr: min must be a number"),
        ({"parameters": {"lr": {"valuez": [1]}}}, "parameters.lr: unknown key 'valuez'"),
        ({"parameters": {"lr": 0.1}}, "parameters.lr: expected a mapping"),
        (
            {"method": "grid", "parameters": {"lr": {"min": 0.1, "max": 0.5}}},
            "parameters.lr: a grid needs values",
        ),
        ({"early_terminate": {"type": "asha"}}, "early_terminate.type must be hyperband"),
        ({"early_terminate": {"type": "hyperband"}}, "early_terminate hyperband needs min_iter or max_iter"),
        (
            {"early_terminate": {"type": "hyperband", "min_iter": 0}},
            "early_terminate.min_iter must be a positive integer",
        ),
        ({"command": ["samflow", "fit"], "program": None}, "name the experiment in command"),
        ({"sweep_name": "x"}, "unknown key 'sweep_name'"),
        # a grid took range(int(0.5), 3): 0, below min
        (
            {"method": "grid", "parameters": {"n": {"distribution": "int_uniform", "min": 0.5, "max": 2}}},
            "parameters.n: int_uniform needs integer min and max, got 0.5 and 2",
        ),
        # keys the distribution does not read were ignored: q of uniform (no rounding), min beside values
        (
            {"parameters": {"lr": {"distribution": "uniform", "min": 0, "max": 1, "q": 0.1}}},
            "parameters.lr: q is not read by distribution uniform (it takes max, min)",
        ),
        (
            {"parameters": {"lr": {"values": [1, 2], "min": 0}}},
            "parameters.lr: min is not read by distribution categorical (it takes values)",
        ),
        (
            {"parameters": {"lr": {"distribution": "normal", "mu": 0, "sigma": 1, "min": 0}}},
            "parameters.lr: min is not read by distribution normal (it takes mu, sigma)",
        ),
    ],
)
def test_bad_sweep_files_get_one_line_naming_the_key(tmp_path, change, message):
    raw = {
        "method": "random",
        "metric": {"name": "val/iou"},
        "parameters": {"lr": {"values": [1]}},
        "command": COMMAND,
    }
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepError) as err:
        load_sweep(str(path))
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text
    assert isinstance(err.value, ExperimentError)  # the CLI prints it as one line, exit 1


def test_missing_and_unknown_sweep_files(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(str(tmp_path / "none.yaml"))
    with pytest.raises(SweepError, match="No sweep named 'nope'.*quickstart_lr"):
        load_sweep("nope")
    (tmp_path / "x.yaml").write_text("method: [grid")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(str(tmp_path / "x.yaml"))


def test_packaged_sweeps_load_by_name_and_are_not_experiments():
    quick = load_sweep("quickstart_lr")
    assert (quick.method, quick.experiment, quick.grid_size()) == ("grid", "quickstart", 4)
    bayes = load_sweep("sam_adapter_polyp_bayes")
    assert bayes.method == "bayes" and bayes.experiment == "sam_adapter_polyp"
    assert isinstance(bayes.pruner(), optuna.pruners.HyperbandPruner)
    assert set(bayes.sampled) == {
        "model.optimizer.init_args.lr",
        "model.plugins.adapter.init_args.scale_factor",
        "model.plugins.adapter.init_args.freq_rate",
    }
    assert load_sweep(str(quick.path)).name == "quickstart_lr"  # by path too
    assert not {"quickstart_lr", "sam_adapter_polyp_bayes", "sweeps"} & set(list_experiments())


def test_packaged_sweeps_ship_with_the_wheel():
    """pyproject's package data of samflow.experiments matches every sweep file (the wheel test in
    tests/test_packaging.py builds the wheel from the same patterns)."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    sweeps = sorted(
        p.relative_to(root / "experiments").as_posix()
        for p in (root / "experiments" / "sweeps").glob("*.yaml")
    )
    assert sweeps and all(any(fnmatch.fnmatch(s, pat) for pat in data["samflow.experiments"]) for s in sweeps)
