"""COCO-format instances: masks, boxes, classes and point prompts, many prompt rows per image.

``CocoInstances`` reads a COCO ``instances_*.json`` (polygons, uncompressed and compressed RLE, through
pycocotools: ``pip install samflow[coco]``) and yields one item per image; ``collate_coco`` batches
items into a ``CocoBatch``: a ``SamBatch`` with one prompt row per instance (``image_index`` maps
rows to images) and per-row targets. ``CocoDataModule`` serves it to Lightning, chosen in an
experiment as ``data: {class_path: samflow.data.coco.CocoDataModule, init_args: {...}}``.

**Points.** ``points="qc"`` samples quasi-centre points as SAPNet / P2BNet's point generation:
for an instance whose mask spans pixel columns x0..x1 and rows y0..y1 (w = x1 - x0 + 1, h likewise;
centre cx = (x0 + x1) / 2, cy likewise), each mask pixel gets the weight of a 2-D Gaussian on the
box centre with sigma 0.25 in normalised box units (pixel indices 0..w-1 map to [-0.5, 0.5], as the
reference's ``gaussian2d``), ``exp(-((x-cx)/(w-1))^2 / (2*0.25^2) - ((y-cy)/(h-1))^2 / (2*0.25^2))``;
sampling is restricted to the mask pixels inside the central ellipse with semi-axes
``min(96, 0.125 w)`` x ``min(96, 0.125 h)`` (``size_range`` 0.25), or to the whole mask when that
is empty; the chosen pixel index gets a uniform jitter in (-0.5, 0.5) px. Differences from the
reference (``TOV_mmdetection/huicv/coarse_utils/noise_data_mask_utils.py``, ``center_gaussian``): the
ellipse is the exact inequality about the exact centre, not OpenCV's rasterised ellipse about
``(round(w/2), round(h/2))`` with rounded axes; the box is the mask's extent, not the annotation's
float ``bbox``; instances under 2 px a side use the same rule instead of a polygon vertex. Seeded by (seed, image id, annotation id, point index), so a point does not
depend on the order images are read in. ``points="annotation"`` reads ``ann[point_key]``: ``[x, y]``
or a list of them, in original pixel coordinates.

**Crowd and empty.** ``iscrowd: 1`` annotations are left out of the rows (``crowd="skip"``, the
default; their union is still available as ``crowd_mask``), or kept as ordinary instances
(``crowd="keep"``). Images without any (kept) instance are left out (``empty="skip"``, the default:
they give no prompt row) or kept (``empty="keep"``: they contribute an image and no rows).
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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from samflow.batch import SamBatch
from samflow.data.coco_proposals import ProposalBags, sam_checksum
from samflow.data.datamodule import EvalShardSampler, eval_shard_sampler
from samflow.data.folder import DataError, read_image
from samflow.data.resumable import ResumableLoader
from samflow.data.transforms import IMAGE_RESIZES, ImageResize, scale_boxes, scale_coords, to_input_frame

__all__ = [
    "CocoBatch",
    "CocoDataModule",
    "CocoInstances",
    "collate_coco",
    "decode_segmentation",
    "qc_point",
    "qc_weights",
]


def _mask_api() -> Any:
    try:
        from pycocotools import mask as mask_api
    except ImportError as err:  # pragma: no cover - the extra is in the test set
        raise DataError("COCO data needs pycocotools: pip install 'samflow[coco]'.") from err
    return mask_api


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> bool (H, W).

    Raises:
        DataError: naming ``where`` (file and annotation) when the value is none of those forms.
    """
    mask_api = _mask_api()
    try:
        if isinstance(segmentation, list):  # polygons
            if not segmentation:
                return np.zeros((height, width), dtype=bool)
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_api.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode()
        else:
            raise TypeError(f"type {type(segmentation).__name__}")
        mask = mask_api.decode(rle)
    except (TypeError, ValueError, KeyError, IndexError) as err:  # malformed input
        raise DataError(
            f"{where}: 'segmentation' is not a polygon list or an RLE dict ({err}); fix or remove it."
        ) from None
    if mask.shape[:2] != (height, width):
        raise DataError(
            f"{where}: the RLE 'size' {list(mask.shape[:2])} differs from the image's [{height}, {width}]."
        )
    return mask.astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """bool (H, W) -> compressed RLE with ``counts`` as str (JSON-ready)."""
    rle = _mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def qc_weights(
    mask: Tensor, sigma: float = 0.25, size_range: float = 0.25, limit: float = 96.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidate pixels of a quasi-centre point and their (unnormalised) weights (module docstring).

    Returns ``xs``, ``ys`` (long) and ``weight`` (float64), one entry per candidate mask pixel.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        raise ValueError("qc_point: empty mask.")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = float(x1 - x0 + 1), float(y1 - y0 + 1)
    cx, cy = float(x0 + x1) / 2, float(y0 + y1) / 2
    dx, dy = (xs.double() - cx), (ys.double() - cy)
    ax, ay = min(limit, size_range / 2 * w), min(limit, size_range / 2 * h)
    inside = (dx / max(ax, 1e-9)) ** 2 + (dy / max(ay, 1e-9)) ** 2 <= 1
    if inside.any():
        xs, ys, dx, dy = xs[inside], ys[inside], dx[inside], dy[inside]
    # the reference's gaussian2d: box pixel indices 0..W-1 map to [-0.5, 0.5], i.e. divide by W - 1
    nx, ny = max(w - 1, 1.0), max(h - 1, 1.0)
    weight = torch.exp(-((dx / nx) ** 2 + (dy / ny) ** 2) / (2 * sigma**2))
    return xs, ys, weight


def qc_point(
    mask: Tensor,
    generator: torch.Generator,
    sigma: float = 0.25,
    size_range: float = 0.25,
    limit: float = 96.0,
) -> Tensor:
    """A quasi-centre point (x, y) inside ``mask`` (H, W) bool, as SAPNet's point generation (module docstring)."""
    xs, ys, weight = qc_weights(mask, sigma, size_range, limit)
    pick = torch.multinomial(weight, 1, generator=generator)[0]
    jitter = (torch.rand(2, generator=generator, dtype=torch.float64) - 0.5) * 0.999
    return torch.stack([xs[pick].double(), ys[pick].double()]) + jitter


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        seed: seed of the quasi-centre points.
        crowd: ``"skip"`` or ``"keep"`` the ``iscrowd`` annotations.
        empty: ``"skip"`` or ``"keep"`` images without instances.
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
    ``crowd_mask`` bool (H, W); with ``proposals``: ``proposal_boxes`` (M, K, 4) xyxy (exclusive ends,
    original pixels), ``proposal_scores`` (M, K), ``proposal_rles`` (M lists of K RLE dicts).
    """

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
        if image_resize not in IMAGE_RESIZES:
            raise ValueError(
                f"CocoInstances: image_resize must be 'sam' or 'bilinear', got {image_resize!r}."
            )
        self.image_resize = image_resize
        self.aux_masks = aux_masks
        self.root = Path(images).expanduser() if images is not None else self.file.parent
        if points not in ("qc", "annotation"):
            raise ValueError(f"CocoInstances: points must be 'qc' or 'annotation', got {points!r}.")
        if crowd not in ("skip", "keep") or empty not in ("skip", "keep"):
            raise ValueError(
                f"CocoInstances: crowd and empty are 'skip' or 'keep', got {crowd!r}, {empty!r}."
            )
        if points_per_instance < 1:
            raise ValueError(f"CocoInstances: points_per_instance must be >= 1, got {points_per_instance}.")
        self.img_size, self.points, self.points_per_instance = img_size, points, points_per_instance
        self.point_key, self.seed, self.crowd, self.resize_mode = point_key, seed, crowd, resize_mode
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            raise DataError(
                f"COCO annotations {self.file} not found; check the data's annotations path."
            ) from None
        except json.JSONDecodeError as err:
            raise DataError(f"{self.file}: not valid JSON ({err}).") from None
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{self.file}: no '{key}' list; is this a COCO instances file?")
        self.categories = {int(c["id"]): c.get("name", str(c["id"])) for c in data.get("categories", [])}
        listed = bool(self.categories)
        by_image: dict[int, list[dict[str, Any]]] = {}
        for i, ann in enumerate(data["annotations"]):
            for key in ("image_id", "segmentation", "category_id"):
                if key not in ann:
                    raise DataError(f"{self.file}: annotations[{i}] (id {ann.get('id')}) has no '{key}'.")
            cat = int(ann["category_id"])
            if cat not in self.categories:
                if listed:
                    raise DataError(
                        f"{self.file}: annotations[{i}] (id {ann.get('id')}) has category_id {cat}, which is "
                        "not in the file's 'categories'; add it there or fix the annotation."
                    )
                self.categories[cat] = str(cat)
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        #: COCO category id of each class index 0..C-1 (sorted ids), and the inverse map.
        self.category_ids: list[int] = sorted(self.categories)
        self.label_of: dict[int, int] = {c: k for k, c in enumerate(self.category_ids)}
        self.images: list[dict[str, Any]] = []
        self.anns: list[list[dict[str, Any]]] = []
        for i, img in enumerate(data["images"]):
            for key in ("id", "file_name", "height", "width"):
                if key not in img:
                    raise DataError(f"{self.file}: images[{i}] has no '{key}'.")
            anns = by_image.get(int(img["id"]), [])
            usable = [a for a in anns if crowd == "keep" or not a.get("iscrowd", 0)]
            if not usable and empty == "skip":
                continue
            self.images.append(img)
            self.anns.append(anns)
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
        for ann in anns:
            where = f"{self.file}: annotation id {ann.get('id')} (image id {img['id']})"
            mask = decode_segmentation(ann["segmentation"], h, w, where)
            if ann.get("iscrowd", 0) and self.crowd == "skip":
                crowd |= mask
                continue
            if not mask.any():
                continue
            m = torch.from_numpy(mask)
            ys, xs = torch.nonzero(m, as_tuple=True)
            masks.append(m)
            boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
            classes.append(int(ann["category_id"]))
            ann_ids.append(int(ann.get("id", len(ann_ids))))
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
            "crowd_mask": torch.from_numpy(crowd),
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
            gen = torch.Generator().manual_seed(_seed(self.seed, image_id, ann_id, j))
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
        image = read_image(path)
        h, w = int(img["height"]), int(img["width"])
        if tuple(image.shape[-2:]) != (h, w):
            raise DataError(
                f"{self.file}: image id {img['id']}: {path} is {tuple(image.shape[-2:])}, the JSON says ({h}, {w})."
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


@dataclass
class CocoBatch(SamBatch):
    """A ``SamBatch`` with one prompt row per instance, and per-row targets.

    ``mask`` / ``gt_original`` hold the union of each image's instances; ``row_mask`` gives each row
    its own instance. Extra fields (N rows, P points per row):
    ``instance_mask`` float (N, 1, S, S), ``classes`` long (N,) contiguous indices 0..C-1,
    ``category_ids`` long (N,) the COCO ids, ``ann_ids`` long (N,), ``points_original`` (N, P, 2),
    ``boxes_original`` (N, 4) xyxy, ``instance_masks`` list of B bool (M_b, H_b, W_b) at the original
    resolution, ``image_ids`` list of B ints. With a proposal store (K proposals per point, of each
    row's first point): ``proposals`` (N, K, 4) xyxy boxes in the S x S frame (exclusive ends),
    ``proposal_scores`` (N, K) SAM's predicted IoU, ``proposal_rles`` N lists of K RLE dicts (the masks
    at the original resolution, decoded only where needed). With ``aux_masks``: ``aux_masks`` bool
    (N, R, S, S), R further masks per row in the input frame.
    """

    instance_mask: Tensor | None = None
    classes: Tensor | None = None
    category_ids: Tensor | None = None
    ann_ids: Tensor | None = None
    points_original: Tensor | None = None
    boxes_original: Tensor | None = None
    proposals: Tensor | None = None
    proposal_scores: Tensor | None = None
    proposal_rles: list[list[dict[str, Any]]] | None = None
    aux_masks: Tensor | None = None
    instance_masks: list[Tensor] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)

    _ROW_FIELDS = (
        "instance_mask",
        "classes",
        "category_ids",
        "ann_ids",
        "points_original",
        "boxes_original",
        "proposals",
        "proposal_scores",
        "aux_masks",
    )

    @property
    def row_mask(self) -> Tensor:
        if self.instance_mask is None:
            return super().row_mask
        return self.instance_mask

    def select_rows(self, rows: Tensor | list[int]) -> CocoBatch:
        out = super().select_rows(rows)
        index = torch.as_tensor(rows, dtype=torch.long)
        changes: dict[str, Any] = {
            name: getattr(self, name)[index] for name in self._ROW_FIELDS if getattr(self, name) is not None
        }
        if self.proposal_rles is not None:
            changes["proposal_rles"] = [self.proposal_rles[i] for i in index.tolist()]
        return out.replace(**changes)  # type: ignore[return-value]


def collate_coco(items: list[dict[str, Any]]) -> CocoBatch:
    """``CocoInstances`` items -> a ``CocoBatch``: all instances of all images as rows, image by image."""
    if not items:
        raise ValueError("collate_coco: empty list of items.")
    s = items[0]["image"].shape[-1]
    rows_index, points, boxes, inst, props, aux = [], [], [], [], [], []
    with_proposals = "proposal_boxes" in items[0]
    with_aux = "aux_masks" in items[0]
    for b, item in enumerate(items):
        m = len(item["classes"])
        orig, size = item["original_size"].tolist(), item["input_size"].tolist()
        rows_index.append(torch.full((m,), b, dtype=torch.long))
        points.append(scale_coords(item["points"], orig, size))
        box = scale_boxes(item["boxes"], orig, size)
        boxes.append(box)
        if with_proposals:
            props.append(scale_boxes(item["proposal_boxes"], orig, size))
        if with_aux and m and item["aux_masks"].shape[1]:
            am = item["aux_masks"]
            framed, _ = to_input_frame(
                am.reshape(-1, 1, *am.shape[-2:]).float(), s, "longest", "nearest-exact"
            )
            aux.append(framed.reshape(m, -1, s, s) > 0.5)
        if m:
            resized, _ = to_input_frame(
                item["instance_masks"][:, None].float(), s, "longest", "nearest-exact"
            )
            inst.append(resized)
        else:
            inst.append(torch.zeros(0, 1, s, s))
    p = max(item["points"].shape[1] for item in items)
    pts = torch.cat(points) if points else torch.zeros(0, p, 2)
    instance_mask = torch.cat(inst)
    image_index = torch.cat(rows_index)
    union = torch.zeros(len(items), 1, s, s)
    union.index_put_((image_index,), instance_mask, accumulate=True)
    proposal_fields: dict[str, Any] = {}
    if with_proposals:
        proposal_fields = {
            "proposals": torch.cat(props),
            "proposal_scores": torch.cat([item["proposal_scores"] for item in items]),
            "proposal_rles": [rles for item in items for rles in item["proposal_rles"]],
        }
    if with_aux:
        r = max((a.shape[1] for a in aux), default=0)
        proposal_fields["aux_masks"] = torch.cat(aux) if aux else torch.zeros(0, r, s, s, dtype=torch.bool)
    return CocoBatch(
        image=torch.stack([item["image"] for item in items]),
        input_size=torch.stack([item["input_size"] for item in items]).long(),
        original_size=torch.stack([item["original_size"] for item in items]).long(),
        mask=(union > 0).float(),
        gt_original=[item["instance_masks"].any(0) for item in items],
        id=[item["id"] for item in items],
        path=[item["path"] for item in items],
        image_index=image_index,
        points=pts,
        point_labels=torch.ones(pts.shape[:2], dtype=torch.long),
        box=torch.cat(boxes),
        instance_mask=instance_mask,
        classes=torch.cat([item["classes"] for item in items]),
        category_ids=torch.cat([item["category_ids"] for item in items]),
        ann_ids=torch.cat([item["ann_ids"] for item in items]),
        points_original=torch.cat([item["points"] for item in items]),
        boxes_original=torch.cat([item["boxes"] for item in items]),
        instance_masks=[item["instance_masks"] for item in items],
        image_ids=[item["image_id"] for item in items],
        **proposal_fields,
    )


class CocoDataModule(L.LightningDataModule):
    """COCO instances for Lightning: ``train`` / ``val`` / ``test`` / ``predict`` are each
    ``{annotations: FILE, images: FOLDER}`` (or None); the other arguments go to ``CocoInstances``.

    Args:
        train: the training split, ``{annotations: FILE, images: FOLDER}``.
        val: the validation split (same form).
        test: the test split (same form).
        predict: the split ``samflow predict`` reads (same form).
        img_size: S, the model's square input side.
        points: ``"qc"`` (sampled quasi-centre points) or ``"annotation"`` (read ``point_key``).
        points_per_instance: P, points per instance (``"qc"``: P independent draws; ``"annotation"``:
            the first P given, an error if fewer).
        point_key: the annotation key holding points for ``points="annotation"``.
        seed: seed of the quasi-centre points (the training order follows the run's ``seed_everything``
            seed and the epoch, and resumes mid-epoch: ``samflow.data.ResumableLoader``).
        crowd: ``"skip"`` (iscrowd regions are no rows; kept as ``crowd_mask``) or ``"keep"``.
        empty: ``"skip"`` (images without instances are left out) or ``"keep"``.
        image_resize: ``"sam"`` (segment-anything's own Pillow resize, exact) or ``"bilinear"``
            (torch's antialiased interpolate, faster, within one grey level).
        batch_size: images per batch (every instance of an image is a row of the batch).
        num_workers: data-loader worker processes.
        proposals: the ``proposals.json`` (or store folder) of ``samflow proposals`` for the train split:
            each row then carries its proposal bag (``CocoBatch.proposals``, SAPNet's input). Refused
            when made for other data, or (in ``setup``, when the run's module is a SAM model) by
            another SAM.
        aux_masks: see ``CocoInstances``; the train split only (the evaluation files need not have them).
    """

    def __init__(
        self,
        train: dict[str, str] | None = None,
        val: dict[str, str] | None = None,
        test: dict[str, str] | None = None,
        predict: dict[str, str] | None = None,
        img_size: int = 1024,
        points: Literal["qc", "annotation"] = "qc",
        points_per_instance: int = 1,
        point_key: str = "point",
        seed: int = 0,
        crowd: Literal["skip", "keep"] = "skip",
        empty: Literal["skip", "keep"] = "skip",
        batch_size: int = 2,
        num_workers: int = 0,
        proposals: str | None = None,
        aux_masks: str | None = None,
        image_resize: ImageResize = "sam",
    ) -> None:
        super().__init__()
        self.splits = {"train": train, "val": val, "test": test, "predict": predict}
        self.proposals = proposals
        self.options = {
            "img_size": img_size,
            "points": points,
            "points_per_instance": points_per_instance,
            "point_key": point_key,
            "seed": seed,
            "crowd": crowd,
            "empty": empty,
            "image_resize": image_resize,
        }
        self.aux_masks = aux_masks
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, CocoInstances] = {}

    def dataset(self, split: str, proposals: bool = True) -> CocoInstances:
        """The ``CocoInstances`` of ``split``; a DataError naming ``data.<split>`` when it is not set.

        ``proposals=False`` gives the train split without its proposal store (what ``samflow proposals``
        reads to make the store), built anew and not kept.
        """
        if split not in self.datasets or not proposals:
            spec = self.splits.get(split)
            if not spec or "annotations" not in spec:
                raise DataError(f"data.{split}: give {{annotations: FILE, images: FOLDER}} for COCO data.")
            options: dict[str, Any] = dict(self.options)
            if split == "train" and self.proposals and proposals:
                options["proposals"] = self.proposals
            if split == "train" and self.aux_masks:
                options["aux_masks"] = self.aux_masks
            dataset = CocoInstances(spec["annotations"], spec.get("images"), **options)
            if not proposals:
                return dataset
            self.datasets[split] = dataset
        return self.datasets[split]

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each class index, from the first split set (train, val, test, predict)."""
        for split, spec in self.splits.items():
            if spec:
                return self.dataset(split).category_ids
        return []

    def setup(self, stage: str | None = None) -> None:
        for split, spec in self.splits.items():
            if spec:
                self.dataset(split)
        train = self.datasets.get("train")
        if train is not None and train.proposals is not None and stage in (None, "fit"):
            sam = _run_sam(self)
            if sam is not None:
                train.proposals.check_sam(sam_checksum(sam), "the experiment's model.sam")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        common: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": collate_coco,
        }
        if shuffle:  # the order from (the run's seed, epoch), resumable mid-epoch (``ResumableLoader``)
            return ResumableLoader(dataset, shuffle=True, **common)
        return DataLoader(dataset, sampler=self._eval_sampler(split, dataset), **common)

    def _eval_sampler(self, split: str, dataset: CocoInstances) -> EvalShardSampler | None:
        """Under DDP, this process's contiguous, unpadded part of an evaluation split (``EvalShardSampler``:
        no image counted twice in COCO AP); None in one process or with ``use_distributed_sampler`` off."""
        return eval_shard_sampler(getattr(self, "trainer", None), dataset, f"data.{split}")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val split's loader; none (no validation during fit) when ``val`` is not set."""
        return self._loader("val", False) if self.splits.get("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False)


def _run_sam(datamodule: L.LightningDataModule) -> torch.nn.Module | None:
    """The SAM of the module the data module's trainer runs (``module.model.sam``), if there is one."""
    trainer = getattr(datamodule, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    sam = getattr(getattr(module, "model", None), "sam", None)
    return sam if isinstance(sam, torch.nn.Module) else None
