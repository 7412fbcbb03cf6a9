"""COCO mask AP (AP, AP50, AP75, APs/m/l) of instance predictions, DDP-safe.

torchmetrics' ``MeanAveragePrecision(iou_type="segm")`` keeps the RLE-encoded masks of every image and
gathers every process's before ``compute``, so the result under DDP is that of the whole evaluation
set; ``compute`` runs pycocotools' COCOeval on them as on a COCO file: every image given to ``update``
counts (one without ground truth too: its detections are false positives), and ground truth flagged
``iscrowd`` is a crowd region (a detection matched to it is ignored, its IoU is over the detection's
area, it is no positive). Needs the ``coco`` extra (``pip install "samflow[coco]"``, pycocotools).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from samflow.usage import require_extra

#: samflow's log names for torchmetrics' keys.
COCO_KEYS = {
    "map": "ap",
    "map_50": "ap50",
    "map_75": "ap75",
    "map_small": "ap_s",
    "map_medium": "ap_m",
    "map_large": "ap_l",
}


class CocoMaskAP(MeanAveragePrecision):
    """COCO mask AP over images; ``compute()`` returns ``ap, ap50, ap75, ap_s, ap_m, ap_l``.

    ``update(preds, targets)``: ``preds`` per image a ``(masks (N, H, W) bool, scores (N,), labels (N,))``
    tuple (the output of ``SOLOv2Head.predict``) or torchmetrics' dict with those keys; ``targets`` per
    image a dict with ``masks`` (M, H, W) and ``labels`` (M,), optionally ``iscrowd`` (M,) (1: a crowd
    region, COCO's ``iscrowd``) and ``area`` (M,) (COCO's ``area``; default the mask's). Up to
    ``max_detections`` (100) detections per image count, as COCO.
    """

    def __init__(self, max_detections: int = 100, **kwargs: Any) -> None:
        require_extra("pycocotools", "coco", "CocoMaskAP (COCO mask AP)")  # one line, when it is built
        # COCOeval's own thresholds (float64 linspace): torchmetrics' defaults come from a float32
        # torch.linspace (0.55 -> 0.550000011920929), which moves a match whose IoU equals a threshold
        # exactly (common on small masks) and makes the AP differ from pycocotools run on a results file
        kwargs.setdefault("iou_thresholds", np.linspace(0.5, 0.95, 10).tolist())
        kwargs.setdefault("rec_thresholds", np.linspace(0.0, 1.0, 101).tolist())
        super().__init__(
            iou_type="segm",
            backend="pycocotools",
            max_detection_thresholds=[1, 10, max_detections],
            **kwargs,
        )

    def update(
        self,
        preds: Sequence[tuple[Tensor, Tensor, Tensor] | Mapping[str, Tensor]],
        target: Sequence[Mapping[str, Tensor]],
    ) -> None:
        p = []
        for item in preds:
            if isinstance(item, Mapping):
                masks, scores, labels = item["masks"], item["scores"], item["labels"]
            else:
                masks, scores, labels = item
            p.append({"masks": masks.bool(), "scores": scores.float(), "labels": labels.long()})
        t = []
        for x in target:
            item = {**dict(x), "masks": x["masks"].bool(), "labels": x["labels"].long()}
            if "iscrowd" in item:
                item["iscrowd"] = item["iscrowd"].long()
            t.append(item)
        super().update(p, t)

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        """Gather every process's per-image states as objects, whatever each process's image count.

        torchmetrics' own sync gathers its per-image lists element by element (and the RLE tuples
        assuming equal lengths), so processes with different numbers of images (an unpadded
        evaluation shard, ``EvalShardSampler``) would hang or lose images. Here each process's lists
        go whole through one ``all_gather_object`` and are concatenated in rank order.
        """
        import torch.distributed as dist

        names = list(self._defaults)
        if not all(isinstance(getattr(self, n), list) for n in names):  # pragma: no cover - all are lists
            super()._sync_dist(dist_sync_fn, process_group)
            return

        def to_cpu(x: Any) -> Any:
            return x.cpu() if isinstance(x, Tensor) else x

        mine = {n: [to_cpu(x) for x in getattr(self, n)] for n in names}
        gathered: list[Any] = [None] * dist.get_world_size(group=process_group)
        dist.all_gather_object(gathered, mine, group=process_group)
        device = self.device
        for n in names:
            merged = [x for part in gathered for x in part[n]]
            setattr(self, n, [x.to(device) if isinstance(x, Tensor) else x for x in merged])

    def compute(self) -> dict[str, Tensor]:
        """COCOeval (segm) over every image updated: 0 for a model that detects nothing, -1 with no ground
        truth.

        Not torchmetrics' own ``compute``: it leaves out the images without ground truth, and so the
        false positives on them.
        """
        from pycocotools.cocoeval import COCOeval

        sizes = [
            next((size for size, _ in (*g, *d)), (0, 0))
            for g, d in zip(self.groundtruth_mask, self.detection_mask, strict=True)
        ]
        gt = _coco(
            sizes,
            self.groundtruth_mask,
            self.groundtruth_labels,
            iscrowd=self.groundtruth_crowds,
            area=self.groundtruth_area,
        )
        dt = _coco(sizes, self.detection_mask, self.detection_labels, score=self.detection_scores)
        stats = [-1.0] * len(COCO_KEYS)
        if gt.anns:  # no detections: COCOeval scores 0
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(gt, dt, "segm")
                ev.params.iouThrs = np.array(self.iou_thresholds, dtype=np.float64)
                ev.params.recThrs = np.array(self.rec_thresholds, dtype=np.float64)
                ev.params.maxDets = list(self.max_detection_thresholds)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = [float(v) for v in ev.stats[: len(COCO_KEYS)]]
        return {key: torch.tensor(v) for key, v in zip(COCO_KEYS.values(), stats, strict=True)}


def _coco(sizes: list[Any], masks: list[Any], labels: list[Tensor], **fields: list[Tensor]) -> Any:
    """A pycocotools ``COCO`` of the images 0..B-1 (all listed, of ``sizes[i]`` (h, w)) and their masks.

    ``masks[i]`` holds torchmetrics' ``((h, w), counts)`` RLEs of image i; ``fields`` are further keys
    of each annotation (``iscrowd``, ``score``), per image a tensor; an ``area`` of 0 is the mask's.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, ((h, w), rles, labs) in enumerate(zip(sizes, masks, labels, strict=True)):
        images.append({"id": i, "height": int(h), "width": int(w)})
        for k, ((size, counts), label) in enumerate(zip(rles, labs.tolist(), strict=True)):
            rle = {"size": list(size), "counts": counts}
            ann: dict[str, Any] = {"iscrowd": 0, **{key: v[i][k].item() for key, v in fields.items()}}
            if not ann.get("area", 0) > 0:
                ann["area"] = float(mask_utils.area(rle))
            ann.update(id=len(anns) + 1, image_id=i, category_id=int(label), segmentation=rle)  # ids from 1
            anns.append(ann)
    cats = sorted({a["category_id"] for a in anns})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cats]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
