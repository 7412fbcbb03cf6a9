"""COCO mask AP (AP, AP50, AP75, APs/m/l) of instance predictions, DDP-safe.

A thin wrapper around torchmetrics' ``MeanAveragePrecision(iou_type="segm")``: pycocotools' COCOeval
computes the numbers, and torchmetrics gathers every process's RLE-encoded masks before ``compute``,
so the result under DDP is that of the whole evaluation set. Needs the ``coco`` extra
(``pip install "samflow[coco]"``, pycocotools).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

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
    image a dict with ``masks`` (M, H, W) and ``labels`` (M,) (optionally ``iscrowd``). Up to
    ``max_detections`` (100) detections per image count, as COCO.
    """

    def __init__(self, max_detections: int = 100, **kwargs: Any) -> None:
        try:
            import pycocotools  # noqa: F401
        except ImportError as e:  # pragma: no cover - the coco extra is in the test extra
            raise ImportError('CocoMaskAP needs pycocotools: pip install "samflow[coco]"') from e
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
        t = [{**dict(x), "masks": x["masks"].bool(), "labels": x["labels"].long()} for x in target]
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
        out = super().compute()
        return {new: torch.as_tensor(out[old]).float() for old, new in COCO_KEYS.items()}
