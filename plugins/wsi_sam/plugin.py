"""WSI-SAM: high- and low-resolution HQ-style heads whose kernels are aggregated.

Liu et al., "WSI-SAM: Multi-resolution Segment Anything Model (SAM) for histopathology whole-slide
images", 2024. Two concentric patches of a slide, HR (10x) and LR (5x, the HR field is its central
half), go through the same frozen SAM: ``SamBatch.image`` holds HR, ``SamBatch.context_image`` LR,
and the model encodes both as one batch of 2B and decodes every prompt row in both views (the LR
row's prompt mapped by the patches' geometry). Each view has its own head (``HQHead``: token
``hf_token``, kernel MLP 256 -> 256 -> 256 -> 32, early-feature compression, embedding encoder,
mask-feature convolution) reading the first global-attention block's output. After each view's
two-way transformer (C/8 = 32):

    k_HR = hf_mlp_HR(t_HR),  k_LR = hf_mlp_LR(t_LR)                  (N, 32)
    k    = k_HR + k_LR   (aggregation "sum", the reference code)
         | (k_HR + k_LR) / 2   ("mean", the paper's "average")
    y_HR = k . U_HR,  y_LR = k . U_LR                                (N, 1, 4h, 4w)
    y    = y_HR + M_sam^HR   ("error correction": SAM's own HR logits, at inference: token 0, or
                              with model.sam.multimask_output the best of tokens 1..3, as HQ-SAM's)

Each view's token is appended to its own row's sparse prompts (the two-way transformer has no
token order, so this equals the reference's ``[iou, mask_0..3, token, prompts]``), so an HR row
never sees the LR token and the reverse, as with the reference's two decoders.

Train/inference difference of the reference, kept by default: the losses read y_HR and y_LR
without SAM's logits, the prediction adds them (``correct_in_training: true`` adds them in
training too). Without context views (a batch with no ``context_image``) only the HR head runs
(k = k_HR) and the LR loss is absent.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import Tensor
from typing_extensions import override

from samflow.batch import SamBatch
from samflow.plugins import DecoderContext, DecoderFeatures, PromptEmbeddings, SamPlugin
from samflow.sam import SamOutput, early_feature, sam_rule
from samflow_plugins.hq_sam.fusion import first_global_block
from samflow_plugins.hq_sam.head import HQHead, apply_kernel
from samflow_plugins.wsi_sam.loss import dice_bce

AGGREGATIONS = ("sum", "mean")


class WSISam(SamPlugin):
    """WSI-SAM's HR and LR heads on a frozen SAM (see the module docstring).

    Masks: ``<key>/wsi`` (y_HR; its ``context`` rows hold y_LR) and ``<key>/wsi_sam`` (y_HR + SAM's
    mask). Trainable: the two heads only (2,142,208 parameters on ViT-B, 2,666,496 on ViT-L,
    3,190,784 on ViT-H), as ``high.*`` and ``low.*`` (the reference's ``MaskDecoderHigh`` / ``Low``).

    Args:
        aggregation: ``"sum"`` (k = k_HR + k_LR, the reference code) or ``"mean"`` (their average,
            the paper's wording; it halves the logits of the sum).
        error_correction: at inference, predict y_HR + SAM's own HR logits (the reference): token 0,
            or with ``model.sam.multimask_output`` the token of 1..3 with the highest predicted IoU
            (``sam_rule``, as HQ-SAM's ``masks_sam``); False predicts y_HR.
        correct_in_training: add SAM's logits in training too (the losses then see the corrected
            masks; the reference trains without them).
        loss: add the loss terms ``<key>/dice_hr``, ``bce_hr``, ``dice_lr``, ``bce_lr`` (squared
            Dice + BCE at full resolution on both views; LR targets are ``batch.context_mask``).
        hr_weight: weight of the HR terms ``dice_hr`` and ``bce_hr`` (reference: 1).
        lr_weight: weight of the LR terms ``dice_lr`` and ``bce_lr`` (reference: 1).
        lr: learning rate of the heads (WSI-SAM: AdamW, 1e-3; default: the optimizer's).
        weight_decay: weight decay of the heads (WSI-SAM: 0.01; default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx: the HR head is traced (no context views at prediction)
    predicts = True  # select: y_HR, or y_HR + SAM's mask

    def __init__(
        self,
        aggregation: str = "sum",
        error_correction: bool = True,
        correct_in_training: bool = False,
        loss: bool = True,
        hr_weight: float = 1.0,
        lr_weight: float = 1.0,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"wsi_sam: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
        if hr_weight < 0 or lr_weight < 0:
            raise ValueError(f"wsi_sam: loss weights must be >= 0, got hr {hr_weight}, lr {lr_weight}.")
        self.aggregation = aggregation
        self.error_correction = error_correction
        self.correct_in_training = correct_in_training
        self.loss = loss
        self.hr_weight = hr_weight
        self.lr_weight = lr_weight
        self.early_block = -1  # set in setup: the first global-attention block

    @override
    def setup(self, sam: Sam) -> None:
        encoder = sam.image_encoder
        dim = sam.mask_decoder.transformer_dim  # C
        self.early_block = first_global_block(encoder)
        vit_dim = early_feature(encoder)[1]  # C_vit (160 for MobileSAM's TinyViT, as HQ-SAM)
        self.high = HQHead.create(vit_dim, dim)
        self.low = HQHead.create(vit_dim, dim)

    @override
    def encoder_features(self) -> tuple[int, ...]:
        return (self.early_block,)

    @override
    def prompts(self, prompts: PromptEmbeddings, ctx: DecoderContext) -> PromptEmbeddings:
        rows, views = ctx.batch.num_rows, ctx.batch.context_rows  # views: N when rows [N, 2N) are LR
        dtype = prompts.sparse.dtype
        hr, lr = self.high.hf_token.weight.to(dtype), self.low.hf_token.weight.to(dtype)  # (1, C) each
        token = hr.expand(rows, -1) if not views else torch.cat([hr.expand(views, -1), lr.expand(views, -1)])
        ctx.state.setdefault(self.key, {})["slot"] = prompts.sparse.shape[1]
        return prompts.append(token.unsqueeze(1))

    @override
    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        assert feats.prompt_tokens is not None
        token = feats.prompt_tokens[:, ctx.state[self.key]["slot"]]  # (rows, C) after the transformer
        early = ctx.encoded.features[self.early_block]  # (images, h, w, C_vit)
        embeddings, index, views = ctx.encoded.embeddings, ctx.image_index, ctx.batch.context_rows
        if not views:  # no context views: the HR head alone
            u_hr = self.high.fused_features(early, embeddings, feats.upscaled, index)
            return self._outputs([apply_kernel(self.high.kernel(token), u_hr)], feats, ctx)
        b = ctx.batch.num_images // 2
        hr, lr = slice(0, views), slice(views, None)
        u_hr = self.high.fused_features(early[:b], embeddings[:b], feats.upscaled[hr], index[hr])
        u_lr = self.low.fused_features(early[b:], embeddings[b:], feats.upscaled[lr], index[lr] - b)
        k = self.high.kernel(token[hr]) + self.low.kernel(token[lr])  # (N, C/8): token aggregation
        if self.aggregation == "mean":
            k = k / 2
        return self._outputs([apply_kernel(k, u_hr), apply_kernel(k, u_lr)], feats, ctx)

    def _outputs(self, masks: list[Tensor], feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        wsi = torch.cat(masks)  # (rows, 1, 4h, 4w): y_HR, then y_LR for the context rows
        return {"wsi": wsi, "wsi_sam": wsi + sam_rule(feats.sam_masks, feats.iou_pred, ctx.multimask_output)}

    @override
    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor:
        corrected = self.correct_in_training if ctx.training else self.error_correction
        return out.masks[f"{self.key}/{'wsi_sam' if corrected else 'wsi'}"]

    @override
    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        if not self.loss:
            return {}
        name = f"{self.key}/{'wsi_sam' if self.correct_in_training else 'wsi'}"
        size = batch.size
        dice, bce = dice_bce(out.masks[name], batch.row_mask, size)
        terms = {"dice_hr": self.hr_weight * dice, "bce_hr": self.hr_weight * bce}
        if out.context is not None:
            if batch.context_mask is None:
                raise ValueError(
                    "wsi_sam: the batch has context images but no context_mask; the LR loss needs the "
                    "ground truth of the low-resolution patch (or set loss: false)."
                )
            dice, bce = dice_bce(out.context.masks[name], batch.context_mask[out.context.image_index], size)
            terms.update(dice_lr=self.lr_weight * dice, bce_lr=self.lr_weight * bce)
        return terms
