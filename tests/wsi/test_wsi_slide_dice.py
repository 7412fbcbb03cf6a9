"""Dice per slide beside Dice per patch: the ``slide_dice`` metric by hand, under two gloo processes,
and from ``samflow test`` on SlideDataModule patches (one process and two DDP ranks)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("tiffslide")

from synthetic_slide import write_geojson, write_slide

from samflow.data.batch import collate
from samflow.data.wsi import SlideDataModule
from samflow.metrics import SlideDice
from samflow.metrics.registry import build_metrics
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.wsi_sam import WSISam


def test_slide_dice_hand_worked():
    metric = SlideDice()
    g = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    metric.update(torch.tensor([[0.9, 0.2], [0.6, 0.6]]), g, source="a")  # |P&G| 2, |P|+|G| 3+2
    metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool), source="a")  # adds 0, 0
    metric.update(
        torch.full((2, 2, 2), 0.7), torch.stack([g, g * 0]), source=["b", "c"]
    )  # b: 2/(4+2); c: 0/4
    # a: 2*2/5 = 0.8; b: 4/6; c: 0; the mean over slides; per-patch Dice would count a's empty patch as 1
    assert metric.per_slide() == pytest.approx({"a": 0.8, "b": 4 / 6, "c": 0.0})
    assert metric.compute().item() == pytest.approx((0.8 + 4 / 6 + 0.0) / 3)
    assert metric.compute().dtype == torch.float64
    empty = SlideDice()
    empty.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), source="x")
    assert empty.compute().item() == 1.0  # nothing predicted, nothing there
    assert list(build_metrics(["slide_dice"]).keys()) == ["slide_dice"]
    with pytest.raises(ValueError, match="2 patches but 1 sources"):
        SlideDice().update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool), source=["a"])


def patches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """12 random patches of 3 slides, interleaved so that every slide has patches on both ranks."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(12):
        prob = torch.rand(16, 16, generator=gen)
        gt = torch.rand(16, 16, generator=gen) > 0.6
        out.append((prob, gt, f"slide_{i % 3}.tif"))
    return out


def _metric_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metric = SlideDice()
    part = patches()[:7] if rank == 0 else patches()[7:]  # uneven parts: 7 and 5 patches
    for prob, gt, source in part:
        metric.update(prob, gt, source=source)
    value = metric.compute().item()
    per_slide = metric.per_slide()
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"value": value, "per_slide": per_slide}))
    dist.destroy_process_group()


def test_slide_dice_on_two_processes_equals_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_metric_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    # independent: sums per slide in numpy
    inter, total = {}, {}
    for prob, gt, source in patches():
        p, g = prob.numpy() > 0.5, gt.numpy()
        inter[source] = inter.get(source, 0) + int((p & g).sum())
        total[source] = total.get(source, 0) + int(p.sum() + g.sum())
    expected = {s: 2 * inter[s] / total[s] for s in inter}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["value"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
        assert got["per_slide"] == pytest.approx(expected, abs=1e-12)
    half = SlideDice()
    for prob, gt, source in patches()[:7]:
        half.update(prob, gt, source=source)
    assert half.per_slide() != pytest.approx(expected)  # the reduction mattered


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    """The synthetic slide three times under three names: twice with its tumour outline, once as a
    tumour-free slide."""
    folder = tmp_path_factory.mktemp("slides")
    slide, _ = write_slide(folder)
    normal, other = folder / "normal.tif", folder / "other.tif"
    shutil.copy(slide, normal)
    shutil.copy(slide, other)
    geojson = str(write_geojson(folder))
    return [
        {"slide": str(slide), "annotations": geojson},
        {"slide": str(normal), "annotations": None},
        {"slide": str(other), "annotations": geojson},
    ]


DATA = {"patch_size": 64, "img_size": 128, "eval_patches_per_slide": 3, "tumour_fraction": 0.67}


def test_samflow_test_reports_dice_per_patch_and_per_slide(two_slides):
    import lightning as L

    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}, metrics=["dice", "slide_dice"]
    )
    data = SlideDataModule(test=two_slides, eval_batch_size=2, **DATA)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    logged = trainer.test(module, datamodule=data, verbose=False)[0]
    # independent: each patch alone through the model, overlaps summed per slide by hand
    per_patch, inter, total = [], {}, {}
    module.eval()
    dataset = data.dataset("test")
    for i in range(len(dataset)):
        item = dataset[i]
        batch = collate([item])
        with torch.no_grad():
            out, _ = module(batch)
        p = module.probabilities(out, batch)[0].numpy() > 0.5
        g = item["gt_original"].numpy().astype(bool)
        both = int(p.sum() + g.sum())
        per_patch.append(1.0 if both == 0 else 2 * int((p & g).sum()) / both)
        inter[item["path"]] = inter.get(item["path"], 0) + int((p & g).sum())
        total[item["path"]] = total.get(item["path"], 0) + both
    slides = {s: (1.0 if total[s] == 0 else 2 * inter[s] / total[s]) for s in total}
    assert len(dataset) == 9 and len(slides) == 3
    assert len(set(per_patch)) > 1 and len(set(slides.values())) > 1  # the numbers are not all alike
    assert logged["test/dice"] == pytest.approx(np.mean(per_patch), abs=1e-6)
    assert logged["test/slide_dice"] == pytest.approx(np.mean(list(slides.values())), abs=1e-6)
    assert logged["test/slide_dice"] != pytest.approx(logged["test/dice"], abs=1e-3)
    print(f"per patch {np.mean(per_patch):.4f}, per slide {slides}")


def last_metrics(folder: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    for row in csv.DictReader((folder / "metrics.csv").open()):
        values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_samflow_test_on_two_ranks_equals_one_process(two_slides, tmp_path):
    """`samflow test --experiment wsi_sam_camelyon16` on 2 CPU DDP ranks: 9 patches of 3 slides split
    5 + 4 (the second slide's patches on both ranks), the same per-patch and per-slide Dice as one
    process."""
    from helpers import run_samflow_commands

    common = [
        "test",
        "--experiment", "wsi_sam_camelyon16",
        "--model.sam.variant", "tiny",
        "--model.sam.checkpoint", "null",
        "--data.init_args.test", json.dumps(two_slides),
        "--data.init_args.patch_size", "64",
        "--data.init_args.img_size", "128",
        "--data.init_args.eval_patches_per_slide", "3",
        "--data.init_args.num_workers", "0",
        "--data.init_args.eval_batch_size", "2",
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    ranks = {
        "one": ["--trainer.devices", "1"],
        "two": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    }
    # both commands in one Python process (the imports paid once)
    outputs = run_samflow_commands(tmp_path, {name: [*common, *devices] for name, devices in ranks.items()})
    assert "MEMBER: 2/2" in outputs["two"] and "MEMBER" not in outputs["one"]  # two ranks did run
    found = {}
    for name in ranks:
        (csv_file,) = (tmp_path / name).rglob("metrics.csv")
        found[name] = last_metrics(csv_file.parent)
    for key in ("test/dice", "test/slide_dice", "test/iou"):
        assert found["two"][key] == pytest.approx(found["one"][key], abs=1e-9), key
    assert found["one"]["test/slide_dice"] != pytest.approx(found["one"]["test/dice"], abs=1e-3)
