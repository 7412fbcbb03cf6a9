"""HQ-SAM: a learnable HQ-Output token whose mask reads fused early-encoder and decoder features.

Ke et al., "Segment Anything in High Quality", NeurIPS 2023 (reference: SysCV/sam-hq). SAM stays
frozen; the plugin adds (C = decoder width, C_vit = encoder width):

- the HQ-Output token (1, C), appended to SAM's output tokens [iou, mask_0..3, hq, prompts]; the frozen
  two-way transformer updates it together with SAM's tokens;
- its head ``hf_mlp`` (C -> C -> C -> C/8), which turns the updated token into a dynamic kernel k;
- the global-local fusion (``fusion.py``) giving the HQ-Features F_hq (N, C/8, 4h, 4w).

    mask_hq     = k . F_hq                       (N, 1, 4h, 4w)
    mask_sam_hq = mask_sam + mask_hq             (the reference's inference default, ``hq_token_only=False``)

``mask_sam`` follows the model's SAM rule: token 0, or with ``multimask_output`` the token among 1..3
with the highest predicted IoU (so, as in the reference, one mask comes out, not three).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import Tensor
from typing_extensions import override

from samflow.batch import SamBatch
from samflow.plugins import DecoderContext, DecoderFeatures, SamplePanel, SamPlugin
from samflow.sam import SamOutput, early_feature, sam_rule
from samflow_plugins.hq_sam.fusion import first_global_block
from samflow_plugins.hq_sam.head import HQHead, apply_kernel
from samflow_plugins.hq_sam.loss import point_bce_dice, point_counts, sample_points

OUTPUTS = ("hq", "sam_hq")


class HQSam(SamPlugin, HQHead):
    """HQ-SAM's HQ-Output token and global-local fusion on a frozen SAM.

    Masks: ``<key>/hq`` (the HQ mask alone) and ``<key>/sam_hq`` (SAM's mask + the HQ mask, logits).
    Trainable: only the new modules (1,071,104 parameters on ViT-B, 1,333,248 on ViT-L, 1,595,392 on
    ViT-H). Their names follow the reference (``hf_token``, ``hf_mlp``, ``compress_vit_feat``,
    ``embedding_encoder``, ``embedding_maskfeature``) and are initialised as there: PyTorch's defaults,
    not copies of SAM's weights.

    Args:
        output: the mask ``select`` returns as the prediction (the one the experiment's losses and the
            metrics see): ``"hq"`` (as HQ-SAM trains and evaluates on HQSeg-44K) or ``"sam_hq"``
            (as HQ-SAM predicts by default, e.g. for COCO).
        point_loss: add HQ-SAM's point-sampled BCE + Dice on the HQ mask as this plugin's loss terms
            ``<key>/point_bce`` and ``<key>/point_dice`` (targets: ``batch["mask"]`` of each row's image).
        num_points: points per mask of the point-sampled loss (HQ-SAM: 112^2 = 12,544).
        oversample_ratio: candidate points per point, among which the most uncertain are kept (3).
        importance_sample_ratio: share of the points taken as the most uncertain candidates, the rest
            uniform (0.75).
        bce_weight: weight of the point-sampled BCE term.
        dice_weight: weight of the point-sampled Dice term.
        lr: learning rate of the new modules (default: the optimizer's; HQ-SAM: Adam 1e-3).
        weight_decay: their weight decay (default: the optimizer's; HQ-SAM: 0).
    """

    onnx_exportable = True  # samflow export --onnx traces its decoder side
    predicts = True  # select: the ``output`` mask

    def __init__(
        self,
        output: str = "hq",
        point_loss: bool = True,
        num_points: int = 112 * 112,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if output not in OUTPUTS:
            raise ValueError(f"hq_sam: output must be one of {OUTPUTS}, got {output!r}.")
        if num_points < 1:
            raise ValueError(f"hq_sam: num_points must be at least 1, got {num_points}.")
        if not oversample_ratio >= 1:  # NaN too
            raise ValueError(f"hq_sam: oversample_ratio must be >= 1, got {oversample_ratio}.")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(
                f"hq_sam: importance_sample_ratio must lie in [0, 1], got {importance_sample_ratio}."
            )
        if not (bce_weight >= 0 and dice_weight >= 0):
            raise ValueError(f"hq_sam: loss weights must be >= 0, got bce {bce_weight}, dice {dice_weight}.")
        self.output = output
        self.point_loss = point_loss
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.early_block = -1  # set in setup: the first global-attention block of the encoder

    @override
    def setup(self, sam: Sam) -> None:
        encoder, decoder = sam.image_encoder, sam.mask_decoder
        dim = decoder.transformer_dim  # C
        self.early_block = first_global_block(encoder)
        vit_dim = early_feature(encoder)[1]  # C_vit (160 for MobileSAM's TinyViT)
        self.build_head(vit_dim, dim)  # hf_token, hf_mlp and the fusion (head.py)

    @override
    def output_tokens(self) -> Tensor:
        return self.hf_token.weight  # (1, C)

    @override
    def encoder_features(self) -> tuple[int, ...]:
        return (self.early_block,)  # F_early: read, never changed, so the encoder stays cacheable

    def hq_features(self, upscaled: Tensor, ctx: DecoderContext) -> Tensor:
        """Global-local fusion F_hq (N, C/8, 4h, 4w): the image terms once per image, then per prompt row."""
        early = ctx.encoded.features[self.early_block]  # (B, h, w, C_vit)
        return self.fused_features(early, ctx.encoded.embeddings, upscaled, ctx.image_index)

    @override
    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        fused = self.hq_features(feats.upscaled, ctx)  # (N, C/8, 4h, 4w)
        hq = apply_kernel(self.kernel(tokens[:, 0]), fused)  # (N, 1, 4h, 4w)
        return {"hq": hq, "sam_hq": sam_rule(feats.sam_masks, feats.iou_pred, ctx.multimask_output) + hq}

    @override
    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor:
        return out.masks[f"{self.key}/{self.output}"]

    @override
    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        if not self.point_loss:
            return {}
        logits = out.masks[f"{self.key}/hq"]
        target = batch.row_mask
        coords = sample_points(
            logits,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            uniforms=self.point_draws(ctx, logits.device),
        )
        bce, dice = point_bce_dice(logits, target, coords)
        return {"point_bce": self.bce_weight * bce, "point_dice": self.dice_weight * dice}

    def point_draws(self, ctx: DecoderContext, device: torch.device) -> tuple[Tensor, Tensor]:
        """The loss's uniform candidates and fresh points, each row's from its image's key (``ctx.rand``:
        the sample seed in training, the image's id in evaluation). A row's loss points do not depend
        on its batch, the DDP rank or the global generator, so the evaluation loss is the same in any
        batches, on any number of processes, and in every epoch."""
        candidates, fresh = point_counts(self.num_points, self.oversample_ratio, self.importance_sample_ratio)
        return (
            ctx.rand(f"{self.key}/points/candidates", (candidates, 2), device=device),
            ctx.rand(f"{self.key}/points/uniform", (fresh, 2), device=device),
        )

    @override
    def sample_panels(self, out: SamOutput, ctx: DecoderContext) -> dict[str, SamplePanel]:
        """The HQ mask alone (``<key>/hq``, probability > 0.5) as a panel of the validation sample grids."""
        return {"hq": SamplePanel(out.masks[f"{self.key}/hq"].sigmoid())}
