"""Training and evaluation from an embedding store on 2 DDP processes (torchrun, Gloo, CPU).

One store (``samflow embed``, batches of 2) of 8 train and 3 validation images serves every run; the
tiny SAM with HQ-SAM, whose early encoder block the store holds too, trains 4 SGD steps without
augmentation, at batch 2 on each of 2 ranks:

- ``samflow fit`` reading the store equals ``samflow fit`` with the live encoder whose outputs are
  rounded to float16, as the store holds them: the same logged losses and the same HQ-SAM weights in
  the checkpoint (the checkpoint holds the trained plugins only). samflow has no switch for that
  rounding; the runs' wrapper script (``WRAPPER``) rounds ``HookedSam.run_encoder``'s outputs. Against the
  plain float32 encoder each stored value is off by up to a relative 2**-11 (float16's rounding), and
  how far that moves 4 steps depends on the model; rounded, both runs see the same inputs. They are
  equal bit for bit here: the store's rows were encoded in batches of 2, as each rank's training
  batches are, and an image's float32 output depends on its batch only through the batch size
  (tests/embed/test_embed_ddp.py). The tolerance (1e-6, float32 rounding) is only against other
  kernels: rank 1 reading its images' neighbours' rows moved rank 0's logged losses by 1.5e-3 to 8e-3
  from the second step on (``train/loss`` is rank 0's own mean; the weights hold both ranks' steps).
- ``samflow test`` from the store on 2 processes equals 1 process: 3 images, split 2 + 1 over the ranks,
  metric states and the loss summed over ranks (README, "Several GPUs or nodes": equal "up to float
  rounding"; measured equal bit for bit, the ranks add the batches' states in the one process's order).
  It equals the fit's last validation too (same checkpoint, same images).
- README, "An embedding store": with the store no rank runs the encoder; training decodes no training
  image (only each file's header), evaluation decodes its images.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import run_torchrun

from samflow.cli import main
from samflow.data.quickstart import make_quickstart_data

METRICS = ("iou", "dice", "mae", "s_measure", "weighted_f", "loss")

# `python -m samflow ARGS` that records, per rank, the image files decoded and the encoder's calls
# (record<RANK>.json in the working folder), and with SAMFLOW_TEST_ROUND_FP16 set rounds the live
# encoder's outputs to float16 as `samflow embed` stores them
WRAPPER = """
import atexit, json, os, sys
from pathlib import Path
import torch
import samflow.data.folder as folder
from samflow.cli import main
from samflow.sam.hooked import HookedSam

decoded, calls = [], []
read, run = folder.read_image_with_note, HookedSam.run_encoder

def read_image_with_note(path, *args, **kwargs):
    decoded.append(Path(path).name)
    return read(path, *args, **kwargs)

def run_encoder(self, x, ctx):
    calls.append(x.shape[0])
    embeddings, features = run(self, x, ctx)
    if os.environ.get("SAMFLOW_TEST_ROUND_FP16"):
        embeddings = embeddings.to(torch.float16).to(embeddings.dtype)
        features = {i: f.to(torch.float16).to(f.dtype) for i, f in features.items()}
    return embeddings, features

folder.read_image_with_note, HookedSam.run_encoder = read_image_with_note, run_encoder
record = Path(f"record{os.environ.get('RANK', '0')}.json")
atexit.register(lambda: record.write_text(json.dumps({"decoded": decoded, "encoder_calls": calls})))
raise SystemExit(main(sys.argv[1:]))
"""


@dataclass
class Runs:
    store_fit: Path  # working folders
    live_fit: Path
    test_two: Path
    test_one_metrics: dict[str, float]
    test_two_metrics: dict[str, float]


def torchrun(args: list[str], cwd: Path, **env: str) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    done = run_torchrun(args, cwd, **env)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def in_process(args: list[str]) -> None:
    """``samflow ARGS`` here, on one thread as the torchrun workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def version(cwd: Path) -> Path:
    return cwd / "runs" / "exp" / "version_0"


def rows(folder: Path) -> list[dict[str, float]]:
    with (folder / "metrics.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def last(folder: Path, prefix: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in rows(folder):
        values.update({k.split("/")[1]: v for k, v in row.items() if k.startswith(prefix)})
    return values


def evaluations(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("test"))


def record(cwd: Path, rank: int) -> dict:
    return json.loads((cwd / f"record{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("store_ddp")
    data = make_quickstart_data(base / "data", n_train=8, n_val=3, seed=3)
    experiment = base / "exp.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model:\n  sam: {variant: tiny}\n  plugins: {hq: {class_path: HQSam}}\n"
        "  losses: {balanced_bce: {weight: 1.0, per_image: true}, dice: 1.0}\n"
        f"  metrics: [{', '.join(METRICS[:-1])}]\n  threshold: 0.2\n"  # 0.5: every mask empty, IoU 0
        "  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.1}}\n"
        "data:\n  class_path: samflow.data.SegmentationDataModule\n  init_args:\n"
        f"    {{train: {data / 'train'}, val: {data / 'val'}, test: {data / 'val'}, img_size: 128,\n"
        "     batch_size: 2, eval_batch_size: 2, prompt: box, num_workers: 0}\n"
        "trainer: {accelerator: cpu, devices: 2, max_epochs: 2, log_every_n_steps: 1, num_sanity_val_steps: 0}\n"
    )
    store = base / "store"
    in_process(["embed", "--experiment", str(experiment), "--out", str(store), "--batch-size", "2"])
    wrapper = base / "wrapper.py"
    wrapper.write_text(WRAPPER)
    common = ["--experiment", str(experiment)]
    from_store = ["--model.sam.embedding_store", str(store)]
    torchrun([str(wrapper), "fit", *common, *from_store], base / "store_fit")
    torchrun([str(wrapper), "fit", *common], base / "live_fit", SAMFLOW_TEST_ROUND_FP16="1")
    ckpt = ["--ckpt_path", str(version(base / "store_fit") / "checkpoints" / "last.ckpt")]
    # each test writes a new folder test, test_1, ... in the checkpoint's run folder
    torchrun([str(wrapper), "test", *common, *from_store, *ckpt], base / "test_two")
    (two,) = evaluations(version(base / "store_fit"))
    in_process(["test", *common, *from_store, *ckpt, "--trainer.devices", "1"])
    (one,) = set(evaluations(version(base / "store_fit"))) - {two}
    return Runs(
        store_fit=base / "store_fit",
        live_fit=base / "live_fit",
        test_two=base / "test_two",
        test_one_metrics=last(one, "test/"),
        test_two_metrics=last(two, "test/"),
    )


def test_fit_from_the_store_equals_the_live_encoder_rounded_to_float16(runs):
    store, live = rows(version(runs.store_fit)), rows(version(runs.live_fit))
    losses = [[row["train/loss"] for row in run if "train/loss" in row] for run in (store, live)]
    assert len(losses[0]) == 4  # 2 epochs of 2 steps, each logged
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for key in ("train/loss/hq/point_bce", "val/loss", "val/mae"):
        ours, theirs = ([row[key] for row in run if key in row] for run in (store, live))
        assert len(ours) == (4 if key.startswith("train") else 2), key
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=key)
    val_losses = [row["val/loss"] for row in store if "val/loss" in row]
    # the same images in both validations: the second epoch's steps moved the weights
    assert abs(val_losses[1] - val_losses[0]) > 1e-2

    def state(cwd: Path) -> dict[str, torch.Tensor]:
        ckpt = version(cwd) / "checkpoints" / "last.ckpt"
        return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]

    ours, theirs = state(runs.store_fit), state(runs.live_fit)
    assert ours.keys() == theirs.keys() and all(k.startswith("model.plugins.hq.") for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_test_from_the_store_on_two_processes_equals_one(runs):
    two, one = runs.test_two_metrics, runs.test_one_metrics
    assert set(two) == set(one) == set(METRICS)
    assert two["iou"] > 0 and two["dice"] > 0  # the threshold leaves some foreground
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), (key, two[key], one[key])
    # the fit's last validation: the same weights (last.ckpt) on the same 3 images, 2 processes
    val = last(version(runs.store_fit), "val/")
    for key in METRICS:
        assert val[key] == pytest.approx(two[key], rel=1e-6, abs=1e-9), (key, val[key], two[key])


def test_no_rank_runs_the_encoder_or_decodes_a_training_image(runs):
    val = {"val_0000.png", "val_0001.png", "val_0002.png"}
    for cwd in (runs.store_fit, runs.test_two):
        records = [record(cwd, rank) for rank in (0, 1)]
        assert [r["encoder_calls"] for r in records] == [[], []], cwd.name
        decoded = [set(r["decoded"]) for r in records]
        # evaluation images, contiguous shards of 2 + 1: decoded where evaluated, nothing else
        assert decoded == [{"val_0000.png", "val_0001.png"}, {"val_0002.png"}], (cwd.name, decoded)
    # the live run decodes and encodes all 8 training images on its ranks, 4 each an epoch
    live = [record(runs.live_fit, rank) for rank in (0, 1)]
    assert set().union(*(set(r["decoded"]) for r in live)) == val | {f"train_{i:04d}.png" for i in range(8)}
    assert [sum(r["encoder_calls"]) for r in live] == [2 * (4 + 2), 2 * (4 + 1)]  # 2 epochs of 4 + validation
