"""``SamflowWandbLogger``: Lightning's WandbLogger as samflow runs it.

- the config is logged once, as the nested tree of the resolved experiment (``SaveConfig`` does it);
  Lightning's copy of the module's hyper-parameters (``log_hyperparams``) is not logged beside it;
- the run is named ``<experiment>/<run folder>`` (``quickstart/version_3``) and tagged with the
  experiment's plugin classes (``name_run``, called by the CLI before the run starts);
- W&B's "anonymous setting has no effect" warning is not raised (Lightning passes ``anonymous=None``,
  which W&B reads as set) and neither is "git root <dir> does not exist" (the save folder is created
  before W&B starts);
- below ``--verbose`` W&B's header and footer lines are off (the run's ``silent`` setting: samflow's
  header names the W&B run folder and how to upload it); W&B's warnings (``wandb.termwarn``) still
  show;
- the run's mode and folder are the ones of its own start, given to ``wandb.init``: W&B reads its
  environment once a process (its setup singleton), so a run after a disabled one (a test, a notebook
  cell) was disabled whatever ``WANDB_MODE`` said, and the folder is absolute, since W&B's service
  process, which writes the run's files, resolves a relative one in its own working directory (a
  ``samflow`` started by a process with a service, ``WANDB_SERVICE``, as W&B's agent or a test, failed
  with "run-<id>.wandb.syncstate: no such file or directory").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from samflow.console import verbosity


class SamflowWandbLogger(WandbLogger):
    """``WandbLogger`` with samflow's run name, tags, single config and quiet start (module docstring).

    Takes WandbLogger's arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if self._wandb_init.get("settings") is None and verbosity() != "verbose":
            import wandb

            self._wandb_init["settings"] = wandb.Settings(silent=True)  # the run's printer; warnings stay

    def name_run(self, name: str | None = None, tags: Sequence[str] = ()) -> None:
        """Name and tag the W&B run; no effect once the run has started."""
        if self._experiment is not None:
            return
        if name:
            self._wandb_init["name"] = self._name = name
        if tags:
            known = list(self._wandb_init.get("tags") or [])
            self._wandb_init["tags"] = list(dict.fromkeys([*known, *tags]))

    @property
    @override
    def experiment(self) -> Any:
        if self._experiment is None:
            if self._save_dir:
                Path(self._save_dir).mkdir(parents=True, exist_ok=True)  # W&B's git root check needs it
            self._wandb_init.update(self._start_settings())
        return super().experiment

    def _start_settings(self) -> dict[str, str]:
        """The mode and absolute folder of a run starting now, where ``wandb.init`` is not given them."""
        given = self._wandb_init
        settings = {"dir": os.path.abspath(given.get("dir") or os.environ.get("WANDB_DIR") or os.getcwd())}
        mode = "offline" if self._offline else os.environ.get("WANDB_MODE")
        if given.get("mode") is None and mode in ("online", "offline", "disabled", "shared", "dryrun"):
            settings["mode"] = mode
        return settings

    @override
    def log_hyperparams(self, params: Any) -> None:
        """Not logged: the CLI logs the whole resolved config once (``SaveConfig``)."""
