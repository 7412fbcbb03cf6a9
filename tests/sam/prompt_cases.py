"""Prompt rows of every kind on two non-square images, ``SamBatch``es of them, and segment-anything's
own ``Sam.forward`` on one row, for the batch-invariance tests (``test_batch_invariance.py``).

All coordinates are whole pixels inside the unpadded region, so they are exact in float32 and float64
and both sides embed the same numbers. Everything is deterministic (seeded generators).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import Tensor

from samflow.batch import SamBatch

S = 128  # the tiny SAM's input side
LOW = S // 4  # SAM's low-resolution mask side
#: (h, w) of the two test images before padding: both non-square.
INPUT_SIZES = ((96, 128), (128, 112))

#: Prompt kinds: (number of points, box, mask prompt). Point labels alternate starting with a
#: positive (1, 0, 1, 0, 1), so every kind with two or more points mixes both signs.
KINDS: dict[str, tuple[int, bool, bool]] = {
    "none": (0, False, False),
    "box": (0, True, False),
    "points1": (1, False, False),
    "points2": (2, False, False),
    "points3": (3, False, False),
    "points4": (4, False, False),
    "points5": (5, False, False),
    "box+points": (2, True, False),
    "mask": (0, False, True),
    "mask+box": (0, True, True),
}


@dataclass(frozen=True)
class Prompt:
    """One prompt row: points (K, 2) x, y and labels (K,), box (4,) xyxy, mask (1, S/4, S/4); None if absent."""

    kind: str
    image: int
    points: Tensor | None
    labels: Tensor | None
    box: Tensor | None
    mask: Tensor | None

    def to(self, dtype: torch.dtype) -> Prompt:
        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        return Prompt(self.kind, self.image, cast(self.points), self.labels, cast(self.box), cast(self.mask))


def make_images(dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Two random images (2, 3, S, S) in [0, 1], zero outside their ``INPUT_SIZES``, and input_size (2, 2)."""
    gen = torch.Generator().manual_seed(1234)
    image = torch.zeros(len(INPUT_SIZES), 3, S, S, dtype=torch.float64)
    for j, (h, w) in enumerate(INPUT_SIZES):
        image[j, :, :h, :w] = torch.rand(3, h, w, generator=gen, dtype=torch.float64)
    return image.to(dtype), torch.tensor(INPUT_SIZES, dtype=torch.long)


def make_prompt(kind: str, image: int, variant: int = 0) -> Prompt:
    """The prompt of ``kind`` on ``image`` (0 or 1), in float64; ``variant`` gives another one of the same kind."""
    n_points, with_box, with_mask = KINDS[kind]
    gen = torch.Generator().manual_seed(10_000 * variant + 100 * image + list(KINDS).index(kind))
    h, w = INPUT_SIZES[image]
    points = labels = box = mask = None
    if n_points:
        xs = torch.randint(0, w, (n_points,), generator=gen)
        ys = torch.randint(0, h, (n_points,), generator=gen)
        points = torch.stack([xs, ys], dim=1).to(torch.float64)
        labels = (torch.arange(n_points) + 1) % 2  # 1, 0, 1, 0, 1
    if with_box:
        x0 = int(torch.randint(0, w // 2, (1,), generator=gen))
        y0 = int(torch.randint(0, h // 2, (1,), generator=gen))
        x1 = int(torch.randint(x0 + 8, w, (1,), generator=gen))
        y1 = int(torch.randint(y0 + 8, h, (1,), generator=gen))
        box = torch.tensor([x0, y0, x1, y1], dtype=torch.float64)
    if with_mask:
        mask = 4 * torch.randn(1, LOW, LOW, generator=gen, dtype=torch.float64)
    return Prompt(kind, image, points, labels, box, mask)


def make_batch(image: Tensor, input_size: Tensor, rows: list[Prompt], compact: bool = True) -> SamBatch:
    """A ``SamBatch`` of ``rows`` (prompt row i on image ``rows[i].image``), padded as the data contract says.

    Points go to the most points of any row with label -1 (coordinates 0) in the empty slots; rows
    without a box / mask prompt hold zeros and False. ``compact``: flags that are all True are None.
    """
    n = len(rows)
    dtype = image.dtype
    fields: dict = {}
    k = max((0 if r.points is None else r.points.shape[0]) for r in rows)
    if k:
        points = torch.zeros(n, k, 2, dtype=dtype)
        labels = torch.full((n, k), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.points is not None:
                points[i, : r.points.shape[0]] = r.points
                labels[i, : r.labels.shape[0]] = r.labels
        fields.update(points=points, point_labels=labels)
    for name, flag, attr, shape in (
        ("box", "has_box", "box", (4,)),
        ("mask_prompt", "has_mask_prompt", "mask", (1, LOW, LOW)),
    ):
        present = torch.tensor([getattr(r, attr) is not None for r in rows])
        if present.any():
            value = torch.zeros(n, *shape, dtype=dtype)
            for i, r in enumerate(rows):
                if present[i]:
                    value[i] = getattr(r, attr)
            fields[name] = value
            fields[flag] = None if compact and present.all() else present
    return SamBatch(
        image=image,
        input_size=input_size.clone(),
        original_size=input_size.clone(),
        image_index=torch.tensor([r.image for r in rows], dtype=torch.long),
        **fields,
    )


def make_single(image: Tensor, input_size: Tensor, prompt: Prompt) -> SamBatch:
    """A batch of only ``prompt``'s image and ``prompt`` (built directly, without the selection helpers)."""
    j = prompt.image
    return make_batch(image[j : j + 1], input_size[j : j + 1], [dataclasses.replace(prompt, image=0)])


@torch.no_grad()
def sam_forward(
    sam: Sam, image: Tensor, input_size: Tensor, prompt: Prompt, multimask: bool
) -> tuple[Tensor, Tensor]:
    """segment-anything's ``Sam.forward`` on one prompt row -> (low-res logits (M, S/4, S/4), IoU (M,)).

    SAM gets the unpadded image in 0..255 (it normalises and pads itself) and exactly the row's own
    prompt; M is 1 (token 0) or 3 (tokens 1..3 with ``multimask``).
    """
    h, w = input_size[prompt.image].tolist()
    record: dict = {"image": image[prompt.image, :, :h, :w] * 255.0, "original_size": (h, w)}
    if prompt.points is not None:
        record["point_coords"] = prompt.points[None]
        record["point_labels"] = prompt.labels[None]
    if prompt.box is not None:
        record["boxes"] = prompt.box[None]
    if prompt.mask is not None:
        record["mask_inputs"] = prompt.mask[None]
    (out,) = sam([record], multimask_output=multimask)
    return out["low_res_logits"][0], out["iou_predictions"][0]


def float64_positional_encoding(sam: Sam) -> Sam:
    """Let segment-anything's random-Fourier positional encoding run in the dtype of its matrix.

    ``PositionEmbeddingRandom`` casts coordinates to float32 (``coords.to(torch.float)``) and builds
    its grid in float32, so a ``sam.double()`` cannot run at all. These instance-level replacements are
    the same arithmetic in the matrix's dtype; in float32 they are SAM's code exactly.
    """
    layer = sam.prompt_encoder.pe_layer

    def forward(size: tuple[int, int]) -> Tensor:
        h, w = size
        matrix = layer.positional_encoding_gaussian_matrix
        grid = torch.ones((h, w), device=matrix.device, dtype=matrix.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        return layer._pe_encoding(torch.stack([x_embed, y_embed], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(coords_input: Tensor, image_size: tuple[int, int]) -> Tensor:
        coords = coords_input.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return layer._pe_encoding(coords.to(layer.positional_encoding_gaussian_matrix.dtype))

    layer.forward = forward
    layer.forward_with_coords = forward_with_coords
    return sam
