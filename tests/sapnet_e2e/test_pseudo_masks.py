"""`samflow pseudo-masks` on the tiny COCO set (a crowd region, an empty image, two points per instance):
the file is the module's own selection, image by image, with the original ids; every annotation of the
input is there or its absence is explained; no input is overwritten; a store of another SAM and a
batch size below one are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from test_signals import _slurm_job
from tiny_coco import make_tiny_coco

from samflow.cli import main
from samflow.commands import build_experiment
from samflow.data.coco import CocoInstances
from samflow.data.coco_batch import collate_coco
from samflow.data.errors import DataError
from samflow.proposals import write_proposals
from samflow.pseudo_masks import write_pseudo_masks
from samflow.sam import build_sam


def _experiment(root: Path, annotations: Path) -> Path:
    exp = root / "exp.yaml"
    exp.write_text(
        "model:\n  sam: {variant: tiny}\n  plugins:\n"
        "    sap: {class_path: SAPNet, init_args: {num_classes: 2, hidden: 16, num_negatives: 4}}\n"
        "  losses: {}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}}}\n    points_per_instance: 2\n"
        f"    proposals: {root / 'store'}\n"
        "trainer: {accelerator: cpu, devices: 1}\n"
    )
    return exp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny COCO set, its proposal store (the experiment's SAM: tiny, seed 0) and an untrained SAPNet."""
    root = tmp_path_factory.mktemp("pseudo")
    annotations, truth = make_tiny_coco(root / "coco")
    exp = _experiment(root, annotations)
    argv, sys.argv = sys.argv, ["samflow"]
    try:
        module, datamodule = build_experiment(str(exp), ["--data.init_args.proposals", "null"])
        write_proposals(root / "store", build_sam("tiny", seed=0), datamodule.dataset("train"), shard_size=2)
        module, datamodule = build_experiment(str(exp), [])
    finally:
        sys.argv = argv
    return root, exp, module, datamodule.dataset("train"), truth


def _decode(rle: dict) -> np.ndarray:
    return mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_the_file_is_the_modules_selection_with_the_original_ids(setup, tmp_path):
    root, _, module, dataset, truth = setup
    one = tmp_path / "one.json"
    stats = write_pseudo_masks(module, dataset, one, batch_size=1, checkpoint="x.ckpt")
    three = tmp_path / "three.json"
    write_pseudo_masks(module, dataset, three, batch_size=3, checkpoint="x.ckpt")
    assert one.read_bytes() == three.read_bytes()  # an image alone or in a batch: the same file
    written = json.loads(one.read_text())
    by_id = {a["id"]: a for a in written["annotations"]}
    assert len(by_id) == len(written["annotations"]) == 9  # each instance once, not once per point
    bags = {
        a["ann_id"]: a
        for a in json.loads((root / "store" / "proposals.json").read_text())["annotations"]
        if a["point_index"] == 0
    }
    source = json.loads(dataset.file.read_text())
    assert written["categories"] == source["categories"]
    ious = []
    for index in range(len(dataset)):  # the module's forward on each image alone
        batch = collate_coco([dataset[index]])
        module.eval()
        with torch.no_grad():
            out, ctx = module(batch)
            module.plugins.losses(out, batch, ctx)
        report = out.extras["sapnet"]
        for r in range(batch.num_rows):
            ann_id = int(batch.ann_ids[r])
            ann = by_id[ann_id]
            k = int(report.pseudo_index[r])
            original = next(a for a in source["annotations"] if a["id"] == ann_id)
            assert ann["image_id"] == original["image_id"] == batch.image_ids[0]
            assert ann["category_id"] == original["category_id"]
            assert ann["proposal_index"] == k
            assert ann["segmentation"] == bags[ann_id]["segmentation"][k]
            assert ann["score"] == bags[ann_id]["scores"][k]
            assert ann["point"] == bags[ann_id]["point"]  # the first point's
            assert ann["mps_proposal_index"] == report.mps_index[r].tolist()
            assert ann["mps_segmentation"] == [
                bags[ann_id]["segmentation"][i] for i in ann["mps_proposal_index"]
            ]
            mask = _decode(ann["segmentation"])
            ys, xs = np.nonzero(mask)
            box = (
                [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0] * 4
            )
            assert ann["bbox"] == [float(v) for v in box] and ann["area"] == float(mask.sum())
            assert ann["iscrowd"] == 0
            gt = truth[ann["image_id"]][ann_id]
            ious.append((mask & gt).sum() / (mask | gt).sum())
    assert set(by_id) == {a for image in truth.values() for a in image}
    info = written["info"]["samflow_pseudo_masks"]
    assert info["checkpoint"] == "x.ckpt" and info["proposals_key"] == dataset.proposals.key
    assert (
        info["mean_iou_with_annotations"] == pytest.approx(np.mean(ious)) == pytest.approx(stats["mean_iou"])
    )


def test_every_annotation_of_the_input_is_written_or_explained(setup, tmp_path):
    root, _, module, _, _ = setup
    source = json.loads((root / "coco" / "instances.json").read_text())
    source["annotations"] += [  # the tiny set (crowd region 99) plus an empty mask and an unknown image
        {"id": 50, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 1, 1, 1, 1]], "iscrowd": 0},
        {"id": 51, "image_id": 77, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0},
    ]
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(source))
    common = {"images": root / "coco", "img_size": 128, "points_per_instance": 2}
    write_proposals(tmp_path / "store", build_sam("tiny", seed=0), CocoInstances(annotations, **common))
    dataset = CocoInstances(annotations, **common, proposals=tmp_path / "store")
    out = tmp_path / "p.json"
    stats = write_pseudo_masks(module, dataset, out)
    written = json.loads(out.read_text())
    left = {a["id"]: a for a in written["info"]["samflow_pseudo_masks"]["left_out"]}
    assert {a["id"] for a in written["annotations"]} | set(left) == {a["id"] for a in source["annotations"]}
    assert len(written["annotations"]) == 9
    assert left == {
        99: {"id": 99, "image_id": 1, "reason": "iscrowd (data.crowd: skip)"},
        50: {"id": 50, "image_id": 2, "reason": "empty mask"},
        51: {"id": 51, "image_id": 77, "reason": "image_id 77 is not in the file's images"},
    }
    assert stats["left_out"] == 3


def test_the_input_is_never_overwritten(setup, tmp_path):
    root, _, module, _, _ = setup
    (tmp_path / "store").mkdir()  # copies of the inputs (the same bytes: the same data key)
    for source, copy in (("coco/instances.json", "instances.json"), ("store/proposals.json",) * 2):
        (tmp_path / copy).write_bytes((root / source).read_bytes())
    dataset = CocoInstances(
        tmp_path / "instances.json", root / "coco", 128, points_per_instance=2, proposals=tmp_path / "store"
    )
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"weights")
    for target in (dataset.file, dataset.proposals.file, ckpt):
        before = target.read_bytes()
        with pytest.raises(DataError, match=r"is an input of samflow pseudo-masks.*choose another --out"):
            write_pseudo_masks(module, dataset, target, checkpoint=str(ckpt))
        assert target.read_bytes() == before


def test_a_store_of_another_sam_is_refused(setup, tmp_path):
    _, exp, _, _, _ = setup
    argv, sys.argv = sys.argv, ["samflow"]
    try:
        module, datamodule = build_experiment(str(exp), ["--model.sam.seed", "1"])
    finally:
        sys.argv = argv
    with pytest.raises(DataError, match=r"proposals of another SAM checkpoint.*differs in: sam"):
        write_pseudo_masks(module, datamodule.dataset("train"), tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_cli_refuses_a_batch_size_below_one(setup, tmp_path, capsys, monkeypatch):
    _, exp, _, _, _ = setup
    monkeypatch.setattr(sys, "argv", ["samflow"])
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    for value in ("0", "-1"):
        out = tmp_path / "p.json"
        args = ["pseudo-masks", "--experiment", str(exp), "--ckpt", str(ckpt), "--out", str(out)]
        assert main([*args, "--batch-size", value]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"samflow pseudo-masks: argument --batch-size: must be an integer >= 1, got {value}" in err
        assert not out.exists()
    with pytest.raises(DataError, match=r"batch_size 0 must be >= 1"):
        write_pseudo_masks(setup[2], setup[3], tmp_path / "q.json", batch_size=0)


def test_the_requeue_signal_in_a_slurm_job_is_noted_and_the_command_goes_on(
    setup, tmp_path, monkeypatch, capsys
):
    """SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) while ``samflow pseudo-masks`` selects: held
    from the command's start, one line saying it is not requeued, the same file as without the signal,
    exit 0, ``scontrol`` never run. Before, nothing held it: its default action killed the process (here a
    stand-in handler, which must never be called, keeps the test's process alive)."""
    import signal

    import samflow.pseudo_masks as pseudo_masks
    import samflow.rebuild

    _, exp, _, _, _ = setup
    monkeypatch.setattr(sys, "argv", ["samflow"])
    monkeypatch.setattr(samflow.rebuild, "load_trained_checkpoint", lambda model, path: None)  # untrained
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"weights")
    args = ["pseudo-masks", "--experiment", str(exp), "--ckpt", str(ckpt), "--out"]
    assert main([*args, str(tmp_path / "plain.json")]) == 0  # outside SLURM, no signal
    calls = _slurm_job(tmp_path, monkeypatch)
    write = pseudo_masks.write_pseudo_masks

    def signalled(*a, **k):
        signal.raise_signal(signal.SIGUSR1)
        return write(*a, **k)

    monkeypatch.setattr(pseudo_masks, "write_pseudo_masks", signalled)
    delivered: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: delivered.append(signum))
    try:
        capsys.readouterr()
        assert main([*args, str(tmp_path / "job.json")]) == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert delivered == []  # was [SIGUSR1]: the default action, the process killed
    err = capsys.readouterr().err
    assert err == (
        "samflow: SLURM's requeue signal: `samflow pseudo-masks` is not requeued (only fit, student, embed, "
        "proposals and sweep are); it goes on until it ends or the job's time limit.\n"
    ), err
    assert (tmp_path / "job.json").read_bytes() == (tmp_path / "plain.json").read_bytes()
    assert not calls.exists()
