"""The proposal bags of ``samflow proposals`` read back for training (SAPNet's input).

``ProposalBags(path, dataset)`` opens ``proposals.json`` (or the store folder holding it) and checks
that it was made for this data: the store's key (``info.samflow_key``) must have the data set's
fingerprint (annotation file bytes, point settings), image size and resize rule; otherwise a
``DataError`` names the file, what differs and the command that remakes it. (The SAM part of the key
is checked by ``CocoDataModule.setup`` against the run's SAM.)

``bag(ann_id, point_index)`` gives an annotation's proposals for one of its points: boxes (P, 4) xyxy
in original pixels with exclusive ends (``[x, y, x + w, y + h]`` of the stored ``[x, y, w, h]``, so a
one-pixel mask is a 1 x 1 box), scores (P,) and the P compressed RLE masks at the original size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from samflow.data.errors import DataError

__all__ = ["ProposalBags", "proposals_file", "sam_checksum"]

#: the key fields the data side checks (the ``sam`` field needs the model: CocoDataModule.setup).
DATA_KEYS = ("data", "img_size", "resize_mode")


def sam_checksum(sam: torch.nn.Module) -> str:
    """SHA-256 of every weight and buffer of SAM (names, dtypes, shapes, bytes): the store key's ``sam``."""
    digest = hashlib.sha256()
    state = sam.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def proposals_file(path: str | Path) -> Path:
    """``proposals.json`` of a store folder, or the file itself; a DataError when it is not there."""
    p = Path(path).expanduser()
    if p.is_dir():
        final = p / "proposals.json"
        if final.is_file():
            return final
        if (p / "manifest.json").is_file():
            raise DataError(
                f"{p}: the proposal store is unfinished (no proposals.json); run `samflow proposals` with "
                f"--out {p} again to finish it."
            )
        raise DataError(
            f"{p}: no proposals.json here; make it with `samflow proposals --experiment X --out {p}`."
        )
    if not p.is_file():
        raise DataError(
            f"proposals {p} not found; make them with `samflow proposals --experiment X --out DIR`."
        )
    return p


class ProposalBags:
    """Per-annotation proposal bags of a ``samflow proposals`` store (module docstring).

    Args:
        path: ``proposals.json`` or the store folder.
        fingerprint, img_size, resize_mode: the data set's (``CocoInstances``), checked against the key.
    """

    def __init__(self, path: str | Path, fingerprint: str, img_size: int, resize_mode: str) -> None:
        self.file = proposals_file(path)
        try:
            data = json.loads(self.file.read_text())
        except json.JSONDecodeError as err:
            raise DataError(
                f"{self.file}: not valid JSON ({err}); make it again with `samflow proposals`."
            ) from None
        info = data.get("info") if isinstance(data, dict) else None
        key = info.get("samflow_key") if isinstance(info, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(key, dict)
            or not isinstance(data.get("annotations"), list)
        ):
            raise DataError(
                f"{self.file}: not a `samflow proposals` store (no info.samflow_key or annotations)."
            )
        self.key: dict[str, str] = key
        wanted = {"data": fingerprint, "img_size": str(img_size), "resize_mode": resize_mode}
        differs = [k for k in DATA_KEYS if str(key.get(k)) != wanted[k]]
        if differs:
            raise DataError(
                f"{self.file}: proposals of other data (differs in: {', '.join(differs)}); a stale store is not "
                f"used. Remake it for this experiment: `samflow proposals --experiment X --out "
                f"{self.file.parent} --overwrite`."
            )
        self.per_point = int(info.get("proposals_per_point", 6))
        self.bags: dict[tuple[int, int], dict[str, Any]] = {
            (int(a["ann_id"]), int(a.get("point_index", 0))): a for a in data["annotations"]
        }

    def check_sam(self, checksum: str, where: str = "") -> None:
        """Refuse a store made with another SAM (``checksum``: ``sam_checksum``)."""
        if self.key.get("sam") != checksum:
            raise DataError(
                f"{self.file}: proposals of another SAM checkpoint than {where or 'this run'}'s (differs in: sam); "
                f"remake them: `samflow proposals --experiment X --out {self.file.parent} --overwrite`."
            )

    def bag(
        self, ann_id: int, point_index: int = 0, where: str = ""
    ) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        """Boxes (P, 4) xyxy exclusive in original pixels, scores (P,), RLEs of one point's proposals."""
        ann = self.bags.get((ann_id, point_index))
        if ann is None:
            raise DataError(
                f"{self.file}: no proposals for {where or f'annotation {ann_id}'} point {point_index}; the store "
                "does not cover this data. Remake it with `samflow proposals ... --overwrite`."
            )
        xywh = torch.tensor(ann["bbox"], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        return boxes, torch.tensor(ann["scores"], dtype=torch.float32), list(ann["segmentation"])
