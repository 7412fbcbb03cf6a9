"""SAPNet as a samflow plugin: the selection network trains on SAM's frozen image embedding.

SAM itself only makes the proposals (offline, ``samflow proposals``, 6 per point). The plugin adds
no tokens and changes nothing in SAM's forward; its ``losses`` hook runs ``SelectionNet`` on
``ctx.encoded.embeddings`` and returns the PSM, PRM and negative terms. Its decisions per prompt
row (pseudo box, pseudo-mask proposal index, MPS indices, scores) go to ``out.extras["sapnet"]``.

Inputs per prompt row, read from the batch when present:
- ``batch.proposals`` (N, P, 4): the row's proposal boxes in input pixels (P = 6 from
  ``samflow proposals``). Without it the bag is the boxes of SAM's own multimask outputs for the
  row (online mode: 3 proposals), which keeps the plugin usable on any point or box data set.
- ``batch.classes`` (N,) (``CocoBatch``): the row's class index in [0, num_classes) (COCO category
  ids must be mapped to contiguous indices first); without it every row is class 0.
- ``batch.points`` first point (the annotated point); without points, the centre of ``batch.box``,
  else of the first proposal.

**Features.** ``features="sam"`` (default): SAM's frozen embedding, one map at stride 16.
``features="resnet50_fpn"``: the paper's backbone as the reference configures it (``fpn.py``):
torchvision's ResNet-50 (BatchNorm statistics frozen, its weight and bias training in the trainable
stages, as mmdetection's ``norm_eval``; the stem and ``layer1`` frozen: ``resnet_trainable_layers``
3, as the reference's ``frozen_stages=1``) and mmdetection's FPN with the reference's settings (GN(32)
after every conv, no conv bias, no activation, P6 from a stride-2 3 × 3 conv on C5, Xavier-uniform
init), on SAM's normalised input (SAM's pixel statistics are ImageNet's), levels at strides 4, 8, 16,
32, 64; each RoI reads its level as mmdetection's ``SingleRoIExtractor`` (finest scale 56). Its weights
come only from ``resnet_weights``, a file of torchvision's ResNet-50 ImageNet state dict
(``resnet50-*.pth``; ``fc.*`` is ignored; the FPN keeps its init) or of the whole ``body.*`` / ``fpn.*``
backbone; nothing is downloaded. The FPN and the unfrozen ResNet layers train with the head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from samflow.batch import SamBatch
from samflow.plugins import DecoderContext, PluginConfigError, SamPlugin
from samflow.sam import SamOutput, upcast

from .fpn import resnet50_fpn
from .net import SelectionNet

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = ["SAPNet", "masks_to_boxes", "resnet50_fpn"]


def masks_to_boxes(logits: Tensor, size: int) -> Tensor:
    """Boxes (..., 4) in an S × S frame of mask logits (..., h, w) > 0; an empty mask gives the whole frame."""
    h, w = logits.shape[-2:]
    fg = logits > 0
    ys = torch.arange(h, device=logits.device, dtype=logits.dtype)
    xs = torch.arange(w, device=logits.device, dtype=logits.dtype)
    col, row = fg.any(-2), fg.any(-1)  # (..., w), (..., h)
    big = torch.tensor(1e9, dtype=logits.dtype, device=logits.device)
    x1 = torch.where(col, xs, big).amin(-1)
    x2 = torch.where(col, xs + 1, -big).amax(-1)
    y1 = torch.where(row, ys, big).amin(-1)
    y2 = torch.where(row, ys + 1, -big).amax(-1)
    box = torch.stack([x1 * size / w, y1 * size / h, x2 * size / w, y2 * size / h], -1)
    full = box.new_tensor([0, 0, size, size]).expand_as(box)
    return torch.where(col.any(-1)[..., None], box, full)


class SAPNet(SamPlugin):
    """SAPNet (Wei et al., CVPR 2024): point-supervised selection among SAM's proposals.

    Args:
        num_classes: object classes C (COCO: 80).
        hidden: width of the RoI head's two shared FCs (reference: 1024).
        num_negatives: random negative boxes per image (reference: 500).
        pdg_box_centres: reference quirk, off: PDG reads the centres of ``batch.box`` (the
            reference's ground-truth boxes), not the annotated points.
        fallback_last_proposal: reference quirk, off: PNPG grows from the proposal equal to the
            pseudo box within ±1 px, else from the last proposal (index 5); default: the stage-0 top-1.
        plus_one: reference quirk, off: x2, y2 of the final pseudo box + 1 (after the mask matching).
        features: ``"sam"`` (SAM's frozen embedding) or ``"resnet50_fpn"`` (module docstring).
        resnet_weights: with ``resnet50_fpn``, the path of the ResNet-50 weights (required).
        resnet_trainable_layers: with ``resnet50_fpn``, ResNet stages whose convs and BatchNorm weights
            train, from ``layer4`` down (3).
        lr: learning rate of this plugin's parameters (default: the optimizer's).
        weight_decay: weight decay of this plugin's parameters (default: the optimizer's).
    """

    reads_image = True  # ``features: resnet50_fpn`` runs ResNet-50 on the normalised image

    def __init__(
        self,
        num_classes: int = 80,
        hidden: int = 1024,
        num_negatives: int = 500,
        pdg_box_centres: bool = False,
        fallback_last_proposal: bool = False,
        plus_one: bool = False,
        features: Literal["sam", "resnet50_fpn"] = "sam",
        resnet_weights: str | None = None,
        resnet_trainable_layers: int = 3,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        for name, value, low in (
            ("num_classes", num_classes, 1),
            ("hidden", hidden, 1),
            ("num_negatives", num_negatives, 0),
        ):
            if value < low:
                raise ValueError(f"sapnet: {name} must be at least {low}, got {value}.")
        if not 0 <= resnet_trainable_layers <= 5:
            raise ValueError(
                f"sapnet: resnet_trainable_layers must be 0..5 (ResNet-50's stages), got {resnet_trainable_layers}."
            )
        if features not in ("sam", "resnet50_fpn"):
            raise ValueError(f"sapnet: features must be 'sam' or 'resnet50_fpn', got {features!r}.")
        if features == "resnet50_fpn":
            if not resnet_weights:
                raise ValueError(
                    "sapnet: features: resnet50_fpn needs resnet_weights: PATH, a file of torchvision's ResNet-50 "
                    "ImageNet weights (resnet50-*.pth); samflow never downloads weights. Set "
                    "model.plugins.<key>.init_args.resnet_weights, or use features: sam."
                )
            if not Path(resnet_weights).expanduser().is_file():
                raise FileNotFoundError(f"sapnet: resnet_weights {resnet_weights} not found.")
        self.features, self.resnet_weights = features, resnet_weights
        self.resnet_trainable_layers = resnet_trainable_layers
        self.backbone: nn.Module | None = None
        self.options = {
            "num_classes": num_classes,
            "hidden": hidden,
            "num_negatives": num_negatives,
            "pdg_box_centres": pdg_box_centres,
            "fallback_last_proposal": fallback_last_proposal,
            "plus_one": plus_one,
        }
        self.net: SelectionNet | None = None

    def setup(self, sam: Sam) -> None:
        """Build the selection head for SAM's embedding width (or the FPN's 256 channels)."""
        channels = sam.prompt_encoder.embed_dim
        if self.features == "resnet50_fpn":
            assert self.resnet_weights is not None
            self.backbone = resnet50_fpn(self.resnet_weights, self.resnet_trainable_layers)
            channels = 256
        self.net = SelectionNet(channels, **self.options)  # type: ignore[arg-type]

    def feature_maps(self, ctx: DecoderContext) -> Tensor | list[Tensor]:
        """SAM's embedding, or the ResNet-50-FPN levels P2..P6 (strides 4-64) of SAM's normalised input."""
        if self.backbone is None:
            return ctx.encoded.embeddings
        return self.backbone(ctx.encoded.normalized)

    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        """PSM, PRM and negative MIL terms (weights 0.25, 0.25, 0.75 as the reference)."""
        assert self.net is not None, "sapnet: setup() was not called"
        s = batch.size
        # boxes (and the points derived from them) in float32 at least: bf16, SAM's logits under
        # autocast, rounds a 1024 px frame to 4 px
        proposals = getattr(batch, "proposals", None)
        if proposals is None:
            proposals = masks_to_boxes(upcast(out.masks["sam"][:, 1:].detach()), s)
        proposals = upcast(proposals)
        labels = getattr(batch, "classes", None)
        if labels is None:
            labels = torch.zeros(batch.num_rows, dtype=torch.long, device=proposals.device)
        elif len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.net.num_classes:
            raise PluginConfigError(
                f"Plugin {self.key!r} (sapnet): the data's class indices (batch.classes) run "
                f"{int(labels.min())}..{int(labels.max())}, outside [0, {self.net.num_classes}); set "
                f"model.plugins.{self.key}.init_args.num_classes to the data's number of categories "
                f"(at least {int(labels.max()) + 1}) or map category ids to contiguous indices."
            )
        points = row_points(batch, proposals)
        centre_boxes = None
        if batch.box is not None:  # for pdg_box_centres: a row without a box keeps its own point
            valid = batch.box_valid()
            assert valid is not None
            centre_boxes = torch.where(valid[:, None], batch.box.to(points.dtype), points.repeat(1, 2))
        elif self.net.pdg_box_centres:
            raise PluginConfigError(
                f"Plugin {self.key!r} (sapnet): pdg_box_centres reads the centres of the rows' boxes, and "
                f"this data gives no boxes (batch.box); set model.plugins.{self.key}.init_args.pdg_box_centres "
                "false, or give box prompts (data.init_args.prompt box)."
            )
        result = self.net(
            self.feature_maps(ctx),
            s,
            proposals,
            labels,
            points,
            batch.image_index,
            centre_boxes=centre_boxes,
            negative_draws=self.negative_draws(ctx, proposals.device),
            image_sizes=ctx.batch.input_size,  # negatives inside each image, not on its padding
        )
        out.extras["sapnet"] = result
        return result.losses

    def negative_draws(self, ctx: DecoderContext, device: torch.device) -> Tensor:
        """The U(0, 1) draws (4, B, num_negatives) behind the random negatives, each image's from its key
        (``ctx.rand``: the sample seed in training, the image's id in evaluation). An image's negatives
        do not depend on its batch, the DDP rank or the global generator."""
        assert self.net is not None, "sapnet: setup() was not called"
        draws = ctx.rand(f"{self.key}/negatives", (4, self.net.num_negatives), per_image=True, device=device)
        return draws.transpose(0, 1)  # (4, B, num)


def row_points(batch: SamBatch, proposals: Tensor) -> Tensor:
    """Each row's point (N, 2), row by row: its first point, else its box's centre, else the centre of
    its first proposal. A row's choice never depends on the other rows of the batch."""
    points = (proposals[:, 0, :2] + proposals[:, 0, 2:]) / 2
    boxed = batch.box_valid()
    if batch.box is not None and boxed is not None:
        centres = ((batch.box[:, :2] + batch.box[:, 2:]) / 2).to(points.dtype)
        points = torch.where(boxed[:, None], centres, points)
    valid = batch.point_valid()
    if batch.points is not None and valid is not None:
        first = valid.to(torch.uint8).argmax(1)  # the first slot holding a point
        chosen = batch.points[torch.arange(len(first), device=first.device), first].to(points.dtype)
        points = torch.where(valid.any(1)[:, None], chosen, points)
    return points
