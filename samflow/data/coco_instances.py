"""COCO-format instances: masks, boxes, classes and point prompts, many prompt rows per image.

``CocoInstances`` reads a COCO ``instances_*.json`` (polygons, uncompressed and compressed RLE, through
pycocotools: ``pip install samflow[coco]``) and yields one item per image; ``collate_coco`` batches
items into a ``CocoBatch``: a ``SamBatch`` with one prompt row per instance (``image_index`` maps
rows to images) and per-row targets. ``CocoDataModule`` serves it to Lightning, chosen in an
experiment as ``data: {class_path: samflow.data.coco.CocoDataModule, init_args: {...}}``.

**Points.** ``points="qc"`` samples quasi-centre points as SAPNet / P2BNet's point generation
(the rule, and where it differs from the reference: ``samflow.data.coco_points``). Seeded by (seed,
image id, annotation id, point index), so a point does not depend on the order images are read in.
``points="annotation"`` reads ``ann[point_key]``: ``[x, y]`` or a list of them, in original pixel
coordinates.

**Crowd and empty.** ``iscrowd: 1`` annotations are left out of the rows (``crowd="skip"``, the
default; their union is still available as ``crowd_mask``, and each one with its class as
``crowd_masks`` / ``crowd_classes``, the crowd regions of the student's COCO AP), or kept as ordinary
instances (``crowd="keep"``, flagged in ``iscrowd``). Images without any (kept) instance are left out
(``empty="skip"``, the default: they give no prompt row) or kept (``empty="keep"``: they contribute an
image and no rows).
Annotations with an empty mask are dropped (they have no point).

**Classes.** COCO category ids (1..90 with gaps in COCO 2017) become contiguous indices 0..C-1 in
the order of the sorted ids of the file's ``categories`` list (mmdetection's ``cat2label``; the ids
found in the annotations when the file has no such list): ``classes`` holds the index and
``category_ids`` the original id, and ``CocoInstances.category_ids[k]`` maps index k back (for writing
results with the original ids). An annotation whose id is not in ``categories`` is refused.

**Proposals.** ``proposals=`` the ``proposals.json`` (or folder) that ``samflow proposals`` wrote for
this data adds each instance's bag of its first point (``samflow.data.coco_proposals``): the batch's
``proposals`` (N, P, 4) boxes in the input frame, ``proposal_scores`` (N, P) and ``proposal_rles``
(the P masks as RLE at the original size). A store made for other data is refused with one line.

Coordinates of the batch follow ``samflow.batch``: the S x S input frame, pixel units; the
``*_original`` fields keep original pixel coordinates, boxes xyxy inclusive of the last pixel's
index (``x1 = max column``).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from samflow.data.coco_file import file_digest, makes_row, read_coco_file
from samflow.data.coco_masks import decode_segmentation
from samflow.data.coco_points import qc_point
from samflow.data.coco_proposals import ProposalBags
from samflow.data.errors import DataError
from samflow.data.reading import TURNS, OrientationWarning, ValueRangeWarning, read_image_with_note
from samflow.data.transforms import IMAGE_RESIZES, ImageResize, to_input_frame
from samflow.seeding import stable_seed

__all__ = ["CocoInstances"]


class CocoInstances(Dataset):
    """One item per image of a COCO instances file (see the module docstring).

    Args:
        annotations: the COCO JSON file.
        images: folder of the images (``file_name`` is relative to it); default: the JSON's folder.
        img_size: S, the model's square input side.
        points: ``"qc"`` (sampled quasi-centre points) or ``"annotation"`` (read ``point_key``).
        points_per_instance: P, points per instance (``"qc"``: P independent draws; ``"annotation"``:
            the first P given, an error if fewer).
        point_key: the annotation key holding points for ``points="annotation"``.
        seed: seed of the quasi-centre points (``CocoDataModule``'s training order follows the run's
            ``seed_everything`` seed and the epoch, and resumes mid-epoch: ``samflow.data.ResumableLoader``).
        crowd: ``"skip"`` (iscrowd regions are no rows; kept as ``crowd_mask``) or ``"keep"``.
        empty: ``"skip"`` (images without instances are left out) or ``"keep"`` (they are images without
            prompt rows: counted in evaluation, scored by no metric; a training batch of only such
            images teaches nothing, its step is skipped).
        resize_mode: ``"longest"`` (SAM's) or ``"stretch"``.
        image_resize: ``"sam"`` (default: segment-anything's own Pillow resize, exact, as
            ``MaskFolderDataset``) or ``"bilinear"`` (torch's antialiased interpolate, faster, within
            one grey level). Part of the data fingerprint, so a proposal store follows it.
        proposals: ``proposals.json`` (or its store folder) of ``samflow proposals`` for this data; its
            key must match (module docstring).
        aux_masks: an annotation key holding R further masks per instance (a list of segmentations,
            e.g. ``mps_segmentation`` of ``samflow pseudo-masks``: SAPNet's MPS masks); item
            ``aux_masks`` (M, R, H, W) bool, batch ``aux_masks`` (N, R, S, S).

    Item keys: ``image`` (3, S, S), ``input_size``, ``original_size``, ``id``, ``path``, ``image_id``,
    ``instance_masks`` bool (M, H, W), ``boxes`` (M, 4) xyxy, ``classes`` (M,) contiguous indices,
    ``category_ids`` (M,) COCO ids, ``ann_ids`` (M,), ``points`` (M, P, 2) (all original coordinates),
    ``iscrowd`` bool (M,), ``crowd_mask`` bool (H, W) and, per crowd region left out of the rows,
    ``crowd_masks`` bool (K, H, W) and ``crowd_classes`` (K,); with ``proposals``: ``proposal_boxes``
    (M, K, 4) xyxy (exclusive ends, original pixels), ``proposal_scores`` (M, K), ``proposal_rles`` (M
    lists of K RLE dicts).
    """

    @staticmethod
    def check_options(
        points: str = "qc",
        points_per_instance: int = 1,
        crowd: str = "skip",
        empty: str = "skip",
        image_resize: str = "sam",
        where: str = "CocoInstances: ",
    ) -> None:
        """Refuse option values ``CocoInstances`` cannot use, each named after ``where`` (``CocoDataModule``
        checks its options with this when it is built: a bad value stops the command before any file is
        read)."""
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(f"{where}image_resize must be 'sam' or 'bilinear', got {image_resize!r}.")
        if points not in ("qc", "annotation"):
            raise ValueError(f"{where}points must be 'qc' or 'annotation', got {points!r}.")
        if crowd not in ("skip", "keep") or empty not in ("skip", "keep"):
            raise ValueError(f"{where}crowd and empty are 'skip' or 'keep', got {crowd!r}, {empty!r}.")
        if points_per_instance < 1:
            raise ValueError(f"{where}points_per_instance must be >= 1, got {points_per_instance}.")

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path | None = None,
        img_size: int = 1024,
        points: Literal["qc", "annotation"] = "qc",
        points_per_instance: int = 1,
        point_key: str = "point",
        seed: int = 0,
        crowd: Literal["skip", "keep"] = "skip",
        empty: Literal["skip", "keep"] = "skip",
        resize_mode: Literal["longest", "stretch"] = "longest",
        proposals: str | Path | None = None,
        aux_masks: str | None = None,
        image_resize: ImageResize = "sam",
    ) -> None:
        self.file = Path(annotations).expanduser()
        self.check_options(
            points=points,
            points_per_instance=points_per_instance,
            crowd=crowd,
            empty=empty,
            image_resize=image_resize,
        )
        self.image_resize = image_resize
        self.aux_masks = aux_masks
        self.root = Path(images).expanduser() if images is not None else self.file.parent
        self.img_size, self.points, self.points_per_instance = img_size, points, points_per_instance
        self.point_key, self.seed, self.crowd, self.empty = point_key, seed, crowd, empty
        self.resize_mode = resize_mode
        self.categories, self.images, self.anns = read_coco_file(self.file, crowd, empty)
        self.orientation_warned = False  # warned about images with an EXIF orientation (once per process)
        #: COCO category id of each class index 0..C-1 (sorted ids), and the inverse map.
        self.category_ids: list[int] = sorted(self.categories)
        self.label_of: dict[int, int] = {c: k for k, c in enumerate(self.category_ids)}
        self.fingerprint = hashlib.sha256(
            f"{file_digest(self.file)}|{points}|{points_per_instance}|{point_key}|{seed}|{crowd}|{empty}"
            f"|{image_resize}".encode()
        ).hexdigest()
        self.proposals = (
            ProposalBags(proposals, self.fingerprint, img_size, resize_mode)
            if proposals is not None
            else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def instances(self, index: int) -> dict[str, Any]:
        """Image ``index``'s targets at the original resolution (no image read)."""
        img, anns = self.images[index], self.anns[index]
        h, w = int(img["height"]), int(img["width"])
        masks: list[Tensor] = []
        boxes: list[list[Tensor]] = []
        classes: list[int] = []
        ann_ids: list[int] = []
        points: list[Tensor] = []
        bags: list[tuple[Tensor, Tensor, list[dict[str, Any]]]] = []
        aux: list[Tensor] = []
        crowd = np.zeros((h, w), dtype=bool)
        crowds: list[Tensor] = []
        crowd_classes: list[int] = []
        iscrowd: list[bool] = []
        for ann in anns:
            where = f"{self.file}: annotation id {ann.get('id')} (image id {img['id']})"
            mask = decode_segmentation(ann["segmentation"], h, w, where)
            if not makes_row(ann, self.crowd):  # a crowd region, kept as crowd ground truth
                crowd |= mask
                crowds.append(torch.from_numpy(mask))
                crowd_classes.append(self.label_of[int(ann["category_id"])])
                continue
            if not mask.any():
                continue
            m = torch.from_numpy(mask)
            ys, xs = torch.nonzero(m, as_tuple=True)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            classes.append(int(ann["category_id"]))
            iscrowd.append(bool(ann.get("iscrowd", 0)))
            ann_ids.append(int(ann["id"]))
            points.append(self._points(m, ann, where, int(img["id"]), ann_ids[-1]))
            if self.proposals is not None:
                bags.append(self.proposals.bag(ann_ids[-1], 0, where))
            if self.aux_masks is not None:
                aux.append(self._aux(ann, h, w, where))
        n, p = len(masks), self.points_per_instance
        item: dict[str, Any] = {
            "instance_masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "classes": torch.tensor([self.label_of[c] for c in classes], dtype=torch.long),
            "category_ids": torch.tensor(classes, dtype=torch.long),
            "ann_ids": torch.tensor(ann_ids, dtype=torch.long),
            "points": torch.stack(points).float() if points else torch.zeros(0, p, 2),
            "iscrowd": torch.tensor(iscrowd, dtype=torch.bool),
            "crowd_mask": torch.from_numpy(crowd),
            "crowd_masks": torch.stack(crowds) if crowds else torch.zeros(0, h, w, dtype=torch.bool),
            "crowd_classes": torch.tensor(crowd_classes, dtype=torch.long),
        }
        if self.proposals is not None:
            k = self.proposals.per_point
            item["proposal_boxes"] = torch.stack([b[0] for b in bags]) if bags else torch.zeros(0, k, 4)
            item["proposal_scores"] = torch.stack([b[1] for b in bags]) if bags else torch.zeros(0, k)
            item["proposal_rles"] = [b[2] for b in bags]
        if self.aux_masks is not None:
            if len({a.shape[0] for a in aux}) > 1:
                raise DataError(
                    f"{self.file}: image id {img['id']}: the annotations' '{self.aux_masks}' lists differ in length."
                )
            item["aux_masks"] = torch.stack(aux) if aux else torch.zeros(0, 0, h, w, dtype=torch.bool)
        return item

    def _aux(self, ann: dict[str, Any], h: int, w: int, where: str) -> Tensor:
        value = ann.get(self.aux_masks or "")
        if not isinstance(value, list) or not value:
            raise DataError(
                f"{where}: no '{self.aux_masks}' list of masks (aux_masks); write the file with it."
            )
        return torch.stack([torch.from_numpy(decode_segmentation(v, h, w, where)) for v in value])

    def _points(self, mask: Tensor, ann: dict[str, Any], where: str, image_id: int, ann_id: int) -> Tensor:
        p = self.points_per_instance
        if self.points == "annotation":
            value = ann.get(self.point_key)
            try:
                pts = torch.tensor(value, dtype=torch.float64).reshape(-1, 2)
            except (TypeError, ValueError, RuntimeError):
                raise DataError(
                    f"{where}: '{self.point_key}' must be [x, y] or a list of [x, y], got {value!r}."
                ) from None
            if len(pts) < p:
                raise DataError(f"{where}: '{self.point_key}' has {len(pts)} point(s), {p} wanted.")
            return pts[:p]
        draws = []
        for j in range(p):
            gen = torch.Generator().manual_seed(stable_seed(self.seed, image_id, ann_id, j))
            draws.append(qc_point(mask, gen))
        return torch.stack(draws)

    def image_path(self, index: int) -> Path:
        """The file of image ``index``; a DataError naming the annotation file when it is not there."""
        img = self.images[index]
        path = self.root / img["file_name"]
        if not path.is_file():
            raise DataError(
                f"{self.file}: image id {img['id']}: file {path} not found (images folder {self.root})."
            )
        return path

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.images[index]
        path = self.image_path(index)
        image, note, turn = read_image_with_note(path, torch.float32)
        if note:
            warnings.warn(f"{path}: {note}.", ValueRangeWarning, stacklevel=2)
        h, w = int(img["height"]), int(img["width"])
        if tuple(image.shape[-2:]) != (h, w):
            stored = turn in (5, 6, 7, 8) and tuple(image.shape[-2:]) == (w, h)
            why = (
                f" as read, upright: its EXIF orientation {turn} has it {TURNS[turn]}, as viewers show it, "
                "and the JSON has the stored size, so its annotations are likely of the stored pixels. "
                "Remove the orientation tag from the image file (it is then read as stored), or annotate "
                "it upright"
                if stored
                else ""
            )
            raise DataError(
                f"{self.file}: image id {img['id']}: {path} is {tuple(image.shape[-2:])}{why}; the JSON "
                f"says ({h}, {w})."
            )
        if turn != 1 and not self.orientation_warned:
            self.orientation_warned = True
            warnings.warn(
                f"{self.file}: images with an EXIF orientation are read upright, as viewers and annotation "
                f"tools show them; the first, {path}, is {TURNS[turn]} (orientation {turn}). Annotations "
                "must be of the images as shown: ones drawn on the stored pixels (by a tool that ignores "
                "the orientation) are misaligned (one warning per dataset).",
                OrientationWarning,
                stacklevel=2,
            )
        frame, input_size = to_input_frame(image, self.img_size, self.resize_mode, self.image_resize)
        item = self.instances(index)
        item.update(
            image=frame,
            input_size=torch.tensor(input_size),
            original_size=torch.tensor([h, w]),
            id=str(img["id"]),
            path=str(path),
            image_id=int(img["id"]),
        )
        return item
