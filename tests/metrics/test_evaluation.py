"""What ``SamflowModule``'s evaluation feeds the metrics: each prompt row against its own target."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from samflow.data.coco_batch import CocoBatch
from samflow.evaluation import row_targets
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.tokens import ExtraTokens


class Oracle(ExtraTokens):
    """Predicts each row's own training target (``row_mask``) as +-50 logits at 1/4 resolution."""

    def select(self, out, ctx):
        target = ctx.batch.row_mask
        small = torch.nn.functional.interpolate(target, size=out.masks["sam"].shape[-2:], mode="nearest")
        return (small * 2 - 1) * 50


def two_instance_batch() -> CocoBatch:
    """One 128 x 128 image with two disjoint 32 x 64 instances (aligned to the 4 x 4 output cells), one
    prompt row each, as ``collate_coco`` batches them: ``gt_original`` is their union."""
    image = random_batch(1)
    instances = torch.zeros(2, 1, 128, 128)
    instances[0, :, 32:64, 16:80] = 1
    instances[1, :, 80:112, 48:112] = 1
    union = instances.amax(0, keepdim=True)
    return CocoBatch(
        image=image.image,
        input_size=image.input_size,
        original_size=image.original_size,
        mask=union,
        gt_original=[union[0, 0].bool()],
        id=["img0"],
        path=["img0.png"],
        image_index=torch.tensor([0, 0]),
        box=torch.tensor([[16.0, 32.0, 79.0, 63.0], [48.0, 80.0, 111.0, 111.0]]),
        instance_mask=instances,
        instance_masks=[instances[:, 0].bool()],
        classes=torch.tensor([0, 0]),
    )


def test_each_coco_row_is_scored_against_its_own_instance():
    """A model that predicts every instance (``row_mask``, what the loss trains on) scores as it would
    on one instance per image: IoU 2044 / 2048 per row (bilinear upsampling loses the 4 corners, see
    ``test_module.test_validation_metrics_on_a_known_case``), not its IoU with the union of the
    image's instances (about one half)."""
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"o": Oracle()}, metrics=["iou", "dice"])
    with torch.no_grad():
        module._evaluate("val", two_instance_batch(), 0)
    values = {k: float(v) for k, v in module._metric_set("val", 0).compute().items()}
    assert values["iou"] == pytest.approx(2044 / 2048, abs=1e-9)
    assert values["dice"] == pytest.approx(2 * 2044 / (2044 + 2048), abs=1e-9)


def test_rows_that_do_not_match_the_instances_are_refused():
    batch = two_instance_batch()
    assert [t.sum().item() for t in row_targets(batch, batch.image_index)] == [2048, 2048]
    with pytest.raises(ValueError, match=r"\[1\] prompt row\(s\) per image but \[2\] instance mask"):
        row_targets(batch, batch.image_index[:1])


def _coco_validation(annotations: str, rank: int | None, out: dict) -> None:
    """Validate the tiny COCO set as ``SamflowModule`` does (batches of 1, each image's instances as
    rows); ``rank`` of 2 (``EvalShardSampler``'s part) or None for one process. Fills ``out`` with
    what ``_finish`` logs (metrics and loss)."""
    from types import SimpleNamespace

    from samflow.data.coco import CocoDataModule

    data = CocoDataModule(val={"annotations": annotations}, img_size=128, batch_size=1)
    if rank is not None:
        data.trainer = SimpleNamespace(  # type: ignore[assignment]
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
        )
    module = SamflowModule(sam=SamSpec(variant="tiny"), metrics=["iou", "dice", "ber", "slide_dice"])
    module.log_dict = lambda values, **_: out.update(values)  # type: ignore[method-assign]
    with torch.no_grad():
        for batch in data.val_dataloader():
            module._evaluate("val", batch, 0)
    module._finish("val")


def _coco_worker(rank: int, port: int, annotations: str, folder: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out: dict = {}
    _coco_validation(annotations, rank, out)
    torch.save(out, os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def test_coco_validation_on_two_ranks_equals_one_process(tmp_path):
    """3 images of 3 instances each on 2 gloo ranks (2 + 1 images): the per-instance metrics and the
    loss, reduced over the ranks, equal one process's."""
    import socket
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    pytest.importorskip("pycocotools")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
    from tiny_coco import make_tiny_coco

    annotations, _ = make_tiny_coco(tmp_path / "coco")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_coco_worker, args=(port, str(annotations), str(tmp_path)), nprocs=2, join=True)
    one: dict = {}
    _coco_validation(str(annotations), None, one)
    assert set(one) == {"val/iou", "val/dice", "val/ber", "val/slide_dice", "val/loss"}
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt") == pytest.approx(one, abs=1e-6), rank
