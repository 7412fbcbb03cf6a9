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
  show.
"""

from __future__ import annotations

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
        if self._experiment is None and self._save_dir:
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)  # W&B's git root check needs it
        return super().experiment

    @override
    def log_hyperparams(self, params: Any) -> None:
        """Not logged: the CLI logs the whole resolved config once (``SaveConfig``)."""
