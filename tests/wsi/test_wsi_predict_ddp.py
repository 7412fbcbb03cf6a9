"""predict-slide on two gloo processes (CPU): the ranks split the tiles and the written mask TIFF,
GeoJSON and Dice are byte for byte those of one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("tiffslide")

from synthetic_slide import write_geojson, write_slide

from samflow.data.wsi.slide import Slide
from samflow.module import SamflowModule, SamSpec
from samflow.wsi_predict import predict_slide
from samflow.wsi_tiles import tile_chunks
from samflow_plugins.wsi_sam import WSISam

# 64 px tiles overlapping by 16 at 1 um/px on the 384 x 256 px slide; 3 tiles a batch, so the
# batches of a tile row do not divide evenly between the ranks.
OPTIONS = {"mpp": 1.0, "tile": 64, "overlap": 16, "batch_size": 3, "progress": False}


def make_module() -> SamflowModule:
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()


def _worker(rank: int, port: int, slide: str, geojson: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = predict_slide(make_module(), slide, out, annotations=geojson, **OPTIONS)
        summary = {"tiles": result.tiles, "ran": result.ran, "dice": result.dice}
        (Path(out).parent / f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_what_one_process_writes(tmp_path):
    slide, _ = write_slide(tmp_path)
    geojson = write_geojson(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "two").mkdir()
    mp.spawn(
        _worker, args=(port, str(slide), str(geojson), str(tmp_path / "two" / "out")), nprocs=2, join=True
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU kernels then sum in the same order
    try:
        one = predict_slide(make_module(), slide, tmp_path / "one", annotations=geojson, **OPTIONS)
    finally:
        torch.set_num_threads(threads)

    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    _, _, chunks = tile_chunks(Slide(slide), mpp=1.0, tile=64, overlap=16, batch_size=3, tissue_mpp=16.0)
    # batch g on rank g % 2: the tiles each rank ran, counted independently
    expected = [sum(len(c) for g, (_, c) in enumerate(chunks) if g % 2 == r) for r in (0, 1)]
    assert [r["ran"] for r in ranks] == expected and min(expected) > 0
    assert ranks[0]["tiles"] == ranks[1]["tiles"] == one.tiles == one.ran == sum(expected)
    assert ranks[0]["dice"] == ranks[1]["dice"] == one.dice  # every rank gets rank 0's Dice

    two = tmp_path / "two" / "out"
    import tifffile

    mask_one = tifffile.imread(one.mask_path)
    mask_two = tifffile.imread(two / "slide_mask.tif")
    assert 0 < (mask_one > 0).mean() < 1  # the comparison is not all-or-nothing
    np.testing.assert_array_equal(mask_two, mask_one)
    assert (two / "slide_mask.tif").read_bytes() == one.mask_path.read_bytes()
    assert (two / "slide.geojson").read_text() == one.geojson_path.read_text()
    assert json.loads((two / "slide.json").read_text())["dice"] == one.dice
    assert not list(two.glob(".*.u8"))  # scratch arrays removed


def _slow_writer(rank: int, port: int, slide: str, out: str) -> None:
    """Every process group's timeout 2 s; process 0's pyramid takes 6 s longer, as a large slide's can
    take longer than gloo's 30 minutes."""
    import time
    from datetime import timedelta

    import samflow.wsi_predict as wsi_predict

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    made, write = dist.new_group, wsi_predict.write_pyramid
    dist.new_group = lambda *args, **kwargs: made(*args, **{**kwargs, "timeout": timedelta(seconds=2)})

    def slow_write(*args, **kwargs):
        time.sleep(6)
        return write(*args, **kwargs)

    if rank == 0:
        wsi_predict.write_pyramid = slow_write
    try:
        result = predict_slide(make_module(), slide, out, **OPTIONS)
        (Path(out).parent / f"rank{rank}.json").write_text(json.dumps({"tiles": result.tiles}))
    finally:
        dist.destroy_process_group()


def test_the_other_ranks_wait_for_process_0s_files_past_the_groups_timeout(tmp_path):
    """Process 0 writes the mask pyramid and polygons while the others wait, as long as that takes: the
    wait is not bound by the process group's timeout (it was: the others' broadcast failed)."""
    slide, _ = write_slide(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_slow_writer, args=(port, str(slide), str(tmp_path / "out")), nprocs=2, join=True)
    tiles = [json.loads((tmp_path / f"rank{r}.json").read_text())["tiles"] for r in (0, 1)]
    assert tiles[0] == tiles[1] > 0 and (tmp_path / "out" / "slide_mask.tif").is_file()


def test_torchrun_command_on_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m samflow predict-slide` (gloo): one summary line, from rank 0,
    and the files of `samflow predict-slide` in one process."""
    from helpers import run_samflow, run_torchrun

    slide, _ = write_slide(tmp_path)
    geojson = write_geojson(tmp_path)
    args = [
        "predict-slide", str(slide),
        "--experiment", "wsi_sam_camelyon16",
        "--model.sam.variant", "tiny",
        "--model.sam.checkpoint", "null",
        "--tile", "128", "--overlap", "32", "--batch-size", "2",
        "--annotations", str(geojson),
    ]  # fmt: skip
    two = run_torchrun(["-m", "samflow", *args, "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_samflow([*args, "--out", "one"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if "tiles ->" in line]
    assert len(lines) == 1 and "(2 processes)" in lines[0] and "Dice" in lines[0]
    assert (
        lines[0].split("; Dice")[1]
        == next(x for x in one.stdout.splitlines() if "Dice" in x).split("; Dice")[1]
    )
    for name in ("slide_mask.tif", "slide.geojson", "slide.json"):
        assert (tmp_path / "two" / name).read_bytes() != b""
    assert (tmp_path / "two" / "slide_mask.tif").read_bytes() == (
        tmp_path / "one" / "slide_mask.tif"
    ).read_bytes()
    assert (tmp_path / "two" / "slide.geojson").read_text() == (
        tmp_path / "one" / "slide.geojson"
    ).read_text()
