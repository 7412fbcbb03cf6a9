"""SOLOv2 student head (Wang et al. 2020) on SAM's frozen image embedding.

The student of SAPNet: trained on pseudo masks, it segments instances without prompts. Input is the
SAM embedding (B, 256, H/16, W/16) (64 x 64 at 1024 px). A small pyramid of ``in_channels`` maps (the
width of the reference's FPN) is made from it:

- stride 8: a 2x2 transposed convolution (stride 2) of the embedding,
- stride 16: a 1x1 convolution,
- stride 32: a 1x1 convolution after 2x2 max pooling,

(``strides`` picks a subset/order of these three). Per level the features, with two CoordConv channels
(x, y in [-1, 1]), are resized to an S x S grid; a kernel branch predicts per cell a dynamic 1x1 kernel
of ``mask_channels`` weights and a category branch (the same grid, without the coordinates) the class
logits. The mask-feature branch sums all levels at stride 8 (plus CoordConv): a 3x3 conv to
``mask_feat_channels`` and a 1x1 conv to ``mask_channels``, each with GroupNorm and ReLU (the
reference's ``conv_pred`` is a ``ConvModule`` with GN and ReLU), into (B, mask_channels, H/8, W/8); an
instance mask is the kernel of a cell applied to it. Every conv of the branches starts N(0, 0.01^2)
with zero bias, the category bias at the 0.01 prior (mmdetection's ``init_cfg``).

Targets: an instance goes to every level whose scale range holds sqrt(box w x h) (the mask's box, or
the ``boxes`` given); the positive cells are the centre region (``sigma`` x half the box around the
mask's centre of mass, in pixel-area coordinates: pixel i spans [i, i + 1)), at most 3 x 3 cells around
the centre cell. Where two instances' regions meet on a level, the smaller instance takes the cell
(category and mask target). Scale ranges are fractions of the longer input side, so one config serves
any image size (the defaults, x 1024 px: (0, 128), (64, 256), (128, 2048)). Mask targets are the
masks averaged over 8 x 8 pixel blocks, >= 0.5.
Losses: sigmoid focal (alpha 0.25, gamma 2) over all cells / (positives + 1); dice with eps 1e-3 on
both sums (weight 3) on the positives' masks at stride 8, averaged over the positives. Inference:
2 x 2 local maxima of the category scores above ``score_thr``, masks > ``mask_thr`` with more pixels
(at stride 8) than their level's stride, score x mean probability inside the mask, Matrix NMS,
scores >= ``filter_thr``, top ``max_per_img``; the kept probabilities are resized to the input, cropped
to the image, resized to the output size and thresholded at ``mask_thr``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from samflow.instance.matrix_nms import matrix_nms

_BUILDERS = (8, 16, 32)
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # -4.595: sigmoid 0.01


def _coords(x: Tensor) -> Tensor:
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.cat([x, gx.expand(b, 1, h, w), gy.expand(b, 1, h, w)], 1)


def _conv_gn_relu(cin: int, cout: int, groups: int, kernel: int = 3) -> list[nn.Module]:
    """A conv (no bias: a norm follows), GroupNorm (``groups``, or their gcd with a narrower width), ReLU."""
    return [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(math.gcd(groups, cout), cout),
        nn.ReLU(inplace=True),
    ]


def _conv_stack(cin: int, cout: int, n: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[m for i in range(n) for m in _conv_gn_relu(cin if i == 0 else cout, cout, groups)])


def mask_boxes(masks: Tensor) -> Tensor:
    """(N, 4) boxes x0, y0, x1, y1 of ``masks`` (N, H, W) in pixel-area coordinates (x1 = last column
    + 1); an empty mask's box is all zeros."""
    boxes = masks.new_zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if ys.numel():
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return boxes


class SOLOv2Head(nn.Module):
    """SOLOv2 on a pyramid made from SAM's stride-16 embedding.

    API: ``head(features) -> outputs`` (a dict), ``head.loss(outputs, targets) -> dict`` with
    ``loss_cls``, ``loss_mask`` and ``loss`` (their sum), ``head.predict(outputs, image_size,
    output_size)`` -> per image ``(masks (K, h, w) bool, scores (K,), labels (K,))``.

    Widths and settings default to the SAPNet config's ``SOLOV2Head`` (``SAPNet_r50_fpn_1x_coco.py``);
    the levels are three, made from the one embedding (the reference: five FPN levels).

    Args:
        num_classes: object classes (no background class).
        in_channels: channels of the embedding and of the pyramid (256 for SAM; the reference's 256).
        embed_stride: input pixels per embedding cell (16 for SAM).
        feat_channels: width of the kernel and category branches (512).
        mask_feat_channels: width of the mask-feature branch (128).
        mask_channels: length of the dynamic kernels and channels of the mask features (256).
        num_convs: stacked 3x3 conv + GN + ReLU in each branch (4).
        strides: pyramid levels, a subset of 8, 16, 32.
        num_grids: S per level (the reference at 1333 x 800: 40, 36, 24, 16, 12 on five levels).
        scale_ranges: per level (lo, hi) of sqrt(box area) as fractions of the longer input side.
        sigma: centre-region scale (0.2, the reference's ``pos_scale``).
        focal_alpha, focal_gamma, dice_weight: loss settings (0.25, 2, 3).
        score_thr, mask_thr, filter_thr, nms_pre, max_per_img, nms_kernel, nms_sigma: inference
            (0.1, 0.5, 0.05, 500, 100, gaussian, 2.0).
        gn_groups: GroupNorm groups (32; a narrower width takes gcd(gn_groups, width)).
    """

    mask_stride = 8
    #: the options that only ``predict`` reads (the validations' and the test's detections, not the loss)
    INFERENCE_OPTIONS = (
        "score_thr",
        "mask_thr",
        "filter_thr",
        "nms_pre",
        "max_per_img",
        "nms_kernel",
        "nms_sigma",
    )

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 256,
        embed_stride: int = 16,
        feat_channels: int = 512,
        mask_feat_channels: int = 128,
        mask_channels: int = 256,
        num_convs: int = 4,
        strides: Sequence[int] = (8, 16, 32),
        num_grids: Sequence[int] = (36, 24, 16),
        scale_ranges: Sequence[tuple[float, float]] = ((0.0, 0.125), (0.0625, 0.25), (0.125, 2.0)),
        sigma: float = 0.2,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_weight: float = 3.0,
        score_thr: float = 0.1,
        mask_thr: float = 0.5,
        filter_thr: float = 0.05,
        nms_pre: int = 500,
        max_per_img: int = 100,
        nms_kernel: Literal["gaussian", "linear"] = "gaussian",
        nms_sigma: float = 2.0,
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        if not (len(strides) == len(num_grids) == len(scale_ranges)):
            raise ValueError(
                "SOLOv2Head: strides, num_grids and scale_ranges need one entry per level, got "
                f"{len(strides)}, {len(num_grids)} and {len(scale_ranges)}"
            )
        if any(s not in _BUILDERS for s in strides):
            raise ValueError(f"SOLOv2Head: strides must be among {_BUILDERS}, got {tuple(strides)}")
        self.num_classes = num_classes
        self.embed_stride = embed_stride
        self.strides = tuple(strides)
        self.num_grids = tuple(num_grids)
        self.scale_ranges = tuple((float(a), float(b)) for a, b in scale_ranges)
        self.sigma = sigma
        self.focal_alpha, self.focal_gamma, self.dice_weight = focal_alpha, focal_gamma, dice_weight
        self.score_thr, self.mask_thr, self.filter_thr = score_thr, mask_thr, filter_thr
        self.nms_pre, self.max_per_img = nms_pre, max_per_img
        self.nms_kernel, self.nms_sigma = nms_kernel, nms_sigma
        c = in_channels
        self.up = nn.ConvTranspose2d(c, c, 2, stride=2)  # stride 8
        self.lat = nn.Conv2d(c, c, 1)  # stride 16
        self.down = nn.Conv2d(c, c, 1)  # stride 32, after max pooling
        self.kernel_convs = _conv_stack(c + 2, feat_channels, num_convs, gn_groups)
        self.cate_convs = _conv_stack(c, feat_channels, num_convs, gn_groups)
        self.kernel_out = nn.Conv2d(feat_channels, mask_channels, 3, padding=1)
        self.cate_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.mask_branch = nn.Sequential(
            *_conv_gn_relu(c + 2, mask_feat_channels, gn_groups),
            *_conv_gn_relu(mask_feat_channels, mask_channels, gn_groups, kernel=1),
        )
        for branch in (self.kernel_convs, self.cate_convs, self.kernel_out, self.cate_out, self.mask_branch):
            for m in branch.modules():
                if isinstance(m, nn.Conv2d):  # mmdetection's Normal(layer='Conv2d', std=0.01), bias 0
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        nn.init.constant_(self.cate_out.bias, PRIOR_BIAS)  # type: ignore[arg-type]

    def pyramid(self, x: Tensor) -> list[Tensor]:
        """The levels of ``strides`` made from the embedding ``x`` (B, C, h, w)."""
        made = {8: lambda: self.up(x), 16: lambda: self.lat(x), 32: lambda: self.down(F.max_pool2d(x, 2))}
        return [made[s]() for s in self.strides]

    def forward(self, features: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """``features``: SAM's embedding (B, in_channels, H/16, W/16). Returns ``cate`` (per level
        (B, num_classes, S, S) logits), ``kernel`` (per level (B, mask_channels, S, S)) and ``mask_feat``
        (B, mask_channels, H/8, W/8)."""
        levels = self.pyramid(features)
        h8, w8 = features.shape[-2] * self.embed_stride // 8, features.shape[-1] * self.embed_stride // 8
        cates, kernels = [], []
        for feat, s in zip(levels, self.num_grids, strict=True):
            g = F.interpolate(_coords(feat), size=(s, s), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_out(self.kernel_convs(g)))
            cates.append(self.cate_out(self.cate_convs(g[:, :-2])))
        fused = sum(F.interpolate(f, size=(h8, w8), mode="bilinear", align_corners=False) for f in levels)
        assert isinstance(fused, Tensor)
        mask_feat = self.mask_branch(_coords(fused))
        return {"cate": cates, "kernel": kernels, "mask_feat": mask_feat}

    # ---------------------------------------------------------------- targets
    def assign(
        self, masks: Tensor, labels: Tensor, input_size: tuple[int, int], boxes: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per level ``(cate_target (S, S) long, num_classes = background; pos (S, S) bool; idx (S, S)
        long)``: idx is the instance of each positive cell. ``masks`` (N, H, W) at ``input_size``;
        ``boxes`` (N, 4) x0, y0, x1, y1 for the scale and the centre region (default: the masks' boxes;
        SAPNet's MPS passes the pseudo masks' boxes with the MPS masks). Empty masks are left out."""
        h_in, w_in = input_size
        side = float(max(h_in, w_in))
        out = []
        found: list[tuple[int, float, float, float, float, float, float]] = []
        for i in range(masks.shape[0]):  # (i, x0, y0, x1, y1, cy, cx) of the non-empty instances
            ys, xs = torch.nonzero(masks[i], as_tuple=True)
            if ys.numel() == 0:
                continue
            x0, y0, x1, y1 = (
                (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
                if boxes is None
                else tuple(float(v) for v in boxes[i])
            )
            if (x1 - x0) * (y1 - y0) <= 0:
                continue  # a given box without area (of an empty mask): no scale, no cell
            found.append(
                (i, x0, y0, x1, y1, ys.double().mean().item() + 0.5, xs.double().mean().item() + 0.5)
            )
        found.sort(key=lambda f: -(f[3] - f[1]) * (f[4] - f[2]))  # larger first: smaller cells win
        for (lo, hi), s in zip(self.scale_ranges, self.num_grids, strict=True):
            cate = torch.full((s, s), self.num_classes, dtype=torch.long)
            pos = torch.zeros((s, s), dtype=torch.bool)
            idx = torch.full((s, s), -1, dtype=torch.long)
            for i, x0, y0, x1, y1, cy, cx in found:
                scale = ((x1 - x0) * (y1 - y0)) ** 0.5 / side
                if not (lo <= scale <= hi):
                    continue
                half_h, half_w = 0.5 * (y1 - y0) * self.sigma, 0.5 * (x1 - x0) * self.sigma
                ch, cw = int(cy / h_in * s), int(cx / w_in * s)
                top_b = max(0, math.floor((cy - half_h) / h_in * s))
                down_b = min(s - 1, math.floor((cy + half_h) / h_in * s))
                left_b = max(0, math.floor((cx - half_w) / w_in * s))
                right_b = min(s - 1, math.floor((cx + half_w) / w_in * s))
                top, down = max(top_b, ch - 1), min(down_b, ch + 1)
                left, right = max(left_b, cw - 1), min(right_b, cw + 1)
                cate[top : down + 1, left : right + 1] = int(labels[i])
                pos[top : down + 1, left : right + 1] = True
                idx[top : down + 1, left : right + 1] = i
            out.append((cate, pos, idx))
        return out

    # ------------------------------------------------------------------ loss
    def loss(
        self, outputs: Mapping[str, Tensor | list[Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Focal category loss and dice mask loss. ``targets`` per image: ``masks`` (N, H, W) binary at
        the input size (the embedding's size x 16, padded region included), ``labels`` (N,) in
        [0, num_classes) and optionally ``boxes`` (N, 4) (``assign``)."""
        cates, kernels, mask_feat = outputs["cate"], outputs["kernel"], outputs["mask_feat"]
        assert isinstance(cates, list) and isinstance(kernels, list) and isinstance(mask_feat, Tensor)
        h8, w8 = int(mask_feat.shape[-2]), int(mask_feat.shape[-1])
        input_size: tuple[int, int] = (int(h8) * self.mask_stride, int(w8) * self.mask_stride)
        cls_preds, cls_targets, dice = [], [], []
        for b, t in enumerate(targets):
            masks = t["masks"].to(mask_feat.device)
            if tuple(masks.shape[-2:]) != input_size:
                raise ValueError(
                    f"SOLOv2Head.loss: target masks of image {b} are {tuple(masks.shape[-2:])}, the "
                    f"input size is {input_size} (embedding x {self.embed_stride}); pad them"
                )
            small = (
                F.interpolate(masks[None].float(), size=(h8, w8), mode="area")[0] >= 0.5
                if masks.shape[0]
                else masks.new_zeros((0, h8, w8), dtype=torch.bool)
            ).float()
            flat_feat = mask_feat[b].flatten(1)
            boxes = t.get("boxes")
            levels = self.assign(
                masks.cpu().bool(), t["labels"].cpu(), input_size, None if boxes is None else boxes.cpu()
            )
            for lvl, (cate_t, pos, idx) in enumerate(levels):
                logits = cates[lvl][b].permute(1, 2, 0).reshape(-1, self.num_classes)
                onehot = F.one_hot(cate_t.flatten(), self.num_classes + 1)[:, : self.num_classes]
                cls_preds.append(logits)
                cls_targets.append(onehot.to(logits))
                if pos.any():
                    k = kernels[lvl][b].permute(1, 2, 0)[pos.to(mask_feat.device)]  # (P, E)
                    pred = torch.sigmoid(k @ flat_feat)
                    tgt = small[idx[pos].to(mask_feat.device)].flatten(1)
                    inter = (pred * tgt).sum(1)
                    denom = ((pred**2).sum(1) + 1e-3) + ((tgt**2).sum(1) + 1e-3)
                    dice.append(1 - 2 * inter / denom)
        pred_all, tgt_all = torch.cat(cls_preds), torch.cat(cls_targets)
        num_pos = int(tgt_all.sum().item())
        loss_cls = sigmoid_focal_loss(
            pred_all, tgt_all, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        ) / (num_pos + 1)
        if dice:
            loss_mask = torch.cat(dice).mean() * self.dice_weight
        else:
            loss_mask = mask_feat.sum() * 0 + sum(k.sum() * 0 for k in kernels)
        return {"loss_cls": loss_cls, "loss_mask": loss_mask, "loss": loss_cls + loss_mask}

    # ------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self,
        outputs: Mapping[str, Tensor | list[Tensor]],
        image_size: tuple[int, int] | Sequence[tuple[int, int]],
        output_size: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image ``(masks (K, h, w) bool, scores (K,), labels (K,))``, K <= max_per_img, scores
        descending. ``image_size``: the (h, w) of the valid (unpadded) input region, one for all
        images or one per image; ``output_size`` (default ``image_size``): the (h, w) of the masks
        returned (e.g. the original image's), the cropped probabilities resized to it, then thresholded."""
        cates, kernels, mask_feat = outputs["cate"], outputs["kernel"], outputs["mask_feat"]
        assert isinstance(cates, list) and isinstance(kernels, list) and isinstance(mask_feat, Tensor)
        bsz = mask_feat.shape[0]
        per_image = lambda size: [size] * bsz if isinstance(size[0], int) else list(size)
        sizes: list[Any] = per_image(image_size)
        outs: list[Any] = sizes if output_size is None else per_image(output_size)
        h8, w8 = int(mask_feat.shape[-2]), int(mask_feat.shape[-1])
        # the stride of each cell's level: a mask must have more pixels than it (the reference's rule)
        cell_stride = torch.cat(
            [torch.full((s * s,), float(st)) for s, st in zip(self.num_grids, self.strides, strict=True)]
        ).to(mask_feat.device)
        results = []
        for b in range(bsz):
            scores_l, kern_l = [], []
            for c, k in zip(cates, kernels, strict=True):
                p = torch.sigmoid(c[b : b + 1])
                keep = F.max_pool2d(p, 2, stride=1, padding=1)[..., :-1, :-1] == p  # 2x2 local max
                scores_l.append((p * keep)[0].permute(1, 2, 0).reshape(-1, self.num_classes))
                kern_l.append(k[b].permute(1, 2, 0).reshape(-1, k.shape[1]))
            cate_scores, kern = torch.cat(scores_l), torch.cat(kern_l)
            hi, wi = int(sizes[b][0]), int(sizes[b][1])
            ho, wo = int(outs[b][0]), int(outs[b][1])
            empty = (
                torch.zeros((0, ho, wo), dtype=torch.bool, device=mask_feat.device),
                cate_scores.new_zeros(0),
                torch.zeros(0, dtype=torch.long, device=mask_feat.device),
            )
            cell, label = torch.nonzero(cate_scores > self.score_thr, as_tuple=True)
            if cell.numel() == 0:
                results.append(empty)
                continue
            scores = cate_scores[cell, label]
            probs = torch.sigmoid(kern[cell] @ mask_feat[b].flatten(1)).view(-1, h8, w8)
            seg = probs > self.mask_thr
            area = seg.flatten(1).sum(1).float()
            ok = area > cell_stride[cell]
            probs, seg, area, scores, label = probs[ok], seg[ok], area[ok], scores[ok], label[ok]
            if scores.numel() == 0:
                results.append(empty)
                continue
            scores = scores * (probs * seg).flatten(1).sum(1) / area
            order = scores.argsort(descending=True)[: self.nms_pre]
            probs, seg, area, scores, label = (
                probs[order],
                seg[order],
                area[order],
                scores[order],
                label[order],
            )
            scores = matrix_nms(
                seg, label, scores, kernel=self.nms_kernel, sigma=self.nms_sigma, mask_area=area
            )
            keep = scores >= self.filter_thr
            probs, scores, label = probs[keep], scores[keep], label[keep]
            order = scores.argsort(descending=True)[: self.max_per_img]
            probs, scores, label = probs[order], scores[order], label[order]
            if scores.numel() == 0:
                results.append(empty)
                continue
            up = F.interpolate(
                probs[None],
                size=(h8 * self.mask_stride, w8 * self.mask_stride),
                mode="bilinear",
                align_corners=False,
            )[:, :, :hi, :wi]
            up = F.interpolate(up, size=(ho, wo), mode="bilinear", align_corners=False)
            results.append((up[0] > self.mask_thr, scores, label))
        return results
