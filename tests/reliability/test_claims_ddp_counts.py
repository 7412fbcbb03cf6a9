"""README, "Several GPUs or nodes", counted image by image on 2 CPU ranks (a callback records the ids of
each batch that each process evaluates or predicts):

- ``limit_val_batches`` counts batches per process: 2 batches of 1 image on each of 2 processes are 4
  images, each process taking the first of its own contiguous part of the set;
- ``samflow predict`` writes each image once: every image is predicted by exactly one process (no
  image repeated to even the parts out), and each gets its mask.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import run_samflow_commands

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]

RECORDER = '''
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordIds(Callback):
    """Append the ids of every evaluated or predicted batch to <folder>/<stage>-<rank>.txt (also used by
    test_claims_ddp_test_command.py)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _record(self, trainer, stage, batch):
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{stage}-{trainer.global_rank}.txt").open("a") as f:
            f.write(" ".join(batch.id) + "\\n")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, "validate", batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, "test", batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._record(trainer, "predict", batch)
'''


def command(work: Path, name: str, stage: str, *args: str) -> list[str]:
    """``samflow STAGE`` of the quickstart (5 validation images, batches of 1) on 2 processes, recording
    the ids of its batches in ``work/<name>/ids``."""
    data = [
        "--data.init_args.quickstart.root", str(work / "data"),
        "--data.init_args.quickstart.n_train", "2",
        "--data.init_args.quickstart.n_val", "5",
        "--data.init_args.eval_batch_size", "1",
    ]  # fmt: skip
    callback = f"[{{class_path: recorder.RecordIds, init_args: {{folder: {work / name / 'ids'}}}}}]"
    return [stage, "--experiment", "quickstart", *data, *DDP, "--trainer.callbacks", callback, *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Both commands, run once for the module in one Python process (the imports paid once);
    ``work/<name>`` holds each one's run folder and ids."""
    work = tmp_path_factory.mktemp("ddp_counts")
    (work / "recorder.py").write_text(RECORDER)  # beside the commands' script: importable by both ranks
    images = work / "data" / "val" / "images"
    plan = {
        "validate": command(work, "validate", "validate", "--trainer.limit_val_batches", "2"),
        "predict": command(
            work, "predict", "predict", "--data.init_args.predict", str(images),
            "--predictions.output_dir", str(work / "out"),
        ),
    }  # fmt: skip
    run_samflow_commands(work, plan)
    return work


def batches(work: Path, name: str, stage: str, rank: int) -> list[list[str]]:
    path = work / name / "ids" / f"{stage}-{rank}.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_limit_val_batches_counts_batches_per_process(work):
    # 5 images on 2 processes: [0, 1, 2] and [3, 4]; 2 batches each
    assert batches(work, "validate", "validate", 0) == [["val_0000"], ["val_0001"]]
    assert batches(work, "validate", "validate", 1) == [["val_0003"], ["val_0004"]]


def test_predict_writes_each_image_once(work):
    images = work / "data" / "val" / "images"
    stems = sorted(p.stem for p in images.iterdir())
    assert len(stems) == 5  # an odd count: a padding sampler would repeat one
    seen = Counter(i for rank in (0, 1) for batch in batches(work, "predict", "predict", rank) for i in batch)
    assert seen == Counter(stems), seen  # each image predicted once, by one process
    assert all(batches(work, "predict", "predict", rank) for rank in (0, 1))  # both processes took part
    assert sorted(p.stem for p in (work / "out").glob("*.png")) == stems
