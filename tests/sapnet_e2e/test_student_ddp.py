"""`samflow student` under DDP (2 CPU processes, gloo): the test split is sharded without repeats and the
results of both ranks are gathered: results.json and AP equal those of one process (same weights: no
training step, the head as seeded)."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
from helpers import run_samflow

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_coco import make_overlap_coco

HEAD = (
    "{feat_channels: 16, mask_channels: 8, num_convs: 1, num_grids: [8, 6, 4], "
    "score_thr: 0.0, filter_thr: 0.0, mask_thr: 0.45}"  # the seeded head's detections, kept
)


def test_ddp_results_equal_one_process(tmp_path):
    annotations = make_overlap_coco(tmp_path / "coco", n_images=5)  # 5 images: 3 + 2 on two ranks
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        "seed_everything: 0\nmodel:\n  sam: {variant: tiny}\n  losses: {}\n"
        "  optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}\n"
        f"data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n    test: {{annotations: {annotations}}}\n    batch_size: 2\n"
        "trainer: {accelerator: cpu, max_epochs: 0, enable_progress_bar: false}\n"
    )
    runs = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        out = tmp_path / f"out{devices}"
        args = ["student", "--experiment", str(exp), "--pseudo", str(annotations), "--out", str(out)]
        args += ["--head", HEAD, "--trainer.devices", str(devices), "--trainer.strategy", strategy]
        proc = run_samflow(args, tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[devices] = (
            json.loads((out / "results.json").read_text()),
            json.loads((out / "student_metrics.json").read_text())["test"],
        )
    (one, ap1), (two, ap2) = runs[1], runs[2]
    assert one and collections.Counter(r["image_id"] for r in one) == collections.Counter(
        r["image_id"] for r in two
    )
    key = lambda r: (r["image_id"], json.dumps(r["segmentation"]))  # noqa: E731
    for a, b in zip(sorted(one, key=key), sorted(two, key=key), strict=True):
        assert a["segmentation"] == b["segmentation"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert ap1 == pytest.approx(ap2, abs=1e-6)


@pytest.mark.parametrize(
    ("env", "launching"),
    [
        ({}, True),
        ({"SLURM_PROCID": "0"}, True),  # the one task of an sbatch script
        ({"SLURM_PROCID": "1"}, False),  # srun's second task: a rank, not the user's process
        ({"RANK": "1"}, False),  # torchrun's
        ({"LOCAL_RANK": "1"}, False),  # Lightning's own launcher
        ({"NODE_RANK": "1"}, False),  # the same command started on the second node
    ],
)
def test_only_the_process_the_user_started_checks_and_clears_out(monkeypatch, env, launching):
    """``--out`` is checked, and ``--overwrite`` clears it, in one process: a DDP rank that also did would
    remove files the first is about to write, or fail on files another rank removed."""
    from samflow.student_command import _launching_process

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _launching_process() is launching
