"""What a run prints: samflow's own lines first, third-party noise silenced where it is made.

Verbosity (``samflow fit --quiet`` / ``--verbose``; the CLI puts it in ``SAMFLOW_VERBOSITY`` so DDP
processes inherit it):

- ``quiet``: warnings, errors and the results (the before/after table, test tables, where the run
  and its report are); no progress bar, no header;
- ``normal`` (default): samflow's header (experiment, SAM, plugins with trainable counts, data sizes,
  run folder), the progress bar and the results; the noise below is silenced;
- ``verbose``: everything, also the third-party lines ``normal`` silences and Lightning's own model
  summary.

The verbosity and the filters are the run's own: the CLI puts them back when the run ends
(``restored_console``), so the next run of the process (a notebook's, a test's) prints at its own.

Silenced in ``quiet`` and ``normal``, each at its source and by its exact text, so other warnings
still show:

- Lightning's litlogger advert (``💡 Tip: ...``) and its accelerator lines (``GPU available: ...``,
  ``TPU available: ...``; samflow's header names the device), ``Seed set to N``, and its lines on
  restoring a checkpoint (the header names the checkpoint);
- Lightning's model summary with its ``Total FLOPs: 0`` row (samflow's header lists what trains;
  ``--trainer.enable_model_summary true`` brings it back);
- torch's ``isinstance(treespec, LeafSpec)`` deprecation warning, raised in Lightning's ``_pytree``;
- W&B's info lines (samflow's header names the W&B run folder); its warnings stay. W&B's "anonymous
  setting has no effect" and "git root ... does not exist" warnings are not raised at all
  (``SamflowWandbLogger``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from typing_extensions import override

VERBOSITY_ENV = "SAMFLOW_VERBOSITY"
LEVELS = ("quiet", "normal", "verbose")
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")

#: Lightning log lines dropped below ``verbose`` (a record is dropped when its message starts so).
LIGHTNING_NOISE = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "`weights_only` was not set",  # said on every checkpoint save (ModelCheckpoint writes full checkpoints)
    # the run header names the checkpoint a run starts from (a file it cannot read is an error)
    "Restoring states from the checkpoint path at",
    "Restored all states from the checkpoint at",
    "Loaded model weights from the checkpoint at",
)
#: Warnings ignored below ``verbose``: (message regex, category).
WARNING_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


def local_log_dir(trainer: Any) -> str | None:
    """``trainer.log_dir`` as this process sees it, without its broadcast.

    ``trainer.log_dir`` broadcasts rank 0's value, so under DDP it is a collective call: asked on rank
    0 alone (in a rank-0-only branch, or by the progress bar, which only rank 0 draws) it waits
    forever. Code that runs on rank 0 only asks this instead; on rank 0 it is the same value.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        first = trainer.loggers[0]
        return first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
    return trainer.default_root_dir


def verbosity() -> str:
    """``quiet``, ``normal`` or ``verbose``, from ``SAMFLOW_VERBOSITY`` (default ``normal``)."""
    level = os.environ.get(VERBOSITY_ENV, "normal")
    return level if level in LEVELS else "normal"


def set_verbosity(level: str) -> None:
    """Set the verbosity of this process and of the processes it starts."""
    if level not in LEVELS:
        raise ValueError(f"verbosity must be one of {LEVELS}, got {level!r}")
    os.environ[VERBOSITY_ENV] = level


class _DropLines(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__("samflow.console")
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        # Lightning prefixes some lines with the process's rank under torchrun / DDP: "[rank: 1] Seed set to 0"
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage()))
        return not message.startswith(self.prefixes)


def silence_third_party() -> None:
    """Install the filters of this module's docstring for the current verbosity (idempotent); at
    ``verbose``, show again the warnings an earlier run of the process silenced."""
    level = verbosity()
    if level == "verbose":
        for message, category in WARNING_NOISE:
            if any(f[0] == "ignore" and getattr(f[1], "pattern", None) == message for f in warnings.filters):
                warnings.filterwarnings("default", message=message, category=category)
        return
    for message, category in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    import lightning.pytorch  # noqa: F401  (sets up Lightning's log handlers)

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if level == "quiet":
            logger.setLevel(logging.WARNING)
        for handler in logger.handlers or logging.getLogger().handlers:
            if not any(isinstance(f, _DropLines) for f in handler.filters):
                handler.addFilter(_DropLines(LIGHTNING_NOISE))


@contextmanager
def restored_console() -> Iterator[None]:
    """Put back, when the block ends, what ``set_verbosity`` and ``silence_third_party`` change for the
    whole process: ``SAMFLOW_VERBOSITY``, the Lightning loggers' levels and their handlers' line
    filters. So a ``--quiet`` run leaves the next run of the process (a notebook's, a test's) at its
    own verbosity. The warning filters stay: ``silence_third_party`` sets them for each run."""
    saved_env = os.environ.get(VERBOSITY_ENV)
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    filters = {handler: list(handler.filters) for handler in _lightning_handlers()}
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(VERBOSITY_ENV, None)
        else:
            os.environ[VERBOSITY_ENV] = saved_env
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in _lightning_handlers():
            for added in [f for f in handler.filters if isinstance(f, _DropLines)]:
                if added not in filters.get(handler, []):
                    handler.removeFilter(added)


def _lightning_handlers() -> set[logging.Handler]:
    """The handlers Lightning's records go to: its loggers' own, else the root logger's."""
    root = logging.getLogger().handlers
    return {h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers or root}


def console() -> Console:
    """The console samflow prints to: rich's global one, which the progress bar also uses."""
    from rich import get_console

    return get_console()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    """A rich table under its title; the first column left-aligned, the others right-aligned, floats
    with 4 decimals."""
    from rich.console import Group

    grid = Table(show_edge=False, header_style="bold")
    for i, column in enumerate(columns):
        grid.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        grid.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    return Group(f"{title}:", grid) if title else grid


@rank_zero_only
def show(*items: Any, result: bool = False) -> None:
    """Print on the first process: always for a ``result``, else not when quiet."""
    if result or verbosity() != "quiet":
        console().print(*items, markup=False, highlight=False)


class SamflowProgressBar(RichProgressBar):
    """Lightning's rich progress bar showing the run folder's version and the main validation metric.

    ``version`` is the name of the run folder (``version_3``), not the loggers' joined versions
    (W&B's id); the main metric is the checkpoint's ``monitor`` or, without one, the first metric.
    """

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")  # done: the results printed next come below the bar

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        log_dir = local_log_dir(trainer)  # only rank 0 draws the bar: no collective call here
        if log_dir is not None:
            items["version"] = Path(log_dir).name
        key = main_metric(trainer, pl_module)
        value = trainer.callback_metrics.get(key) if key else None
        if key and value is not None:
            items[key] = float(value)
        return items


def main_metric(trainer: Trainer, pl_module: LightningModule) -> str | None:
    """The validation metric that matters: the checkpoint's ``monitor``, else the first one computed."""
    monitor = getattr(trainer.checkpoint_callback, "monitor", None)
    if monitor:
        return str(monitor)
    first = next(iter(getattr(pl_module, "last_val_metrics", {}) or {}), None)
    return first


class RunHeader(Callback):
    """samflow's own lines at the start of a run: experiment, SAM, plugins, data, device, the checkpoint
    it starts from, run folder.

    Printed once per run on the first process, before the progress bar (not when quiet).

    Args:
        experiment: the experiment's name (set by the CLI).
        checkpoint: the checkpoint the run starts from (``--ckpt_path``, ``--resume``; set by the CLI).
    """

    def __init__(self, experiment: str = "", checkpoint: str | None = None) -> None:
        self.experiment = experiment
        self.checkpoint = checkpoint
        self._shown = False

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._shown or not trainer.is_global_zero:
            return
        log_dir = local_log_dir(trainer)
        self._shown = True
        show(self.lines(trainer, pl_module, stage, log_dir))

    def lines(self, trainer: Trainer, pl_module: LightningModule, stage: str, log_dir: str | None) -> Table:
        """The header as a two-column rich table."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("samflow", f"{getattr(stage, 'value', stage)} {self.experiment}".strip())
        module: Any = pl_module  # a SamflowModule, or any LightningModule
        spec = getattr(module, "sam_spec", None)
        if spec is not None:
            size = f", {spec.img_size} px" if spec.img_size else ""
            grid.add_row(
                "SAM", f"{spec.variant}{size} ({spec.checkpoint or 'random weights, no checkpoint'})"
            )
        counts = module.trainable_parameters() if hasattr(module, "trainable_parameters") else {}
        plugins = getattr(module, "plugins", {})
        for key, plugin in plugins.items():
            grid.add_row("plugin", f"{key}: {type(plugin).__name__}, {counts.get(key, 0):,d} trainable")
        if hasattr(getattr(module, "model", None), "sam"):
            sam = module.model.sam
            frozen = sum(p.numel() for p in sam.parameters() if not p.requires_grad)
            grid.add_row("frozen SAM", f"{frozen:,d} parameters")
        for name, count in data_sizes(trainer).items():
            grid.add_row("data", f"{name}: {count:,d} images")
        grid.add_row(
            "device",
            f"{trainer.accelerator.__class__.__name__.replace('Accelerator', '').lower()}"
            f" x {trainer.num_devices * trainer.num_nodes}",
        )
        if self.checkpoint:  # validate / test / predict of a checkpoint, a resumed fit
            grid.add_row("checkpoint", shown(self.checkpoint))
        if log_dir is not None:
            grid.add_row("run folder", shown(log_dir))
        for logger in trainer.loggers:
            run = getattr(logger, "_experiment", None)
            if type(logger).__name__.endswith("WandbLogger") and run is not None:
                folder = shown(Path(run.dir).parent)  # absolute (SamflowWandbLogger)
                mode = os.environ.get("WANDB_MODE", "online")
                if mode == "disabled":  # W&B's stand-in run writes no folder
                    grid.add_row("W&B", "disabled (WANDB_MODE=disabled): nothing is logged to W&B")
                    continue
                where = (
                    f"upload: wandb sync {_offline_parts(Path(run.dir).parent)}"
                    if mode == "offline"
                    else folder
                )
                grid.add_row("W&B", f"{mode} run {getattr(run, 'name', '')} ({where})")
        return grid


def _offline_parts(folder: Path) -> str:
    """The offline run folder to upload, or, where earlier offline runs of its id lie beside it (a
    resumed fit, a ``test`` of the run), the pattern of them all: ``wandb sync`` uploads them in order
    as one run, skipping those uploaded already."""
    run_id = folder.name.rsplit("-", 1)[-1]
    if len(list(folder.parent.glob(f"offline-run-*-{run_id}"))) > 1:
        return f"{shown(folder.parent)}/offline-run-*-{run_id}"
    return shown(folder)


def shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it is inside it, else absolute (shorter to read
    and copy)."""
    full = Path(path).expanduser().absolute()
    try:
        return str(full.relative_to(Path.cwd()))
    except ValueError:
        return str(full)


def data_sizes(trainer: Trainer) -> dict[str, int]:
    """Images per dataset of the data module (``datasets`` of ``SegmentationDataModule``), if known."""
    datamodule = getattr(trainer, "datamodule", None)
    datasets = getattr(datamodule, "datasets", None) or {}
    sizes = {}
    for name, dataset in datasets.items():
        try:
            sizes[str(name)] = len(dataset)
        except TypeError:
            continue
    return sizes
