"""The trial's side of a sweep: report the metric to Optuna every validation epoch and stop when pruned.

``samflow sweep`` starts each trial as ``samflow fit ... --trainer.callbacks+=<TrialReport spec>``.
``TrialReport`` reads the trial's ``trial.json`` (storage URL, study, trial id, metric, the sweep file
for the pruner), reports the metric of every validation (``trial.report(value, n)`` for the run's n-th
validation: one an epoch by default, several with ``val_check_interval``, each its own step) and, when
the pruner says so, stops training after that validation. Everything it learns goes to
``result.json`` beside it, which the sweep reads when the process ends: the values per validation and
whether the trial was pruned. Rank 0 talks to the study; the decision is broadcast to every rank. The
pruner does not see the trials that an interruption or a dead worker ended and that run again as
another trial (``storage.without_replaced``): their values would count twice.

A trial that continues an interrupted trial's run (``--resume`` of its folder: ``samflow.sweep.run``)
gets that run's values back from the checkpoint (``state_dict``) and reports them to its own trial at
the start of training, asking the pruner after each as the interrupted trial did, so that its
intermediate values, its Hyperband rungs and its pruning equal an uninterrupted trial's. A run whose
checkpoint is at its end (the interruption came after its training, e.g. while W&B synced) trains
nothing when continued: Lightning skips its training (no ``on_train_start``), and its values are
reported at the fit's end instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from samflow.experiment_files import ExperimentError

TRIAL_FILE = "trial.json"
RESULT_FILE = "result.json"


class TrialMetricError(ExperimentError):
    """The sweep's metric is not among the run's logged values (``samflow fit`` says so in one line)."""


class TrialReport(Callback):
    """Report ``metric`` to the Optuna trial after each validation; stop when the pruner prunes it.

    Args:
        trial_file: the ``trial.json`` that ``samflow sweep`` wrote into the trial's folder.
    """

    def __init__(self, trial_file: str) -> None:
        self.trial_file = Path(trial_file)
        self.info: dict[str, Any] = json.loads(self.trial_file.read_text())
        self.result_file = self.trial_file.with_name(RESULT_FILE)
        self.values: dict[int, float] = {}
        self.pruned = False
        self._replay_due = False  # a continued run's values, not yet reported to this trial
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from samflow.sweep.load import load_sweep
            from samflow.sweep.storage import open_storage, without_replaced

            pruner = load_sweep(self.info["sweep"]).pruner()
            storage = without_replaced(open_storage(self.info["storage"]))
            study = optuna.load_study(study_name=self.info["study"], storage=storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, int(self.info["trial_id"]))
        return self._trial

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The values of the run this fit continues (its checkpoint's): the next validation is the next step."""
        self.values = {int(k): float(v) for k, v in state_dict.get("values", {}).items()}
        self._replay_due = bool(self.values)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A continued run (``load_state_dict``): its earlier values reported to this trial, step by step
        with the pruner asked after each, as the interrupted trial reported them; pruned, it stops."""
        if not self._replay_due:
            return
        self._replay_due = False
        prune = self._replay() if trainer.is_global_zero else False
        if trainer.strategy.broadcast(prune):
            trainer.should_stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A continued run with nothing left to train (no ``on_train_start``): its values reported now."""
        if self._replay_due:
            self._replay_due = False
            if trainer.is_global_zero:
                self._replay()

    def _replay(self) -> bool:
        trial = self._optuna_trial()
        reported = trial.study._storage.get_trial(trial._trial_id).intermediate_values
        prune = False
        for step, value in sorted(self.values.items()):
            if step in reported or not math.isfinite(value):
                continue
            trial.report(value, step)
            if trial.should_prune():  # possible when other workers' trials finished since
                prune = True
                self.values = {k: v for k, v in self.values.items() if k <= step}  # as if pruned then
                break
        self.pruned = prune
        self._write_result()
        return prune

    def _write_result(self) -> None:
        """``result.json``: the values so far and whether the trial was pruned (what the sweep reads)."""
        self.result_file.write_text(json.dumps({"values": self.values, "pruned": self.pruned}, indent=1))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        decision: tuple[bool, str] = (False, "")
        if trainer.is_global_zero:
            decision = self._report(trainer)
        prune, error = trainer.strategy.broadcast(decision)
        if error:
            raise TrialMetricError(error)
        if prune:
            trainer.should_stop = True

    def _report(self, trainer: Trainer) -> tuple[bool, str]:
        metric, step = self.info["metric"], len(self.values)  # this run's n-th validation
        value = trainer.callback_metrics.get(metric)
        if value is None:
            logged = (
                ", ".join(sorted(k for k in trainer.callback_metrics if not k.startswith("train/"))) or "none"
            )
            return False, (
                f"sweep {self.info['sweep']}: metric {metric!r} is not logged by this run (logged: {logged}); "
                "fix metric.name in the sweep file."
            )
        self.values[step] = float(value)
        prune = False
        if math.isfinite(self.values[step]):
            trial = self._optuna_trial()
            trial.report(self.values[step], step)
            prune = bool(trial.should_prune())
        self.pruned = prune
        self._write_result()
        return prune, ""
