"""A quickstart fit as a user runs it: samflow's lines first, no third-party noise, the report and pictures."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import run_samflow, short_run
from PIL import Image

from samflow.callbacks.run_report import SECTIONS
from samflow.callbacks.sample_drawing import BASE_PANELS, STRIP

NOISE = (
    "litlogger",
    "💡 Tip",
    "Total FLOPs",
    "LeafSpec",
    "_pytree",
    "anonymous setting has no effect",
    "git root",
    "v_num",
    "Tracking run with wandb",
    "weights_only",
)

ARGS = ["fit", "--experiment", "quickstart", *short_run(train=2, val=2, sanity=2)]


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """One quickstart fit, W&B offline into the test folder, Python's default warning filters."""
    cwd = tmp_path_factory.mktemp("console")
    data = ["--data.init_args.quickstart.root", str(cwd / "data"), "--data.init_args.quickstart.n_train", "8"]
    args = [*ARGS, *data, "--data.init_args.quickstart.n_val", "8"]
    proc = run_samflow(args, cwd, env={"WANDB_MODE": "offline", "PYTHONWARNINGS": "", "COLUMNS": "100"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd / "runs" / "quickstart" / "version_0"


def test_console_has_samflow_lines_first_and_no_noise(fit):
    proc, _ = fit
    out = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in out, noise
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["samflow", "fit", "quickstart"]
    header = "\n".join(lines[:12])
    assert "tiny (random weights, no checkpoint)" in header
    assert "decoder: DecoderTuning, 158,268 trainable" in header  # the counts the plugin stack owns
    assert "tokens: ExtraTokens, 8,904 trainable" in header
    assert "train: 8 images" in header and "val: 8 images" in header
    assert "run folder  runs/quickstart/version_0" in header
    bar = next(i for i, line in enumerate(lines) if line.startswith("Epoch 0/0"))
    assert "run folder" in "\n".join(lines[:bar])  # before the progress bar
    shown = " ".join(" ".join(lines[bar : bar + 3]).split())  # the bar may wrap
    assert "version: version_0" in shown and "val/iou:" in shown
    # a real warning of this configuration (2 batches, a logging interval of 5 steps) still shows
    assert "smaller than the logging interval" in proc.stderr
    table = lines[lines.index("Validation before and after training:") + 1 :][:5]
    assert [line.split()[:1] for line in table[2:5]] == [["val/dice"], ["val/iou"], ["val/mae"]]
    widths = {len(line.rstrip()) for line in table[2:5]}
    assert len(widths) == 1  # aligned columns


def test_before_metrics_in_metrics_csv(fit):
    _, run = fit
    before = json.loads((run / "val_before_after.json").read_text())["before"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {
        k[len("before/") :]: float(v) for row in rows for k, v in row.items() if k.startswith("before/") and v
    }
    assert logged == pytest.approx(before) and set(logged) == {"val/iou", "val/dice", "val/mae"}


def test_report_and_pictures_exist(fit):
    _, run = fit
    markdown = (run / "report.md").read_text()
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == list(SECTIONS)
    for name in ("report/loss.png", "report/metrics.png", "samples/val_best.png", "samples/val_worst.png"):
        assert f"]({name})" in markdown and (run / name).is_file()
    assert (run / "report.html").read_text().count("<img ") == 5
    grid = Image.open(run / "samples" / "val_epoch000.png")
    assert grid.size == (len(BASE_PANELS) * 128, STRIP + 8 * (STRIP + 128))  # 8 samples, 4 panels
    best = Image.open(run / "samples" / "val_best.png")
    assert best.size == (len(BASE_PANELS) * 128, STRIP + 4 * (STRIP + 128))  # num_extremes 4
    assert list((run.parent.parent / "wandb").glob("offline-run-*/run-*.wandb"))  # the W&B run was written
