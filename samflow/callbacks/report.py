"""Validation metrics before and after training, and the test metrics' tables."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from samflow.callbacks.resume import before_training
from samflow.console import console, local_log_dir, show
from samflow.console import table as rich_table


class ImprovementReport(Callback):
    """Validation metrics before training (the sanity check) and after it.

    - before training: logged as ``before/<metric>`` (``before/val/iou``) to every logger, so they are in
      ``metrics.csv`` (at step 0) and in the W&B summary;
    - after training: printed with the before-values as an aligned table and saved as
      ``val_before_after.json``.

    The before-numbers cover the whole validation set when ``trainer.num_sanity_val_steps`` is -1.
    """

    @override
    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = getattr(pl_module, "initial_val_metrics", {})
        # a fit resumed at an epoch end repeats the sanity check (on trained weights); its run logged these
        if not (trainer.is_global_zero and before and before_training(trainer)):
            return
        values = {f"before/{key}": float(value) for key, value in before.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(values)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        log_dir = local_log_dir(trainer)
        before = getattr(pl_module, "initial_val_metrics", {})
        after = getattr(pl_module, "last_val_metrics", {})
        if not after:
            return
        show(self.table(before, after), result=True)
        if log_dir is not None:
            path = Path(log_dir) / "val_before_after.json"
            path.write_text(json.dumps({"before": before, "after": after}, indent=2))

    @staticmethod
    def table(before: Mapping[str, float], after: Mapping[str, float]) -> Any:
        """The rich table ``metric | before | after``."""
        rows = [
            (key, "n/a" if before.get(key) is None else float(before[key]), float(v))
            for key, v in after.items()
        ]
        return rich_table("Validation before and after training", ["metric", "before", "after"], rows)


class TestReport(Callback):
    """Write the test metrics to the run folder as JSON, and as a table per dataset (Markdown and CSV).

    - ``test_metrics.json``: the metrics as logged (``{"test/iou/COD10K": 0.8, ...}``);
    - ``test_metrics.md``: a Markdown table, one row per test dataset, one column per metric;
    - ``test_metrics.csv``: the same table (``dataset,<metric>,...``), full precision.

    With several test sets (``data.test_sets``) the metric keys carry the dataset name
    (``test/<metric>/<dataset>``) and the rows follow the data module's ``test_names``. With one set the
    keys are ``test/<metric>`` and the row is named after its only entry of ``test_names`` (``test``
    when the data module has none). The Markdown table is also printed.

    Args:
        digits: decimals shown in the Markdown table.
        columns: metric order of the tables (e.g. ``[s_measure, em_mean, weighted_f, mae_sod]``, a
            paper's column order); metrics not listed follow in the order they were computed. A name
            that was not computed is left out with one warning line printed below the table.
    """

    def __init__(self, digits: int = 4, columns: list[str] | None = None) -> None:
        self.digits = digits
        self.columns = list(columns or [])

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        results = getattr(pl_module, "test_results", {})
        if not (trainer.is_global_zero and results and log_dir is not None):
            return
        datamodule = getattr(trainer, "datamodule", None)  # Lightning sets it at run time; not declared
        names = list(getattr(datamodule, "test_names", None) or []) if datamodule else []
        self.write(results, Path(log_dir), names)

    def write(self, results: dict[str, float], folder: Path, names: Sequence[str] = ()) -> dict[str, Path]:
        """Write ``test_metrics.{json,md,csv}`` into ``folder``; returns their paths by suffix."""
        folder.mkdir(parents=True, exist_ok=True)
        rows, found = self.table(results, names)
        columns = [c for c in self.columns if c in found] + [c for c in found if c not in self.columns]
        paths = {suffix: folder / f"test_metrics.{suffix}" for suffix in ("json", "md", "csv")}
        paths["json"].write_text(json.dumps(results, indent=2))
        markdown = self.markdown(rows, columns, self.digits)
        paths["md"].write_text(markdown)
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["dataset", *columns])
            for dataset, values in rows.items():
                writer.writerow([dataset, *(repr(values[c]) if c in values else "" for c in columns)])
        printed = [[dataset, *(values.get(c, "") for c in columns)] for dataset, values in rows.items()]
        show(rich_table("Test metrics per dataset", ["dataset", *columns], printed), result=True)
        unknown = [c for c in self.columns if c not in found]
        if unknown:
            console().print(  # one line, never wrapped
                f"samflow: warning: test_report.columns names {', '.join(unknown)}, not computed in this "
                f"test (left out); the computed metrics are {', '.join(found)}.",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        return paths

    @staticmethod
    def table(
        results: dict[str, float], names: Sequence[str] = (), stage: str = "test"
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """``{stage/metric[/dataset]: value}`` -> rows ``{dataset: {metric: value}}`` and the column order.

        Rows are ordered as ``names`` (the data module's ``test_names``), then any other dataset in the
        order met; columns in the order met. A key without a dataset part belongs to the only name in
        ``names``, or to a row called ``stage``.
        """
        single = names[0] if len(names) == 1 else stage
        found: dict[str, dict[str, float]] = {}
        columns: list[str] = []
        for key, value in results.items():
            parts = key.split("/", 2)
            if parts[0] != stage or len(parts) < 2:
                continue
            metric, dataset = parts[1], parts[2] if len(parts) == 3 else single
            found.setdefault(dataset, {})[metric] = float(value)
            if metric not in columns:
                columns.append(metric)
        order = [n for n in names if n in found] + [n for n in found if n not in names]
        return {dataset: found[dataset] for dataset in order}, columns

    @staticmethod
    def markdown(rows: dict[str, dict[str, float]], columns: Sequence[str], digits: int = 4) -> str:
        """A Markdown table: a ``dataset`` column, then one right-aligned column per metric."""
        lines = [
            "| " + " | ".join(["dataset", *columns]) + " |",
            "|" + "|".join([" --- ", *(" ---: " for _ in columns)]) + "|",
        ]
        for dataset, values in rows.items():
            cells = [f"{values[c]:.{digits}f}" if c in values else "" for c in columns]
            lines.append("| " + " | ".join([dataset, *cells]) + " |")
        return "\n".join(lines) + "\n"
