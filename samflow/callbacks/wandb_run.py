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
  with "run-<id>.wandb.syncstate: no such file or directory");
- an offline run whose id has offline runs before it in the same folder (a fit resumed with ``--resume``,
  after a stop or a kill, or a ``test`` on the run) numbers its history rows (W&B's ``_step``) after
  theirs: offline, W&B cannot resume a run and starts again at 0, and ``wandb sync`` of the folders, one
  run, dropped or overwrote the earlier rows. Online, W&B continues the run's rows itself.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from samflow.console import verbosity


class SamflowWandbLogger(WandbLogger):
    """``WandbLogger`` with samflow's run name, tags, single config and quiet start (module docstring).

    Takes WandbLogger's arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_row: int | None = None  # the next history row (``_step``) where W&B's own count is wrong
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
            if self._wandb_init.get("mode") == "offline" and self._wandb_init.get("id"):
                self._next_row = next_offline_row(
                    Path(self._wandb_init["dir"]) / "wandb", self._wandb_init["id"]
                )
        return super().experiment

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Lightning's, with the row numbered after earlier offline runs of this id (module docstring)."""
        run = self.experiment
        if self._next_row is None:
            super().log_metrics(metrics, step)
            return
        row = dict(_add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR))  # Lightning's prefixing
        if step is not None:
            row["trainer/global_step"] = step
        run.log(row, step=self._next_row)
        self._next_row += 1

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


def next_offline_row(folder: Path, run_id: str) -> int | None:
    """The history row after the last one of the offline runs of ``run_id`` in ``folder`` (W&B's
    ``offline-run-<time>-<id>/run-<id>.wandb``), or None where there are none."""
    last = [_last_row(path) for path in sorted(folder.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))]
    found = [row for row in last if row is not None]
    return max(found) + 1 if found else None


def _last_row(path: Path) -> int | None:
    """The highest ``_step`` of the history rows in a run's ``.wandb`` file; a file cut short by a kill
    is read up to its last whole record."""
    from wandb.proto import wandb_internal_pb2

    last = None
    for data in _records(path):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        try:
            record.ParseFromString(data)
        # protobuf's DecodeError (not imported: a dependency of W&B's): a record the writer did not finish
        except Exception:  # noqa: BLE001
            break
        if record.HasField("history"):
            last = max(last or 0, record.history.step.num)
    return last


def _records(path: Path) -> list[bytes]:
    """The records of W&B's transaction log (a LevelDB log: a 7-byte file header, 32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, kind 1 whole / 2 first / 3 middle / 4 last)."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    if raw[:4] != b":W&B":
        return []
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # the block's tail, too short for a header, is padding
            pos += block - pos % block
            continue
        _, size, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 or pos + 7 + size > len(raw):  # zeros where the writer stopped, or a chunk cut short
            break
        chunks += raw[pos + 7 : pos + 7 + size]
        pos += 7 + size
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
    return records
