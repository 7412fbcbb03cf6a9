"""``samflow sweep FILE``: hyperparameter search from W&B sweep files.

    samflow sweep FILE [--backend optuna|wandb] [--trials N] [--storage URL] [--study NAME] [--summary]

FILE is a W&B sweep YAML (a path, ``./experiments/sweeps/NAME.yaml`` or a packaged sweep's name).
``load`` reads it into a ``spec`` (Optuna's search space, sampler and pruner); ``check`` checks its
options and metric against the experiment before any trial; ``run`` runs the trials (one ``samflow fit``
process each, in ``runs/<experiment>/sweeps/<study>/trial-<n>/``) of a study that ``storage`` keeps for
every worker; ``report`` is the trial's callback that reports the metric for pruning; ``summary`` writes
the table, the best config and the plots; ``agent`` handles W&B's agent (its flag values, its runs'
folders, ``--backend wandb``).
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 1 (samflow.cli), not usage and exit 2
        from samflow.experiment_files import ExperimentError

        raise ExperimentError(f"samflow sweep: {message} (`samflow sweep --help` lists the options)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="samflow sweep", description="Hyperparameter search from a W&B sweep file.")
    parser.add_argument("file", help="the sweep YAML: a path or a packaged sweep's name (e.g. quickstart_lr)")
    parser.add_argument(
        "--backend",
        choices=("optuna", "wandb"),
        default="optuna",
        help="optuna (default): local, no server; wandb: W&B's sweep server and agent (needs an account)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="the study's number of trials, all workers together (default: the grid's size, else run_cap, else 20)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL shared by workers (default: sqlite:///runs/<experiment>/sweeps/<study>/study.db)",
    )
    parser.add_argument(
        "--study", default=None, help="the Optuna study's name (default: the file's name: or its stem)"
    )
    parser.add_argument(
        "--summary", action="store_true", help="only print the summary of the Optuna study so far"
    )
    return parser


#: what ``samflow sweep`` imports from its extra: Optuna, its RDB storage's SQLAlchemy, matplotlib for the
#: plots and scikit-learn for Optuna's parameter importances
SWEEP_EXTRA = ("optuna", "sqlalchemy", "matplotlib", "sklearn")


def main(argv: list[str]) -> int:
    """Run ``samflow sweep``; returns the exit status."""
    from samflow.experiment_files import ExperimentError
    from samflow.sweep.check import check_sweep, experiment_path
    from samflow.sweep.load import load_sweep
    from samflow.usage import require_extra

    args = _parser().parse_args(argv)
    for module in SWEEP_EXTRA:  # all before any trial: a sweep must not fail at its plots
        require_extra(module, "sweep", "samflow sweep")
    if args.trials is not None and args.trials < 1:
        raise ExperimentError(f"samflow sweep: --trials must be at least 1, got {args.trials}.")
    optuna_only = [
        flag
        for flag, given in (
            ("--summary", args.summary),
            ("--storage", args.storage is not None),
            ("--study", args.study is not None),
        )
        if given
    ]
    if args.backend == "wandb" and optuna_only:  # else ignored: --summary would start W&B's agent
        raise ExperimentError(
            f"samflow sweep: {' and '.join(optuna_only)} are for Optuna's study (--backend optuna); with "
            "--backend wandb the sweep and its results are on W&B's server (its web page): drop "
            f"{' and '.join(optuna_only)}."
        )
    spec = load_sweep(args.file)
    if args.backend == "wandb":
        from samflow.requeue_hold import HeldSignal
        from samflow.sweep.agent import run_wandb

        if HeldSignal.current is not None:  # in a SLURM job: W&B's agent is not requeued, the signal noted
            HeldSignal.current.command = "sweep --backend wandb"

        return run_wandb(spec, args.trials)
    if not args.summary:  # before anything runs or is written
        check_sweep(spec, experiment_path(spec))
    from samflow.sweep.run import Sweep, run_optuna
    from samflow.sweep.summary import summarize

    sweep = Sweep.open(spec, args.study, args.storage)
    study = sweep.study(existing=True) if args.summary else run_optuna(sweep, args.trials)
    summarize(sweep, study)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    if not args.summary and "COMPLETE" not in states:
        raise ExperimentError(
            f"samflow sweep: no trial of study {sweep.study_name!r} has completed "
            f"({states.count('FAIL')} failed, {states.count('PRUNED')} pruned); the error column above says why."
        )
    return 0
