"""A sweep's results: the table of trials, the best trial's config as an experiment, and plots.

Written to the sweep folder ``runs/<experiment>/sweeps/<study>/``:

- ``trials.csv``: every trial (number, state, the metric, epochs, values, seconds, error, folder);
- ``<study>_best.yaml``: the best trial's resolved config (its ``config.yaml``) without the sweep's
  callback and run folder, so ``samflow fit --experiment <that file>`` re-runs the best trial;
- ``plots/``: optimisation history, parameter importances, parallel coordinates (PNG, matplotlib).
  A plot Optuna cannot draw yet (e.g. importances before two trials have completed) is named with
  the reason.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from samflow.cli import print_table

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def ordered(study: Any, goal: str) -> list[Any]:
    """The trials, completed ones best first, then pruned (by their last value), running and failed;
    trials a worker skipped (a grid point another worker had taken) are left out."""
    sign = -1 if goal == "maximize" else 1

    def key(t: Any) -> tuple[int, float, int]:
        value = t.value if t.value is not None else _last(t)
        return (
            STATE_ORDER.get(t.state.name, 5),
            sign * value if value is not None else float("inf"),
            t.number,
        )

    return sorted((t for t in study.get_trials(deepcopy=False) if "skipped" not in t.user_attrs), key=key)


def _last(trial: Any) -> float | None:
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def _short(key: str) -> str:
    """A column title for an option: without ``model.`` and ``init_args.`` (``optimizer.lr``)."""
    return key.removeprefix("model.").replace("init_args.", "")


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(trials: list[Any], keys: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    from samflow.sweep.storage import replaced

    header = ["trial", "state", metric, "epochs", *keys, "seconds", "error"]
    again = replaced(trials)
    out = []
    for t in trials:
        error = t.user_attrs.get("error", "")
        if t.number in again:
            error = f"{error or 'its worker died (no heartbeat)'}; run again as trial {again[t.number]}"
        value = t.value if t.value is not None else _last(t)
        values = t.user_attrs.get("overrides", {})
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        out.append(
            [
                str(t.number),
                t.state.name.lower(),
                "" if value is None else f"{value:.4f}",
                str(t.user_attrs.get("epochs", "")),
                *(_value_text(values.get(k, "")) for k in keys),
                "" if seconds is None else f"{seconds:.0f}",
                error,
            ]
        )
    return header, out


def summarize(sweep: Any, study: Any) -> Path | None:
    """Print the table and write trials.csv, the best config and the plots; the best config's path."""
    spec, folder = sweep.spec, sweep.folder
    trials = ordered(study, spec.goal)
    keys = list(spec.sampled)
    header, table = rows(trials, keys, spec.metric)
    short = [_short(k) if k in keys else k for k in header]
    print_table(table, short)
    with open(folder / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "folder"])
        writer.writerows([*row, t.user_attrs.get("folder", "")] for row, t in zip(table, trials))
    best = next((t for t in trials if t.state.name == "COMPLETE"), None)
    best_file = None
    if best is None:
        print("best: no trial has completed yet")
    else:
        where = best.user_attrs.get("folder", "")
        print(f"best: trial {best.number} ({spec.metric} {best.value:.4f}), run folder {where}")
        best_file = write_best(sweep, best)
        if best_file is not None:
            print(f"  re-run it with: samflow fit --experiment {best_file}")
    plots = write_plots(study, folder / "plots")
    print(f"summary: {folder / 'trials.csv'}; plots: {', '.join(plots) or 'none'}")
    log_to_wandb(sweep, header, table, folder / "plots")
    return best_file


def write_best(sweep: Any, best: Any) -> Path | None:
    """The best trial's resolved config as an experiment file (without the sweep's callback and folder)."""
    config_file = Path(best.user_attrs.get("folder", "")) / "config.yaml"
    if not config_file.is_file():  # e.g. a worker on another machine ran it
        print(f"  no best config written: trial {best.number} has no {config_file} on this machine")
        return None
    config = yaml.safe_load(config_file.read_text()) or {}
    trainer = config.get("trainer") or {}
    trainer.pop("default_root_dir", None)
    trainer.pop("logger", None)
    callbacks = [
        c
        for c in trainer.get("callbacks") or []
        if not str((c or {}).get("class_path", "")).startswith("samflow.sweep.")
    ]
    trainer["callbacks"] = callbacks or None
    config.pop("ckpt_path", None)
    values = json.dumps(best.user_attrs.get("overrides", {}))
    header = (
        f"# description: best trial {best.number} of sweep {sweep.study_name} "
        f"({sweep.spec.metric} {best.value:.4f}) on {sweep.experiment.stem}\n"
        f"# sweep file: {sweep.spec.path}\n# values: {values}\n"
    )
    path = sweep.folder / f"{sweep.study_name}_best.yaml"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_plots(study: Any, folder: Path) -> list[str]:
    """Optuna's matplotlib plots as PNG; a plot it cannot draw is named with the reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    folder.mkdir(parents=True, exist_ok=True)
    done = []
    kinds: dict[str, Callable[[Any], Any]] = {
        "history": vis.plot_optimization_history,
        "importances": vis.plot_param_importances,
        "parallel_coordinates": vis.plot_parallel_coordinate,
    }
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "There are no complete trials." is said above
    try:
        for name, plot in kinds.items():
            done.append(_plot(name, plot, study, folder, plt))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return done


def _plot(name: str, plot: Callable[[Any], Any], study: Any, folder: Path, plt: Any) -> str:
    """One plot as ``folder/<name>.png`` (its path), or why it was not drawn."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = plot(study)
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
        figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        return str(folder / f"{name}.png")
    except Exception as err:  # noqa: BLE001 - e.g. importances with fewer than two completed trials
        return f"{name} not drawn ({' '.join(str(err).split())[:120]})"


def log_to_wandb(sweep: Any, header: list[str], table: list[list[str]], plots: Path) -> None:
    """The table and plots as one W&B run of the study's group (offline without an account)."""
    from samflow.cli import configure_wandb
    from samflow.process_state import restored_process_state

    with restored_process_state():  # WANDB_MODE=offline (no account) for this run only
        configure_wandb()
        if os.environ.get("WANDB_MODE") == "disabled":
            return
        _log_summary_run(sweep, header, table, plots)


def _log_summary_run(sweep: Any, header: list[str], table: list[list[str]], plots: Path) -> None:
    import wandb

    run = wandb.init(
        project=sweep.spec.raw.get("project") or "samflow",
        entity=sweep.spec.raw.get("entity"),
        group=sweep.study_name,
        name=f"{sweep.study_name}/summary",
        job_type="sweep-summary",
        dir="runs",
    )
    try:  # a failed log must not leave the run open in this process (a later wandb.init would reuse it)
        run.log(
            {
                "trials": wandb.Table(columns=list[Any](header), data=table),
                **{f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(plots.glob("*.png"))},
            }
        )
    finally:
        run.finish()
