"""The study's shared storage: Optuna's RDB storage, the trials' heartbeats, and dead workers' trials.

Workers: every ``samflow sweep`` with the same ``--storage`` and ``--study`` pulls trials from one
study (SQLite in the sweep folder by default; a server database such as PostgreSQL across machines).
Trial numbers are handed out by the storage, so a grid's points 0..N-1 go to distinct trials;
``--trials`` is the study's total, all workers together. A trial sends heartbeats from the moment it is
created; a trial whose worker died (its heartbeats stopped for ``SAMFLOW_SWEEP_GRACE_S`` seconds, 120 by
default) is marked failed by the next worker that starts a trial, and its values are queued to run
again (``replaced`` maps the one to the other); so are those of a trial the sweep's interruption
ended (Ctrl-C, SIGTERM). A trial's pruner does not see the trials so replaced (``without_replaced``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from samflow.sweep.spec import SweepError

GRACE_S = 120  # a trial whose heartbeats stopped this long is taken for dead (SAMFLOW_SWEEP_GRACE_S)
STORAGE_TRIES = 5  # opening the storage, for workers that race to create its schema


def open_storage(url: str) -> Any:
    """Optuna's RDB storage for ``url`` (SQLite waits up to 2 min for a lock held by another worker)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    grace = grace_period()
    for attempt in range(STORAGE_TRIES):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_interval(),
                grace_period=grace,
                heartbeat_stale_trial_callback=run_again,
            )
        except (IntegrityError, OperationalError) as err:
            # Workers started together race to create the schema (one wins the alembic_version row or
            # the CREATE TABLE, the others fail): opened again, the schema is there.
            if attempt + 1 < STORAGE_TRIES and _schema_race(err):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise SweepError(f"--storage {url}: cannot open it: {' '.join(str(err).split())[:300]}") from None
        except Exception as err:  # noqa: BLE001 - sqlalchemy's errors vary by database
            raise SweepError(f"--storage {url}: cannot open it: {' '.join(str(err).split())[:300]}") from None
    raise AssertionError("unreachable")


def grace_period() -> int:
    """Seconds without a heartbeat after which a running trial is taken for dead (``SAMFLOW_SWEEP_GRACE_S``)."""
    text = os.environ.get("SAMFLOW_SWEEP_GRACE_S", str(GRACE_S))
    if not text.isdigit() or int(text) < 1:
        raise SweepError(f"SAMFLOW_SWEEP_GRACE_S must be a whole number of seconds, got {text!r}.")
    return int(text)


def heartbeat_interval() -> int:
    """Seconds between a running trial's heartbeats: a quarter of the grace period, at most 30."""
    return max(1, min(30, grace_period() // 4))


def run_again(study: Any, trial: Any, resume: Path | None = None) -> None:
    """Queue a failed trial's values as a new trial (the same grid point), which records the trial it
    replaces (``retry_of``): Optuna's callback for a trial it failed as stale, and the sweep's for a
    trial its interruption ended, whose run (``resume``, its folder) the new trial continues
    (``resume_from``: ``samflow.sweep.run.continued_run``)."""
    from optuna.trial import TrialState, create_trial

    attrs: dict[str, Any] = {"fixed_params": trial.params, "retry_of": trial.number}
    if resume is not None:
        attrs["resume_from"] = str(resume)
    for key in ("grid_id", "search_space"):
        if key in trial.system_attrs:
            attrs[key] = trial.system_attrs[key]
    study.add_trial(create_trial(state=TrialState.WAITING, system_attrs=attrs))


def replaced(trials: list[Any]) -> dict[int, int]:
    """``{number of a trial whose worker died: number of the trial that runs its values again}``."""
    return {t.system_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.system_attrs}


PLACE = "place"  # a trial's system attr: its place in the sweep (``places``)


def places(trials: list[Any]) -> dict[int, int]:
    """``{trial number: its place in the sweep}``: the n-th trial that runs new values has place n; one
    that runs another's values again (``retry_of``) takes that trial's place. A resumed sweep's trials
    so have the places of an uninterrupted sweep's: the grid point a place runs and its Hyperband
    bracket follow the place, not the number. A trial's place depends only on the trials numbered
    before it, so workers asking at once get distinct places."""
    out: dict[int, int] = {}
    fresh = 0
    for t in sorted(trials, key=lambda t: t.number):
        again = t.system_attrs.get("retry_of")
        if again in out:
            out[t.number] = out[again]
        else:
            out[t.number], fresh = fresh, fresh + 1
    return out


def place_of(study: Any, trial: Any, trials: list[Any] | None = None) -> int:
    """``trial``'s place (``places``), computed once, when the trial starts, and kept as its ``PLACE``
    system attr, which later calls read: a grid's sampler computes it (from ``trials``, the study's
    trials it has read) for a trial of new values; the trial loop's ask reads it, or computes it where
    the sampler did not (random, bayes, a trial that runs another's values again)."""
    storage = study._storage
    place = storage.get_trial(trial._trial_id).system_attrs.get(PLACE)
    if place is None:
        if trials is None:
            trials = storage.get_all_trials(study._study_id, deepcopy=False)
        place = places(trials)[trial.number]
        storage.set_trial_system_attr(trial._trial_id, PLACE, place)
    return int(place)


def without_replaced(storage: Any) -> Any:
    """``storage`` (an ``RDBStorage``) as a trial's pruner reads it: without the trials that run again as
    another trial. An interrupted trial's rung values (Hyperband's ``completed_rung_<n>``) would
    otherwise compete beside those of its rerun, the same values twice, which an uninterrupted sweep
    never has. Optuna reads a study's trials through ``get_all_trials``; its cache wrapper is the one
    Optuna puts around an ``RDBStorage`` itself (``optuna.storages.get_storage``)."""
    from optuna.storages._cached_storage import _CachedStorage

    class WithoutReplaced(_CachedStorage):
        def get_all_trials(self, study_id: int, deepcopy: bool = True, states: Any = None) -> list[Any]:
            trials = super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
            gone = replaced(super().get_all_trials(study_id, deepcopy=False))
            return [t for t in trials if t.number not in gone]

    return WithoutReplaced(storage)


def _schema_race(err: Exception) -> bool:
    """Whether ``err`` is another worker creating the study schema at the same moment."""
    text = str(err).lower()
    return any(
        s in text for s in ("alembic_version", "already exists", "database is locked", "unique constraint")
    )
