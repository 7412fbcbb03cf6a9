"""Reading a W&B sweep file into a ``SweepSpec``: where a sweep name is found, the file's keys checked.

A sweep file is W&B's sweep YAML (https://docs.wandb.ai/models/sweeps/sweep-config-keys):
``method`` (grid | random | bayes), ``metric`` {name, goal, target}, ``parameters``, ``early_terminate``,
``command`` / ``program`` (naming the samflow experiment), ``run_cap``, ``name``, ``project``, ``entity``,
``description``. Parameter keys are samflow options, dotted (``model.optimizer.init_args.lr``) or nested
the W&B way (``model: {parameters: {optimizer: ...}}``); each parameter's spec is read by
``samflow.sweep.spec.parse_param``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from samflow.experiment_files import PACKAGED
from samflow.sweep.spec import SweepError, SweepSpec, parse_param

METHODS = ("grid", "random", "bayes")
TOP_LEVEL = {
    "program",
    "method",
    "metric",
    "parameters",
    "early_terminate",
    "command",
    "run_cap",
    "name",
    "project",
    "entity",
    "description",
}


def sweep_dirs() -> list[Path]:
    """Where sweep names are looked up, first match wins: ./experiments/sweeps, then the packaged ones."""
    return [Path.cwd() / "experiments" / "sweeps", PACKAGED / "sweeps"]


def resolve_sweep(name: str) -> Path:
    """The YAML file for ``name``: a path, or a sweep name in ``sweep_dirs()``."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SweepError(f"Sweep file {str(path)!r} does not exist.")
        return path.resolve()
    known: dict[str, Path] = {}
    for folder in sweep_dirs():
        for found in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            known.setdefault(found.stem, found)
    if name not in known:
        raise SweepError(
            f"No sweep named {name!r}. Known sweeps: {', '.join(sorted(known)) or 'none'}. Pass a YAML path."
        )
    return known[name].resolve()


def load_sweep(name: str) -> SweepSpec:
    """Read and check a sweep file (a path or a packaged sweep's name)."""
    path = resolve_sweep(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_sweep(raw, path)


def parse_sweep(raw: Any, path: Path) -> SweepSpec:
    where = str(path)
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: a sweep file is a mapping (method, metric, parameters, command).")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise SweepError(
            f"{where}: unknown key {unknown[0]!r}; a W&B sweep has {', '.join(sorted(TOP_LEVEL))}."
        )
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: method must be one of {', '.join(METHODS)}, got {method!r}.")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        raise SweepError(f"{where}: metric needs a name (e.g. metric: {{name: val/iou, goal: maximize}}).")
    goal = metric.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        raise SweepError(f"{where}: metric.goal must be minimize or maximize, got {goal!r}.")
    target = metric.get("target")
    if target is not None and not isinstance(target, (int, float)):
        raise SweepError(f"{where}: metric.target must be a number, got {target!r}.")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{where}: parameters must be a mapping of option -> {{values | distribution ...}}.")
    params = {
        key: parse_param(f"{where}: parameters.{key}", key, spec, method)
        for key, spec in _flatten(parameters, where)
    }
    experiment, args = _experiment(raw, where)
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepError(f"{where}: run_cap must be a positive integer, got {run_cap!r}.")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise SweepError(f"{where}: name {name!r} names a folder: use letters, digits, '.', '_' or '-'.")
    return SweepSpec(
        path=path,
        method=method,
        metric=metric["name"],
        goal=goal,
        params=params,
        experiment=experiment,
        args=args,
        target=target,
        early_terminate=_early_terminate(raw.get("early_terminate"), where),
        run_cap=run_cap,
        name=name,
        raw=raw,
    )


def _flatten(parameters: dict[str, Any], where: str, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, spec) pairs; W&B's nested form ``key: {parameters: {...}}`` adds to the prefix."""
    out = []
    for key, spec in parameters.items():
        full = f"{prefix}{key}"
        if isinstance(spec, dict) and "parameters" in spec:
            if set(spec) != {"parameters"} or not isinstance(spec["parameters"], dict):
                raise SweepError(f"{where}: parameters.{full}: a nested group has only 'parameters'.")
            out += _flatten(spec["parameters"], where, f"{full}.")
        else:
            out.append((full, spec))
    return out


def _experiment(raw: dict[str, Any], where: str) -> tuple[str, list[str]]:
    """The experiment ``command`` (``... samflow fit --experiment X ...``) or ``program`` names, and the
    command's other fixed flags (W&B's macros ``${env}``, ``${interpreter}``, ``${program}``,
    ``${args}`` ... are left out)."""
    command = raw.get("command")
    if command is not None:
        if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
            raise SweepError(f"{where}: command must be a list of strings.")
        words = [str(c) for c in command]
        for i, word in enumerate(words):
            if word == "--experiment" and i + 1 < len(words):
                rest = words[:i] + words[i + 2 :]
                return words[i + 1], _fixed_flags(rest)
            if word.startswith("--experiment="):
                return word.split("=", 1)[1], _fixed_flags(words[:i] + words[i + 1 :])
    program = raw.get("program")
    if isinstance(program, str) and program and not program.endswith(".py"):
        return program, []
    raise SweepError(
        f"{where}: name the experiment in command "
        "(command: [${{env}}, samflow, fit, --experiment, NAME, ${{args}}]) or as program: NAME."
    )


def _fixed_flags(words: list[str]) -> list[str]:
    """The command's words from the first flag on, without W&B's ``${...}`` macros."""
    first = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    return [w for w in words[first:] if not re.fullmatch(r"\$\{\w+\}", w)]


def _early_terminate(spec: Any, where: str) -> dict[str, Any] | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in ("hyperband", "median"):
        got = spec.get("type") if isinstance(spec, dict) else spec
        raise SweepError(
            f"{where}: early_terminate.type must be hyperband (or samflow's median), got {got!r}."
        )
    allowed = {
        "hyperband": {"type", "min_iter", "max_iter", "s", "eta"},
        "median": {"type", "n_startup_trials", "n_warmup_steps"},
    }
    unknown = sorted(set(spec) - allowed[spec["type"]])
    if unknown:
        raise SweepError(f"{where}: early_terminate.{unknown[0]} is not an option of {spec['type']}.")
    for key in set(spec) - {"type"}:
        value = spec[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (0 if key in ("s", "n_warmup_steps", "n_startup_trials") else 1)
        ):
            raise SweepError(f"{where}: early_terminate.{key} must be a positive integer, got {value!r}.")
    if spec["type"] == "hyperband" and "min_iter" not in spec and "max_iter" not in spec:
        raise SweepError(f"{where}: early_terminate hyperband needs min_iter or max_iter.")
    if spec["type"] == "hyperband" and spec.get("eta", 3) < 2:
        raise SweepError(f"{where}: early_terminate.eta must be at least 2.")
    return dict(spec)
