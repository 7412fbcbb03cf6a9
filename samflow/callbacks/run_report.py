"""The run report: ``report.md`` and ``report.html`` in the run folder at the end of fit and of test.

Sections (those with nothing to show are left out, with a line saying why where that helps):

1. the resolved configuration, summarised (the full ``config.yaml`` is linked);
2. validation before and after training;
3. loss and metric curves (``report/loss.png``, ``report/metrics.png``, drawn with matplotlib from
   ``metrics.csv``; samflow's ``report`` extra installs matplotlib);
4. the best and the worst validation images of the last validation (``samples/val_best.png``,
   ``samples/val_worst.png``, written by ``SampleGrid``) and the last sample grid;
5. the test metrics, one table per run with a row per test dataset;
6. the files: best and last checkpoint, config, metrics, predictions, exports, W&B run.

Images are referenced by paths relative to the run folder, so ``report.html`` opens from disk. With
W&B the report (both files and its images) and the best checkpoint are logged as artifacts of the run.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from samflow.callbacks.report import TestReport
from samflow.console import local_log_dir, show, shown

SECTIONS = (
    "Configuration",
    "Validation before and after training",
    "Curves",
    "Validation images",
    "Test",
    "Files",
)


class RunReport(Callback):
    """Write ``report.md`` and ``report.html`` into the run folder at the end of fit and of test.

    Args:
        experiment: the experiment's name (set by the CLI), the report's title.
        enabled: false turns the report off.
        wandb_artifacts: log the report and the best checkpoint as artifacts of the W&B run.
    """

    def __init__(self, experiment: str = "", enabled: bool = True, wandb_artifacts: bool = True) -> None:
        self.experiment = experiment
        self.enabled = enabled
        self.wandb_artifacts = wandb_artifacts

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = local_log_dir(trainer) if trainer.is_global_zero else None
        if not (self.enabled and log_dir is not None):
            return
        for logger in trainer.loggers:
            logger.save()  # metrics.csv up to date
        paths = self.write(Path(log_dir), run_facts(trainer, pl_module))
        show(f"Run report: {shown(paths['html'])}", result=True)
        if self.wandb_artifacts:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    log_artifacts(logger, paths, run_facts(trainer, pl_module).get("best_checkpoint"))

    def write(self, folder: Path, facts: Mapping[str, Any]) -> dict[str, Path]:
        """Write ``report.md``, ``report.html`` and the curve PNGs into ``folder``; returns their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        assets = folder / "report"
        assets.mkdir(exist_ok=True)
        title = f"samflow run report: {self.experiment or 'run'} / {folder.name}"
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        parts = [f"# {title}\n\n{stamp}, run folder `{folder}`\n"]
        parts.append("## Configuration\n\n" + config_section(folder / "config.yaml"))
        parts.append("## Validation before and after training\n\n" + before_after_section(facts))
        parts.append("## Curves\n\n" + curves_section(folder, assets))
        parts.append("## Validation images\n\n" + images_section(folder))
        parts.append("## Test\n\n" + test_section(facts))
        parts.append("## Files\n\n" + files_section(folder, facts))
        markdown = "\n".join(parts)
        paths = {"md": folder / "report.md", "html": folder / "report.html", "assets": assets}
        paths["md"].write_text(markdown)
        paths["html"].write_text(to_html(markdown, title))
        return paths


def run_facts(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """What the report needs from a finished run."""
    checkpoint = trainer.checkpoint_callback
    datamodule = getattr(trainer, "datamodule", None)
    wandb_dirs = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            wandb_dirs.append(str(Path(logger.experiment.dir).parent))
    return {
        "before": dict(getattr(pl_module, "initial_val_metrics", {}) or {}),
        "after": dict(getattr(pl_module, "last_val_metrics", {}) or {}),
        "test": dict(getattr(pl_module, "test_results", {}) or {}),
        "test_names": list(getattr(datamodule, "test_names", None) or []),
        "best_checkpoint": getattr(checkpoint, "best_model_path", "") or "",
        "best_score": _float(getattr(checkpoint, "best_model_score", None)),
        "monitor": getattr(checkpoint, "monitor", None),
        "last_checkpoint": getattr(checkpoint, "last_model_path", "") or "",
        "wandb": wandb_dirs,
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def md_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4, numbers: bool = True
) -> str:
    """A Markdown table; floats with ``digits`` decimals; columns after the first right-aligned when
    they hold ``numbers``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|")

    align = " ---: " if numbers else " --- "
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join([" --- ", *(align for _ in columns[1:])]) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def config_section(path: Path) -> str:
    """The configuration's main choices as a table, and a link to the full ``config.yaml``."""
    if not path.is_file():
        return "No `config.yaml` in the run folder (the run was not started by `samflow`).\n"
    config = yaml.safe_load(path.read_text()) or {}
    model = config.get("model") or {}
    data = config.get("data") or {}
    trainer = config.get("trainer") or {}
    rows: list[tuple[str, str]] = []
    sam = model.get("sam") or {}
    rows.append(("SAM", ", ".join(f"{k}: {v}" for k, v in sam.items() if v not in (None, False, 0, [], ()))))
    for key, spec in (model.get("plugins") or {}).items():
        spec = spec if isinstance(spec, dict) else {"class_path": spec}
        given = ", ".join(f"{k}: {v}" for k, v in (spec.get("init_args") or {}).items() if v is not None)
        rows.append((f"plugin `{key}`", f"{spec.get('class_path', '')}" + (f" ({given})" if given else "")))
    rows.append(("losses", _short(model.get("losses"))))
    rows.append(("metrics", _short(model.get("metrics"))))
    optimizer = model.get("optimizer") or {}
    if isinstance(optimizer, dict):
        rates = {k: v for k, v in (optimizer.get("init_args") or {}).items() if k in ("lr", "weight_decay")}
        rows.append(("optimizer", f"{optimizer.get('class_path', '')} {_short(rates)}"))
    if model.get("scheduler"):
        rows.append(("scheduler", _short(model.get("scheduler"))))
    if isinstance(data, dict):
        options = data.get("init_args") or {}
        keys = ("img_size", "batch_size", "prompt", "quickstart", "train", "val")
        rows.append(
            ("data", f"{data.get('class_path', '')} {_short({k: options[k] for k in keys if k in options})}")
        )
    chosen = ("max_epochs", "accelerator", "devices", "precision", "strategy")
    rows.append(("trainer", _short({k: trainer[k] for k in chosen if trainer.get(k) is not None})))
    if "seed_everything" in config:
        rows.append(("seed", str(config["seed_everything"])))
    return (
        md_table(["option", "value"], rows, numbers=False)
        + f"\nThe full resolved configuration: [config.yaml]({path.name})\n"
    )


def _short(value: Any, limit: int = 160) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip() if value is not None else ""
    text = text.removesuffix("...").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def before_after_section(facts: Mapping[str, Any]) -> str:
    before, after = facts.get("before") or {}, facts.get("after") or {}
    if not after and not before:
        return "No validation ran in this run.\n"
    rows = []
    for key in dict.fromkeys([*after, *before]):
        old, new = before.get(key, float("nan")), after.get(key, float("nan"))
        rows.append((key, float(old), float(new), float(new - old)))
    note = "" if before else "\nNo validation ran before training (`--trainer.num_sanity_val_steps 0`).\n"
    return md_table(["metric", "before", "after", "change"], rows) + note


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger ``metrics.csv`` as floats (empty cells left out)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: float(v) for k, v in row.items() if k and v not in ("", None)})
    return rows


def plot_curves(rows: list[dict[str, float]], assets: Path) -> dict[str, Path]:
    """``loss.png`` (training and validation losses) and ``metrics.png`` (validation metrics) by step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = {
        "loss": [k for k in _keys(rows) if k in ("train/loss", "val/loss") or k.startswith("val/loss/")],
        "metrics": [
            k for k in _keys(rows) if k.startswith("val/") and "/loss" not in k and "encoder_cache" not in k
        ],
    }
    written = {}
    for name, keys in groups.items():
        if not keys:
            continue
        figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            style = "-" if key.startswith("train/") else "o-"
            axes.plot([p[0] for p in points], [p[1] for p in points], style, label=key, markersize=4)
            before = [(r["step"], r[f"before/{key}"]) for r in rows if f"before/{key}" in r and "step" in r]
            if before:
                axes.plot(*zip(*before), "k^", markersize=6, label=f"{key} before training")
        axes.set_xlabel("step")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        written[name] = assets / f"{name}.png"
        figure.savefig(written[name])
        plt.close(figure)
    return written


def _keys(rows: list[dict[str, float]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def curves_section(folder: Path, assets: Path) -> str:
    rows = read_metrics(folder / "metrics.csv")
    if not rows:
        return "No `metrics.csv` in the run folder (add a CSVLogger to `trainer.logger`).\n"
    try:
        written = plot_curves(rows, assets)
    except ImportError:
        return "Curves need matplotlib: `pip install 'samflow[report]'`. The numbers are in `metrics.csv`.\n"
    if not written:
        return "`metrics.csv` holds no loss or validation metric yet.\n"
    return "".join(f"![{name}]({path.relative_to(folder).as_posix()})\n\n" for name, path in written.items())


def images_section(folder: Path) -> str:
    samples = folder / "samples"
    parts = []
    for name, title in (("val_best.png", "Best"), ("val_worst.png", "Worst")):
        if (samples / name).is_file():
            parts.append(
                f"**{title} validation images** (by IoU, last validation)\n\n![{title}](samples/{name})\n"
            )
    grids = sorted(samples.glob("val_epoch*.png"), key=_epoch_of) if samples.is_dir() else []
    if grids:
        parts.append(
            f"**Fixed samples, last epoch** ([all grids](samples/))\n\n![last](samples/{grids[-1].name})\n"
        )
    return "\n".join(parts) if parts else "No validation images (the `samples` callback wrote none).\n"


def _epoch_of(grid: Path) -> tuple[int, str]:
    """The epoch of ``val_epoch<NNN>.png`` (by number: ``val_epoch1000`` comes after ``val_epoch999``)."""
    digits = grid.stem.removeprefix("val_epoch")
    return (int(digits) if digits.isdigit() else -1, grid.name)


def test_section(facts: Mapping[str, Any]) -> str:
    results = facts.get("test") or {}
    if not results:
        return "No test in this run (`samflow test --experiment ... --ckpt_path ...` adds one).\n"
    rows, columns = TestReport.table(results, facts.get("test_names") or [])
    return TestReport.markdown(rows, columns)


def files_section(folder: Path, facts: Mapping[str, Any]) -> str:
    def where(path: str | Path) -> str:
        path = Path(path)
        try:
            relative = path.resolve().relative_to(folder.resolve()).as_posix()
            return f"[{relative}]({relative})"
        except ValueError:
            return f"`{path}`"

    rows: list[tuple[str, str]] = []
    if facts.get("best_checkpoint"):
        score = facts.get("best_score")
        label = f" ({facts.get('monitor')} {score:.4f})" if score is not None and facts.get("monitor") else ""
        rows.append(("best checkpoint" + label, where(facts["best_checkpoint"])))
    last = facts.get("last_checkpoint") or (folder / "checkpoints" / "last.ckpt")
    if Path(last).is_file():
        rows.append(("last checkpoint", where(last)))
    for name, label in (
        ("config.yaml", "config"),
        ("metrics.csv", "metrics"),
        ("val_before_after.json", "before/after"),
        ("test_metrics.csv", "test metrics"),
        ("predictions", "predictions"),
        ("exports", "exports"),
    ):
        if (folder / name).exists():
            rows.append((label, where(folder / name)))
    for name in (
        sorted(p.name for p in (folder / "exports").glob("*")) if (folder / "exports").is_dir() else []
    ):
        rows.append(("export", where(folder / "exports" / name)))
    for run in facts.get("wandb") or []:
        rows.append(("W&B run", f"`{run}`"))
    return md_table(["what", "path"], rows, numbers=False) if rows else "No files.\n"


def to_html(markdown: str, title: str) -> str:
    """The report as a standalone HTML page (markdown-it-py, which rich depends on)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}th,td{border:1px solid #ccc;padding:3px 8px}"
        "th{background:#f2f2f2}td:not(:first-child){font-variant-numeric:tabular-nums}"
        "img{max-width:100%;border:1px solid #ddd}code{background:#f6f6f6;padding:0 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n{body}</body></html>\n"
    )


def log_artifacts(logger: WandbLogger, paths: Mapping[str, Path], best_checkpoint: str | None) -> None:
    """The report (``report``) and the best checkpoint (``model``, alias ``best``) as W&B artifacts."""
    import wandb

    run = logger.experiment
    report = wandb.Artifact(f"report-{run.id}", type="report")
    report.add_file(str(paths["md"]))
    report.add_file(str(paths["html"]))
    for image in sorted(Path(paths["assets"]).glob("*.png")):
        report.add_file(str(image), name=f"report/{image.name}")
    samples = Path(paths["md"]).parent / "samples"
    for name in ("val_best.png", "val_worst.png"):
        if (samples / name).is_file():
            report.add_file(str(samples / name), name=f"samples/{name}")
    run.log_artifact(report)
    if best_checkpoint and Path(best_checkpoint).is_file():
        model = wandb.Artifact(f"model-{run.id}", type="model")
        model.add_file(best_checkpoint, name=Path(best_checkpoint).name)
        run.log_artifact(model, aliases=["best"])
