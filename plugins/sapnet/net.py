"""SAPNet's selection network: MIL over each point's bag of SAM proposals, on RoI features.

The trainable part is a two-FC RoI head with a classification and an instance branch per stage
(``Shared2FCInstanceMILHead``: 2 shared FCs, ``fc_cls[s]`` and ``fc_ins[s]``; C + 1 outputs in
stage 0, C in stage 1). RoI features come from SAM's frozen image embedding through
``torchvision.ops.roi_align`` (7 × 7, adaptive sampling and half-pixel alignment as the reference's mmcv
``RoIAlign``: ``ROI_SAMPLING_RATIO``), so no second backbone runs; or, the paper's option, from a
feature pyramid (a list of maps, e.g. the plugin's ResNet-50-FPN, P2-P6 at strides 4-64): each RoI reads the
level mmdetection's ``SingleRoIExtractor`` maps it to, ⌊log2(√(wh) / 56)⌋ clamped to the levels
(``roi_levels``).

One call, for N points with P proposals each (all tensors, no per-point Python loops):
1. stage 0 (PSM): d⁰ = selection_score on the P proposals, top-1, clamped to its image (not the padding), then BMS;
   PDG rescales the stage-0 logits of the loss (after the selection, as the reference);
2. stage 1 (PRM): the PNPG bag of P + 20 boxes around the parent proposal, QFL MIL loss weighted
   by w_i = Σ_j d⁰_ij, negatives: random boxes (IoU < 0.3 with every SAM proposal of the image) and
   hard central boxes of large best proposals;
3. the final box: stage-1 top-1, then BMS; the pseudo mask is the proposal with the highest IoU
   with it; MPS ranks 2, 4, 6 of the P proposals by d¹.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from samflow.sam import upcast

from .boxes import aligned_iou, bms, hard_negatives, pdg_phi, pnpg_positives, random_negatives, select_parent
from .mil import mps_ranks, negative_loss, prm_loss, psm_loss, selection_score

__all__ = ["CLS_PRIOR", "INIT_STD", "ROI_SAMPLING_RATIO", "SapnetResult", "SelectionNet", "roi_levels"]

#: The reference's init (``Shared2FCInstanceMILHead``'s ``init_cfg``, applied by mmcv's ``init_weights``):
#: every Linear N(0, 0.01²) with zero bias, then ``fc_cls`` again with its biases at the prior logit
#: -ln((1 - 0.01) / 0.01) ≈ -4.595, so each class's sigmoid starts at 0.01.
INIT_STD = 0.01
CLS_PRIOR = 0.01


#: RoIAlign's samples per bin side: 0 is adaptive, ⌈roi side / size⌉ (on the feature map) per bin side,
#: as the reference's ``roi_layer=dict(type='RoIAlign', output_size=7)``, mmcv 1.5's defaults
#: ``sampling_ratio=0, aligned=True`` (torchvision's ``roi_align`` reads 0 the same way).
ROI_SAMPLING_RATIO = 0


def _roi_align(features: Tensor, rois: Tensor, size: int, scale: float) -> Tensor:
    """RoIAlign (K, C, size, size) of float32 (or float64) ``rois`` on ``features`` of any dtype, as mmcv's
    ``RoIAlign`` with the reference's settings (``ROI_SAMPLING_RATIO``, half-pixel ``aligned``): read in
    the rois' dtype, as torchvision's autocast does, and returned in the features' dtype."""
    out = roi_align(
        features.to(rois.dtype),
        rois,
        size,
        spatial_scale=scale,
        sampling_ratio=ROI_SAMPLING_RATIO,
        aligned=True,
    )
    return out.to(features.dtype)


def roi_levels(boxes: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """Pyramid level (K,) of boxes (K, 4): ⌊log2(√(wh) / finest_scale + 1e-6)⌋ in [0, num_levels − 1]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


@dataclass
class SapnetResult:
    """What one SAPNet pass decides, per point (N rows), besides its losses."""

    losses: dict[str, Tensor]
    score0: Tensor  # (N, P) d⁰, stage-0 selection score
    score1: Tensor  # (N, P + 20) d¹ over the PNPG bag
    phi: Tensor  # (N, P) PDG factor
    bag1: Tensor  # (N, P + 20, 4) the stage-1 bag
    pseudo_box: Tensor  # (N, 4) final pseudo box
    pseudo_index: Tensor  # (N,) proposal whose mask is the pseudo mask
    mps_index: Tensor  # (N, 3) proposals ranked 2, 4, 6 by d¹ (MPS)


def clamp_to_image(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Boxes (N, 4) clamped to their images, x to [0, w] and y to [0, h], with ``sizes`` (N, 2) each
    row's (h, w): the reference clamps a stage's box to ``img_shape`` (the image before padding)."""
    h, w = sizes[:, 0, None].to(boxes.dtype), sizes[:, 1, None].to(boxes.dtype)
    limit = torch.cat([w, h, w, h], 1)
    return torch.minimum(boxes.clamp(min=0), limit)


class SelectionNet(nn.Module):
    """The MIL selection head and the SAPNet pass around it.

    Initialised as the reference's head: Linear weights N(0, ``INIT_STD``²), biases 0, the ``fc_cls``
    biases at the prior logit of ``CLS_PRIOR`` (sigmoid 0.01: the stage-1 and negative losses start
    near their targets for the negatives, not at 0.5).

    Args:
        in_channels: channels of the feature map (SAM's embedding: 256).
        num_classes: C, object classes (labels in [0, C)).
        hidden: width of the two shared FCs (reference: 1024).
        roi_size: RoIAlign output side (reference: 7).
        num_negatives: random negatives per image (reference: 500).
        bms_proposals: how many leading proposals BMS may move toward (reference: 3, SAM's multimask).
        pdg_box_centres: reference quirk: PDG uses the centres of ``centre_boxes`` (the reference's
            ground-truth boxes) instead of the annotated points. Off by default.
        fallback_last_proposal: reference quirk: PNPG grows from the proposal equal to the pseudo box
            within ±1 px, else from the last proposal (index 5). Off: from the stage-0 top-1.
        plus_one: reference quirk: x2, y2 of the final pseudo box + 1, after the mask matching (the
            box handed on, e.g. to the student's scale ranges). Off.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        *,
        hidden: int = 1024,
        roi_size: int = 7,
        num_negatives: int = 500,
        bms_proposals: int = 3,
        pdg_box_centres: bool = False,
        fallback_last_proposal: bool = False,
        plus_one: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.roi_size = roi_size
        self.num_negatives = num_negatives
        self.bms_proposals = bms_proposals
        self.pdg_box_centres = pdg_box_centres
        self.fallback_last_proposal = fallback_last_proposal
        self.plus_one = plus_one
        self.shared = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels * roi_size**2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.fc_cls = nn.ModuleList([nn.Linear(hidden, num_classes + 1), nn.Linear(hidden, num_classes)])
        self.fc_ins = nn.ModuleList([nn.Linear(hidden, num_classes + 1), nn.Linear(hidden, num_classes)])
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, 0.0, INIT_STD)
                nn.init.zeros_(layer.bias)
        for classifier in self.fc_cls:
            assert isinstance(classifier, nn.Linear)
            nn.init.constant_(classifier.bias, -math.log((1 - CLS_PRIOR) / CLS_PRIOR))

    def roi_features(self, features: Tensor | list[Tensor], rois: Tensor, image_size: int) -> Tensor:
        """RoIAlign (K, C, r, r) of rois (K, 5) (image, x1, y1, x2, y2 in input pixels) on one map or a pyramid."""
        if isinstance(features, Tensor):
            return _roi_align(features, rois, self.roi_size, features.shape[-1] / image_size)
        level = roi_levels(rois[:, 1:], len(features))
        out = features[0].new_zeros(rois.shape[0], features[0].shape[1], self.roi_size, self.roi_size)
        for i, feat in enumerate(features):
            idx = torch.nonzero(level == i).squeeze(1)
            if idx.numel():
                scale = feat.shape[-1] / image_size
                out[idx] = _roi_align(feat, rois[idx], self.roi_size, scale)
        return out

    def head(
        self, features: Tensor | list[Tensor], boxes: Tensor, image_index: Tensor, image_size: int, stage: int
    ) -> tuple[Tensor, Tensor]:
        """Class and instance logits (..., C') of boxes (..., 4) on images ``image_index`` (...), in at
        least float32 (the scores and MIL losses are computed from them)."""
        lead = boxes.shape[:-1]
        rois = torch.cat([image_index.reshape(-1, 1).to(boxes.dtype), boxes.reshape(-1, 4)], 1)
        h = self.shared(self.roi_features(features, rois, image_size))
        cls, ins = upcast(self.fc_cls[stage](h)), upcast(self.fc_ins[stage](h))
        return cls.reshape(*lead, -1), ins.reshape(*lead, -1)

    def forward(
        self,
        features: Tensor | list[Tensor],
        image_size: int,
        proposals: Tensor,
        labels: Tensor,
        points: Tensor,
        image_index: Tensor,
        centre_boxes: Tensor | None = None,
        negative_draws: Tensor | None = None,
        image_sizes: Tensor | None = None,
    ) -> SapnetResult:
        """Run both stages.

        Args:
            features: (B, C, h, w) feature map of the square input (side ``image_size``), or a pyramid
                of them, finest first (``roi_levels``).
            proposals: (N, P, 4) boxes in input pixels; labels: (N,) classes; points: (N, 2) x, y;
            image_index: (N,) image of each point; centre_boxes: (N, 4), only with ``pdg_box_centres``;
            negative_draws: the U(0, 1) draws (4, B, num_negatives) behind the random negatives
            (``random_negatives``' ``uniforms``; the plugin's come from each image's sample seed), None:
            drawn from the global generator; image_sizes: (B, 2) each image's (h, w) inside the padded
            input (``SamBatch.input_size``), over which its random negatives are drawn and to which its
            stage boxes are clamped, as the reference does with ``img_shape`` (the image before
            padding); None: the whole input.
        """
        n, p = proposals.shape[:2]
        first = features if isinstance(features, Tensor) else features[0]
        rows = torch.arange(n, device=proposals.device)
        # box geometry in at least float32: bf16 would round a 1024 px frame to 4 px and merge PNPG's boxes
        proposals = proposals.detach().to(torch.promote_types(first.dtype, torch.float32))
        idx_p = image_index[:, None].expand(n, p)
        num_images = first.shape[0]
        if image_sizes is None:
            sizes = torch.full((num_images, 2), image_size, device=proposals.device)
        else:
            sizes = image_sizes.to(proposals.device)
        row_sizes = sizes[image_index]  # (N, 2): each row's image (h, w), where its boxes are clamped

        # stage 0: PSM with PDG
        c0, s0 = self.head(features, proposals, idx_p, image_size, 0)
        d0 = selection_score(c0, s0, labels).detach()
        top0 = d0.argmax(1)
        pseudo0 = bms(clamp_to_image(proposals[rows, top0], row_sizes), proposals, self.bms_proposals)
        if self.pdg_box_centres:
            if centre_boxes is None:
                raise ValueError(
                    "sapnet: pdg_box_centres needs boxes (batch.box); turn it off or give boxes."
                )
            pdg_points = (centre_boxes[:, :2] + centre_boxes[:, 2:]) / 2
        else:
            pdg_points = points
        phi = pdg_phi(pdg_points, labels, image_index, proposals)
        loss_psm = psm_loss(c0, s0, labels, phi)

        # stage 1: PRM on the PNPG bag and negatives
        parent = select_parent(pseudo0, proposals, top0, reference_fallback=self.fallback_last_proposal)
        bag1 = pnpg_positives(proposals, parent, phi)
        q = bag1.shape[1]
        c1, s1 = self.head(features, bag1, image_index[:, None].expand(n, q), image_size, 1)
        weight = d0.sum(1)
        loss_prm = prm_loss(c1, s1, labels, weight)
        neg, neg_image, neg_valid = random_negatives(
            proposals, image_index, sizes, self.num_negatives, uniforms=negative_draws
        )
        hard, hard_valid = hard_negatives(proposals, top0)
        c_neg, _ = self.head(
            features, torch.cat([neg, hard]), torch.cat([neg_image, image_index]), image_size, 1
        )
        loss_neg = negative_loss(c_neg, torch.cat([neg_valid, hard_valid]), weight, n)

        # final box, pseudo mask, MPS
        d1 = selection_score(c1, s1, labels).detach()
        top1 = d1.argmax(1)
        box = bms(clamp_to_image(bag1[rows, top1], row_sizes), proposals, self.bms_proposals)
        iou = aligned_iou(box[:, None], proposals)  # (N, P)
        if self.plus_one:  # after the mask matching, as the reference (SAPNet.py L181-185)
            box = box + box.new_tensor([0, 0, 1, 1])
        return SapnetResult(
            losses={"psm": loss_psm, "prm": loss_prm, "neg": loss_neg},
            score0=d0,
            score1=d1,
            phi=phi,
            bag1=bag1,
            pseudo_box=box,
            pseudo_index=iou.argmax(1),
            mps_index=mps_ranks(d1[:, :p], tuple(r for r in (2, 4, 6) if r <= p)),
        )
