"""One ``samflow fit`` in a process leaves the process as it found it (``samflow.process_state.restored_process_state``).

Fits run one after another in one process (a notebook, W&B's agent with a function, tests). A fit set,
for the rest of the process: W&B's offline mode (no account), ``SAMFLOW_VERBOSITY`` (``--quiet``: every
later run quiet), Lightning's seed variables (``PL_GLOBAL_SEED``: a later run with
``seed_everything: false`` drew its sample seeds from this run's seed, ``PL_SEED_WORKERS``: seeded its
workers), ``CUBLAS_WORKSPACE_CONFIG`` (``trainer.deterministic``), ``cudnn.benchmark`` (a later run's
default), the Lightning loggers' WARNING level (``--quiet``: a later run lost Lightning's info lines),
``sys.argv``, and W&B's service (``WANDB_SERVICE``: a ``samflow`` the process started later attached
to it) with the ``sys.exit`` and ``sys.excepthook`` W&B replaced for it.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from helpers import short_run

from samflow.console import verbosity
from samflow.data.quickstart import make_quickstart_data

LOGGERS = ("lightning.pytorch", "lightning.fabric")


def _state() -> dict:
    import lightning.pytorch  # noqa: F401  (its loggers and handlers, as the run finds them)

    handlers = {
        h for name in LOGGERS for h in logging.getLogger(name).handlers or logging.getLogger().handlers
    }
    return {
        "env": dict(os.environ),
        "argv": list(sys.argv),
        "hooks": (sys.exit, sys.excepthook),
        "levels": [logging.getLogger(name).level for name in LOGGERS],
        "filters": {id(h): list(h.filters) for h in handlers},
        "torch": (
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark,
            torch.get_float32_matmul_precision(),
            torch.get_num_threads(),
        ),
        "verbosity": verbosity(),
    }


def test_a_quiet_deterministic_fit_without_a_wandb_account_leaves_the_process_as_found(tmp_path, monkeypatch):
    from samflow.cli import main

    for name in ("WANDB_MODE", "WANDB_API_KEY", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "SAMFLOW_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B runs offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(sys, "argv", ["samflow"])
    monkeypatch.chdir(tmp_path)
    make_quickstart_data(tmp_path / "data", n_train=4, n_val=2)
    benchmark = torch.backends.cudnn.benchmark
    before = _state()
    args = [
        "fit", "--experiment", "quickstart", *short_run(train=1, val=1), "--quiet",
        "--trainer.enable_progress_bar=false", "--trainer.deterministic=true", "--trainer.benchmark=true",
        "--seed_everything=3", f"--data.init_args.quickstart={{root: {tmp_path / 'data'}, n_train: 4, n_val: 2}}",
        "--data.init_args.img_size=64", "--model.sam.img_size=64",
    ]  # fmt: skip
    try:
        assert main(args) == 0
        after = _state()
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert list((tmp_path / "runs").glob("wandb/**/offline-run-*")), "the run logged to W&B offline"
    env = {k: (before["env"].get(k), after["env"].get(k)) for k in before["env"].keys() | after["env"].keys()}
    assert {k: v for k, v in env.items() if v[0] != v[1]} == {}
    assert {k: v for k, v in after.items() if k != "env"} == {k: v for k, v in before.items() if k != "env"}


def test_a_verbose_run_after_a_quiet_one_shows_the_warnings_the_quiet_one_silenced(monkeypatch):
    """``silence_third_party`` ignores known warnings below ``--verbose``; the filter outlives the run
    (modules' own filters are installed on import, so the list is not put back), and a later
    ``--verbose`` run of the process shows them again."""
    import warnings

    from samflow.console import WARNING_NOISE, restored_console, set_verbosity, silence_third_party

    monkeypatch.setenv("SAMFLOW_VERBOSITY", "normal")  # set, so that the test's end puts the variable back
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()`"
    assert any(m.startswith(r"`isinstance\(treespec") for m, _ in WARNING_NOISE)
    with restored_console(), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        for level in ("quiet", "verbose", "normal", "verbose"):
            set_verbosity(level)
            silence_third_party()
            warnings.warn(f"{message} ({level} run)", FutureWarning, stacklevel=1)
    assert [str(w.message).rsplit("(", 1)[1] for w in shown] == ["verbose run)", "verbose run)"]
