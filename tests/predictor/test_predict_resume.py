"""``samflow predict --predictions.resume true`` continues a killed run.

A run killed at 90% of a large set is continued, not started again: the images whose files are all in
the predictions folder are left out before the model sees them (no forward for a finished image, on one
process and on each DDP process), the others are predicted, and the folder ends byte for byte as an
uninterrupted run's. A killed run is simulated by deleting some outputs (one image keeps its mask but
loses its probability PNG) and leaving a ``.partial``. Every run, with the option or without it, writes
``samflow_predict.json``, the record of what made the masks, so a killed plain run is continued too; a
continued run with another checkpoint, threshold or ``save_probabilities`` is refused in one line naming
what differs, so two models' masks are never mixed; so is a folder of masks without the record, and
``--predictions.resume`` with ``--predictions.overwrite``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import samflow_here, short_run
from PIL import Image
from torch.utils.data import DataLoader

from samflow.callbacks import MaskWriter
from samflow.callbacks.mask_writer import PredictionOutputError
from samflow.data.listing import find_samples

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]

RECORDER = '''
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class RecordIds(Callback):
    """Append the ids of every batch given to predict_step (before the forward) to <folder>/<rank>.txt."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{trainer.global_rank}.txt").open("a") as f:
            f.write(" ".join(batch.id) + "\\n")
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("predict_resume")
    (work / "recorder.py").write_text(RECORDER)
    return work


def predict(work: Path, out: Path, *args: str, ids: str = "ids", ok: bool = True):
    """``samflow predict`` of the quickstart's 5 val images (batches of 2) into ``out``, with
    probabilities; the ids each process predicts go to ``work/<ids>/<rank>.txt``."""
    callback = f"[{{class_path: recorder.RecordIds, init_args: {{folder: {work / ids}}}}}]"
    data = [
        "--data.init_args.quickstart.root", str(work / "data"),
        "--data.init_args.quickstart.n_train", "2", "--data.init_args.quickstart.n_val", "5",
        "--data.init_args.eval_batch_size", "2",
        "--data.init_args.predict", str(work / "data" / "val" / "images"),
    ]  # fmt: skip
    outputs = ["--predictions.output_dir", str(out), "--predictions.save_probabilities", "true"]
    command = ["predict", "--experiment", "quickstart", *data, *outputs, "--trainer.callbacks", callback]
    proc = samflow_here([*command, *args], work, pythonpath=work)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def predicted(work: Path, ids: str) -> list[str]:
    """The ids given to predict_step, over all processes."""
    return sorted(i for f in sorted((work / ids).glob("*.txt")) for i in f.read_text().split())


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def uninterrupted(work) -> dict[str, bytes]:
    """The files of a plain run (no ``--predictions.resume``): 5 masks and 5 probability PNGs."""
    predict(work, work / "plain")
    files = pngs(work / "plain")
    assert len(files) == 10
    return files


def kill(out: Path) -> set[str]:
    """What a run killed in its last batches leaves: val_0003 without files, val_0001 with its mask but
    no probability PNG, a ``.partial`` of val_0004; returns the images left to predict."""
    (out / "val_0003.png").unlink()
    (out / "val_0003_prob.png").unlink()
    (out / "val_0001_prob.png").unlink()
    (out / "val_0004.png").rename(out / "val_0004.png.partial")
    return {"val_0001", "val_0003", "val_0004"}


def test_a_continued_run_predicts_only_the_images_left_and_equals_an_uninterrupted_run(work, uninterrupted):
    out = work / "resumed"
    predict(work, out, "--predictions.resume", "true", ids="ids_first")
    assert predicted(work, "ids_first") == sorted(p[:-4] for p in uninterrupted if "_prob" not in p)
    assert json.loads((out / "samflow_predict.json").read_text())["threshold"] == 0.5
    left = kill(out)
    predict(work, out, "--predictions.resume", "true", ids="ids_continued")
    assert predicted(work, "ids_continued") == sorted(left)  # no forward for a finished image
    assert pngs(out) == uninterrupted  # byte for byte
    assert not list(out.glob("*.partial"))
    # everything there: nothing predicted, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = predict(work, out, "--predictions.resume", "true", ids="ids_none")
    assert predicted(work, "ids_none") == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "5 of 5 images have all their files" in proc.stdout + proc.stderr


def test_a_killed_run_started_without_the_option_is_continued_with_it(work, uninterrupted):
    out = work / "plain_killed"
    shutil.copytree(work / "plain", out)  # the plain run's files, with its record
    assert json.loads((out / "samflow_predict.json").read_text())["save_probabilities"] is True
    left = kill(out)
    predict(work, out, "--predictions.resume", "true", ids="ids_plain_continued")
    assert predicted(work, "ids_plain_continued") == sorted(left)
    assert pngs(out) == uninterrupted


def test_a_continued_run_on_two_ddp_processes_predicts_each_image_left_once(work, uninterrupted):
    out = work / "resumed_ddp"
    predict(work, out, "--predictions.resume", "true", ids="ids_ddp_first")
    left = kill(out)
    predict(work, out, "--predictions.resume", "true", *DDP, ids="ids_ddp")
    assert predicted(work, "ids_ddp") == sorted(left)  # each image left once, none finished
    assert all((work / "ids_ddp" / f"{rank}.txt").read_text().split() for rank in (0, 1))  # both worked
    assert pngs(out) == uninterrupted


def test_a_continued_run_with_other_settings_is_refused_naming_what_differs(work, uninterrupted):
    out = work / "settings"
    predict(work, out, "--predictions.resume", "true", ids="ids_settings")
    kill(out)
    before = pngs(out)
    proc = predict(
        work, out, "--predictions.resume", "true", "--model.threshold", "0.6", ids="ids_refused", ok=False
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "samflow: error" in line]
    assert len(lines) == 1 and "threshold: 0.5 -> 0.6" in lines[0], proc.stderr[-2000:]
    assert predicted(work, "ids_refused") == [] and pngs(out) == before


def test_a_continued_run_with_another_checkpoint_is_refused(work):
    data = [
        "--data.init_args.quickstart.root", str(work / "data"),
        "--data.init_args.quickstart.n_train", "2", "--data.init_args.quickstart.n_val", "5",
    ]  # fmt: skip
    fit = samflow_here(
        ["fit", "--experiment", "quickstart", *data, *short_run(epochs=1, train=1, val=1, batch_size=2)], work
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    first = next((work / "runs").rglob("last.ckpt"))
    checkpoint = torch.load(first, map_location="cpu", weights_only=False)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1
    other = work / "other.ckpt"
    torch.save(checkpoint, other)
    out = work / "checkpoints"
    predict(work, out, "--predictions.resume", "true", "--ckpt_path", str(first), ids="ids_ckpt")
    kill(out)
    proc = predict(
        work, out, "--predictions.resume", "true", "--ckpt_path", str(other), ids="ids_other", ok=False
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "samflow: error" in line]
    assert len(lines) == 1 and f"checkpoint: {first}" in lines[0] and str(other) in lines[0], proc.stderr
    assert predicted(work, "ids_other") == []
    shutil.copy(first, work / "copy.ckpt")  # the same weights elsewhere: the same masks, continued
    predict(work, out, "--predictions.resume", "true", "--ckpt_path", str(work / "copy.ckpt"), ids="ids_copy")
    assert predicted(work, "ids_copy") == ["val_0001", "val_0003", "val_0004"]


# In process: the refusals before anything runs.


def make_root(root: Path, stems=("a", "b", "c")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in stems:
        Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(root / "masks" / f"{stem}.png")
    return root


class Samples(torch.utils.data.Dataset):
    def __init__(self, root: Path) -> None:
        self.samples = find_samples(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> str:
        return self.samples[index].id


def trainer_on(out: Path, world_size: int = 1) -> SimpleNamespace:
    """The parts of a Trainer that ``MaskWriter`` with ``resume`` reads."""
    return SimpleNamespace(
        log_dir=str(out.parent),
        is_global_zero=True,
        world_size=world_size,
        strategy=SimpleNamespace(broadcast=lambda value, src: value),
        ckpt_path=None,
        precision="32-true",
        datamodule=SimpleNamespace(predict_dataloader=None),
    )


def left(writer: MaskWriter, root: Path, out: Path, world_size: int = 1) -> list[str]:
    loader = writer.loader_left(
        trainer_on(out, world_size), SimpleNamespace(threshold=0.5), DataLoader(Samples(root))
    )
    return [item for batch in loader for item in batch]


def test_resume_with_overwrite_is_refused(tmp_path):
    writer = MaskWriter(output_dir=str(tmp_path / "out"), overwrite=True, resume=True)
    with pytest.raises(
        PredictionOutputError, match="--predictions.resume true .* --predictions.overwrite true"
    ):
        writer.setup(trainer_on(tmp_path / "out"), None, "predict")


def test_a_folder_of_a_run_without_the_record_is_refused(tmp_path):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier run's mask")
    with pytest.raises(PredictionOutputError, match=r"holds 1 of the 3 files .* no samflow_predict\.json"):
        left(MaskWriter(output_dir=str(out), resume=True), root, out)
    assert not (out / "samflow_predict.json").exists()


def test_a_plain_run_writes_its_record_before_its_first_mask_replacing_an_earlier_one(tmp_path):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    assert left(MaskWriter(output_dir=str(out), resume=True), root, out) == ["a", "b", "c"]
    assert json.loads((out / "samflow_predict.json").read_text())["threshold"] == 0.5
    plain = MaskWriter(output_dir=str(out), overwrite=True)
    trainer = trainer_on(out)
    trainer.predict_dataloaders = [SimpleNamespace(dataset=Samples(root))]
    plain.on_predict_start(trainer, SimpleNamespace(threshold=0.7))  # another model's masks follow
    assert json.loads((out / "samflow_predict.json").read_text())["threshold"] == 0.7
    # no mask yet; the run holds the folder's lock (``PREDICT_LOCK``) until it ends, and removes it then
    assert sorted(p.name for p in out.iterdir()) == [".predict.lock", "samflow_predict.json"]
    plain.teardown(trainer, None, "predict")
    assert sorted(p.name for p in out.iterdir()) == ["samflow_predict.json"]


def test_fewer_images_left_than_processes_is_refused(tmp_path):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    writer = MaskWriter(output_dir=str(out), resume=True)
    assert left(writer, root, out) == ["a", "b", "c"]
    for stem in ("a", "b"):
        (out / f"{stem}.png").write_bytes(b"whole")
    with pytest.raises(PredictionOutputError, match="1 image.* fewer than the 2 processes"):
        left(writer, root, out, world_size=2)
    assert left(writer, root, out) == ["c"]


def test_coco_instances_continued_on_two_ddp_processes_equal_an_uninterrupted_run(tmp_path):
    """COCO data: an image's files are its instances' (none for an image without instances, which is
    never predicted again); each DDP process takes a contiguous part of the images left, none when
    nothing is left."""
    pytest.importorskip("pycocotools")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
    from tiny_coco import make_tiny_coco

    coco, _ = make_tiny_coco(tmp_path / "coco")
    experiment = tmp_path / "coco.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model: {sam: {variant: tiny}, plugins: {decoder: {class_path: DecoderTuning}}}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, predict: {{annotations: {coco}}}, batch_size: 2, empty: keep}}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    (tmp_path / "recorder.py").write_text(RECORDER)

    def run(out: str, ids: str, *args: str) -> None:
        callback = f"[{{class_path: recorder.RecordIds, init_args: {{folder: {tmp_path / ids}}}}}]"
        command = [
            "predict",
            "--experiment",
            str(experiment),
            "--predictions.output_dir",
            str(tmp_path / out),
        ]
        options = ["--predictions.save_probabilities", "true", "--trainer.callbacks", callback]
        proc = samflow_here([*command, *options, *args], tmp_path, pythonpath=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    run("resumed", "ids_first", "--predictions.resume", "true")  # uninterrupted
    assert predicted(tmp_path, "ids_first") == ["1", "2", "3"]  # image 4 has no instances: no files
    out = tmp_path / "resumed"
    uninterrupted = pngs(out)
    (out / "2_5.png").unlink()
    (out / "3_8_prob.png").unlink()
    (out / "1_1.png").rename(out / "1_1.png.partial")
    run("resumed", "ids_ddp", "--predictions.resume", "true", *DDP)
    assert predicted(tmp_path, "ids_ddp") == ["1", "2", "3"]
    assert all((tmp_path / "ids_ddp" / f"{rank}.txt").is_file() for rank in (0, 1))
    assert pngs(out) == uninterrupted and len(uninterrupted) == 18
    run("resumed", "ids_none", "--predictions.resume", "true", *DDP)
    assert predicted(tmp_path, "ids_none") == []


@pytest.mark.parametrize("text", ["[]", "{not json"])
def test_a_record_that_is_not_a_json_object_is_refused_as_unreadable(tmp_path, text):
    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier run's mask")  # beside it: so the record is read
    (out / "samflow_predict.json").write_text(text)
    with pytest.raises(PredictionOutputError, match=r"samflow_predict\.json is not a readable record"):
        left(MaskWriter(output_dir=str(out), resume=True), root, out)


def test_a_folder_of_a_release_before_predicted_with_is_continued_unless_the_rest_differs(tmp_path):
    """A record written before ``predicted_with`` existed (its ``predict_data`` without the key) is read
    as that release wrote it: continued when the rest is equal; a record holding another value is not."""
    from samflow.data.prompts import BoxPrompt

    root, out = make_root(tmp_path / "data"), tmp_path / "out"
    writer = MaskWriter(output_dir=str(out), resume=True)
    trainer = trainer_on(out)
    trainer.datamodule = SimpleNamespace(
        predict_dataloader=None,
        hparams={"prompt": "box", "img_size": 1024},
        splits={"predict": str(root)},
        datasets={"predict": SimpleNamespace(prompt=BoxPrompt())},
    )
    now = writer.record(trainer, SimpleNamespace(threshold=0.5))
    assert now["predict_data"]["predicted_with"] == {"predict": repr(BoxPrompt())}

    def left_now(earlier: dict) -> list[str]:
        (out / "samflow_predict.json").write_text(json.dumps(earlier, indent=2) + "\n")
        loader = writer.loader_left(trainer, SimpleNamespace(threshold=0.5), DataLoader(Samples(root)))
        return [item for batch in loader for item in batch]

    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier run's mask")
    old = json.loads(json.dumps(now))
    del old["predict_data"]["predicted_with"]  # as the release before wrote it
    assert left_now(old) == ["b", "c"]
    with pytest.raises(PredictionOutputError, match=r"threshold: 0\.6 -> 0\.5"):
        left_now({**old, "threshold": 0.6})  # the rest still compared
    other = json.loads(json.dumps(now))
    other["predict_data"]["predicted_with"] = {"predict": "NoPrompt()"}
    with pytest.raises(
        PredictionOutputError, match=r"predict_data\.predicted_with\.predict: \"NoPrompt\(\)\""
    ):
        left_now(other)
