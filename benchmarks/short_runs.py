"""Validation IoU of the quickstart after short and full runs, against its frozen start.

Runs ``samflow fit --experiment quickstart`` (plus any overrides after ``--``) for the largest epoch
count asked and reads the validation IoU after every epoch from the run's ``metrics.csv`` and the
frozen start from ``val_before_after.json``. With no learning-rate scheduler the IoU after epoch k of
that run is the IoU of a k-epoch run (same seed, same batches); ``--separate`` runs each epoch count on
its own instead (needed with a scheduler, which depends on ``max_epochs``).

    python benchmarks/short_runs.py --epochs 1 2 5 20                       # the quickstart as it is
    python benchmarks/short_runs.py --epochs 1 2 5 20 -- --model.losses '{bce: 1.0, dice: 1.0}'
    python benchmarks/short_runs.py --run runs/quickstart/version_3 --epochs 1 2 5 20  # read a finished run

Prints one row per epoch count (IoU, Dice, IoU minus the start) and the lowest IoU of any epoch, and
exits 1 if any IoU asked for is below the start. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def read_run(run: Path) -> dict:
    """``{"start": {...}, "epochs": [{epoch, val/iou, val/dice, ...}, ...]}`` of a finished fit's folder."""
    before_after = json.loads((run / "val_before_after.json").read_text())
    with (run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/iou")]
    epochs = [
        {"epoch": int(r["epoch"]) + 1, **{k: float(v) for k, v in r.items() if k.startswith("val/") and v}}
        for r in sorted(rows, key=lambda r: int(r["epoch"]))
    ]
    return {"run": str(run), "start": before_after["before"], "epochs": epochs}


def fit(epochs: int, overrides: list[str], workdir: Path) -> Path:
    """One quickstart fit of ``epochs`` epochs in ``workdir``; returns its run folder."""
    command = [sys.executable, "-m", "samflow", "fit", "--experiment", "quickstart"]
    command += ["--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false", *overrides]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)
    return max(workdir.rglob("val_before_after.json"), key=lambda p: p.stat().st_mtime).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 5, 20])
    parser.add_argument("--separate", action="store_true", help="one fit per epoch count")
    parser.add_argument("--run", type=Path, help="read this finished run folder instead of fitting")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", help="samflow fit flags, after --")
    args = parser.parse_args(argv)

    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="short_runs-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.run:
            runs = {max(args.epochs): read_run(args.run)}
        elif args.separate:
            runs = {n: read_run(fit(n, args.overrides, workdir / f"epochs_{n}")) for n in args.epochs}
        else:
            runs = {max(args.epochs): read_run(fit(max(args.epochs), args.overrides, workdir))}
    for n in args.epochs:
        run = runs.get(n) or runs[max(runs)]
        if len(run["epochs"]) < n:
            print(f"{run['run']} has {len(run['epochs'])} epochs, fewer than {n}", file=sys.stderr)
            return 1
        results[n] = {"start": run["start"], **run["epochs"][n - 1]}

    start = results[args.epochs[0]]["start"]["val/iou"]
    lowest = min(e["val/iou"] for run in runs.values() for e in run["epochs"])
    print(f"\nfrozen start: val/iou {start:.4f}, val/dice {results[args.epochs[0]]['start']['val/dice']:.4f}")
    print(f"{'epochs':>6} {'val/iou':>8} {'val/dice':>8} {'iou - start':>11}")
    for n, row in results.items():
        print(f"{n:>6} {row['val/iou']:>8.4f} {row['val/dice']:>8.4f} {row['val/iou'] - start:>+11.4f}")
    print(f"lowest val/iou of any epoch: {lowest:.4f}")
    if args.json:
        args.json.write_text(
            json.dumps({"overrides": args.overrides, "results": results, "lowest": lowest}, indent=2)
        )
    return 1 if any(row["val/iou"] < row["start"]["val/iou"] for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
