"""CocoMaskAP under DDP: two gloo processes on the CPU, each with half the images, get the AP of all."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("pycocotools")
from test_coco_ap import _data
from test_coco_ap_crowd import crowd_images, samflow_ap

from samflow.instance import CocoMaskAP


def _update(metric, images):
    for gts, preds in images:
        metric.update(
            [
                (
                    torch.as_tensor(np.stack([p[0] for p in preds])).bool(),
                    torch.tensor([p[1] for p in preds]),
                    torch.tensor([p[2] for p in preds]),
                )
            ],
            [
                {
                    "masks": torch.as_tensor(np.stack([g[0] for g in gts])),
                    "labels": torch.tensor([g[1] for g in gts]),
                }
            ],
        )


def _worker(rank, port, out_dir, uneven=False):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    _, _, images = _data()
    metric = CocoMaskAP()
    _update(metric, (images[:3] if rank == 0 else images[3:]) if uneven else images[rank::2])
    res = metric.compute()
    torch.save({k: v.item() for k, v in res.items()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("uneven", [False, True], ids=["halves", "3_and_1_images"])
def test_ddp_equals_single_process(tmp_path, uneven):
    """Also with unequal shards (EvalShardSampler's unpadded parts): torchmetrics' own sync would hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), uneven), nprocs=2, join=True)
    _, _, images = _data()
    single = CocoMaskAP()
    _update(single, images)
    want = {k: v.item() for k, v in single.compute().items()}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got == pytest.approx(want, abs=1e-9)
    half = CocoMaskAP()
    _update(half, images[0::2])
    assert half.compute()["ap"].item() != pytest.approx(want["ap"])  # the gather mattered


def _crowd_worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images = crowd_images()
    torch.save(samflow_ap(images[:3] if rank == 0 else images[3:]), os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gathers_crowds_and_images_without_ground_truth(tmp_path):
    """3 and 2 images, crowd flags and an image without ground truth among them: the AP of all five."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_crowd_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    want = samflow_ap(crowd_images())
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt") == pytest.approx(want, abs=1e-9)
