"""PA-SAM (Xie et al., ICME 2024): a prompt adapter inside SAM's mask decoder.

In one layer of the two-way transformer (the second, by default), right after its token-to-image
attention, the adapter
1. builds a guide from the image and its edge map (``guiding.py``) and modulates the image tokens
   with it, G = g ⊙ K (dense prompt compensation);
2. re-attends the tokens to G, derives the coarse, refined and uncertainty maps M_C, M_R, M_U and
   replaces the single-mask token by a refined token (``adapter.py``);
3. mines k positive and k negative hard points where the maps disagree and appends them as 2k point
   tokens for the remaining layers (``mining.py``), from epoch ``mining_start_epoch + 1`` in training
   and always in evaluation.

Write-back into the layer (the reference's): the layer's own token-to-image output and the tokens
are padded with 2k zero rows when points are added; then attn_out ← attn_out + A' (A' = the adapter's
tokens including t_R and the point contents), keys ← keys + G, and the point PEs join the tokens'
positional encodings. The layer then goes on as usual (residual, norm, MLP, image-to-token attention).

The prediction is SAM's single-mask output (now produced from the refined token); the maps are exposed
as ``<key>/coarse``, ``<key>/refined`` and ``<key>/uncertainty`` (logits, upsampled to SAM's mask
resolution) and supervised by ``losses`` (``loss.py``).

Where this differs from the reference code (``xzz2/pa-sam``), deliberately:
- edges come from the un-normalised image, with kornia on the model's device; ``reference_edges``
  reproduces the reference's Canny on the wrapped uint8 cast of the normalised image;
- the guide is computed once per image, batched, and shared by that image's prompt rows;
- mined cells are gathered by index; the reference gathers ``ret == 1`` on the straight-through
  values, which equal 1 only up to rounding;
- the auxiliary losses run at SAM's mask resolution rather than at 1024 x 1024 (see ``loss.py``);
- ``M_final`` (computed by the reference, used nowhere) is not produced.
Like the reference, the adapter refines SAM's single-mask token; with ``multimask_output`` the
prediction comes from tokens the adapter does not replace.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor
from typing_extensions import override

from samflow.batch import SamBatch
from samflow.plugins import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    PluginConfigError,
    SamplePanel,
    SamPlugin,
)
from samflow.sam import SamOutput, upcast, zero_padding
from samflow_plugins.pa_sam.adapter import PromptAdapter
from samflow_plugins.pa_sam.guiding import EdgeFilter, GuidingBranch, guiding_input, import_cv2
from samflow_plugins.pa_sam.loss import pa_sam_losses
from samflow_plugins.pa_sam.mining import cell_centres, mine_hard_points, sampling_guidance

#: SAM parts the reference code trains besides the adapter (``reference_trainable``).
REFERENCE_SAM_PARTS = (
    "mask_decoder.output_upscaling",
    "mask_decoder.output_hypernetworks_mlps",
    "mask_decoder.mask_tokens",
)
MAPS = ("coarse", "refined", "uncertainty")


class PASam(SamPlugin):
    """PA-SAM: a prompt adapter with a guiding branch and hard point mining in SAM's mask decoder.

    Trainable by default: the adapter and the guiding branch (372,800 parameters for SAM vit_b/l/h,
    the paper's claim). Adds the loss terms ``coarse_bce``, ``coarse_dice``, ``refined_bce``,
    ``refined_dice`` and ``uncertainty_bce``; the experiment adds BCE + Dice on the prediction.

    Args:
        layer: index of the decoder layer the adapter runs in, after that layer's token-to-image
            attention (default 1, the second layer, as the reference).
        num_points: hard points mined per sign: ``num_points`` positive and ``num_points`` negative
            tokens are appended (default 4 + 4).
        mining_start_epoch: in training, mining is active when the trainer's epoch (0-based,
            ``ctx.epoch``) is greater than this, so from epoch 5 with the default 4, as the reference's
            ``CURRENT_EPOCH > 4``; -1 mines from the start. Always active in evaluation.
        temperature: temperature τ of the Gumbel-softmax top-k used in training.
        edge_filter: edge map of the un-normalised image fed to the guiding branch: ``sobel`` (gradient
            magnitude) or ``canny`` (the reference's Canny settings).
        reference_edges: compute the edge map exactly as the reference does instead (``edge_filter``
            is then ignored), for comparisons with the reference's numbers: OpenCV's
            ``cv2.Canny(im, 10, 100) / 255`` on the CPU, one image at a time, where ``im`` is SAM's
            normalised image resized to the guiding size and cast to uint8 with wrap-around (RGB,
            H x W x 3). Needs the ``opencv`` extra (``pip install 'samflow[opencv]'``); the error names
            it when OpenCV is missing. The kornia ``edge_filter`` is the GPU choice.
        reference_trainable: also train SAM's ``output_upscaling``, ``output_hypernetworks_mlps`` and
            ``mask_tokens``, as the reference code does (634,208 of SAM's parameters; 1,007,008 trainable
            in all with the plugin's own 372,800).
        band_ratio: width of the uncertainty target's boundary band as a fraction of the image diagonal.
        lr: learning rate of this plugin's parameters (default: the optimizer's).
        weight_decay: their weight decay (default: the optimizer's).
    """

    reads_image = True  # the guiding branch's edges are computed from the image

    def __init__(
        self,
        layer: int = 1,
        num_points: int = 4,
        mining_start_epoch: int = 4,
        temperature: float = 1.0,
        edge_filter: EdgeFilter = "sobel",
        reference_edges: bool = False,
        reference_trainable: bool = False,
        band_ratio: float = 0.005,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if edge_filter not in ("sobel", "canny"):
            raise ValueError(f"pa_sam: edge_filter must be 'sobel' or 'canny', got {edge_filter!r}.")
        if num_points < 1:
            raise ValueError(f"pa_sam: num_points must be at least 1, got {num_points}.")
        if not temperature > 0:  # NaN too
            raise ValueError(f"pa_sam: temperature must be positive, got {temperature}.")
        if mining_start_epoch < -1:
            raise ValueError(
                f"pa_sam: mining_start_epoch must be -1 (mine from the start) or an epoch, got {mining_start_epoch}."
            )
        if not band_ratio > 0:
            raise ValueError(
                f"pa_sam: band_ratio must be a positive fraction of the image diagonal, got {band_ratio}."
            )
        self.layer = layer
        self.num_points = num_points
        self.mining_start_epoch = mining_start_epoch
        self.temperature = temperature
        self.edge_filter = edge_filter
        self.reference_edges = reference_edges
        if reference_edges:
            import_cv2()  # a missing OpenCV fails when the experiment is built, not at the first batch
        self.reference_trainable = reference_trainable
        self.band_ratio = band_ratio

    @override
    def setup(self, sam: Sam) -> None:
        decoder = sam.mask_decoder
        depth = len(decoder.transformer.layers)
        if not 0 <= self.layer < depth:
            raise PluginConfigError(
                f"Plugin {self.key!r} (pa_sam): layer {self.layer} does not exist; SAM's decoder has "
                f"{depth} layers, so choose a layer in 0..{depth - 1} (the reference uses 1)."
            )
        grid = sam.prompt_encoder.image_embedding_size
        if self.num_points > grid[0] * grid[1]:
            raise PluginConfigError(
                f"Plugin {self.key!r} (pa_sam): num_points {self.num_points} exceeds the "
                f"{grid[0]} x {grid[1]} embedding grid; choose fewer points."
            )
        reference = decoder.transformer.layers[0].cross_attn_token_to_image
        dim = decoder.transformer_dim
        self.guiding = GuidingBranch(dim)
        downsample = reference.embedding_dim // reference.internal_dim
        self.adapter = PromptAdapter(dim, reference.num_heads, downsample)

    @override
    def sam_modules_to_train(self) -> list[str]:
        return list(REFERENCE_SAM_PARTS) if self.reference_trainable else []

    def mining_active(self, ctx: DecoderContext) -> bool:
        """Whether to mine hard points: always in evaluation, after ``mining_start_epoch`` in training."""
        return not ctx.training or ctx.epoch > self.mining_start_epoch

    def guide(self, ctx: DecoderContext) -> Tensor:
        """The guiding branch's output g for each prompt row, (N, hw, C)."""
        h, w = ctx.encoded.embeddings.shape[-2:]
        # the edges see what SAM sees: nothing of the padding outside each image's input_size
        image = zero_padding(ctx.image, ctx.batch.input_size)
        x = guiding_input(
            image, ctx.encoded.normalized, (4 * h, 4 * w), self.edge_filter, self.reference_edges
        )  # (B, 4, 4h, 4w)
        guide = self.guiding(x)  # (B, C, h, w)
        return guide[ctx.image_index].flatten(2).transpose(1, 2)

    def mining_draws(self, guidance: Tensor, ctx: DecoderContext) -> tuple[Tensor, Tensor]:
        """The U(0, 1) draws (N, hw) behind the positives' and the negatives' Gumbel noise, each row's
        from its sample's seed (``ctx.rand``): a row mines alike in any batch and on any DDP rank."""
        shape, device, dtype = guidance.shape[1:], guidance.device, guidance.dtype
        positive, negative = (
            ctx.rand(f"{self.key}/mining/{sign}", shape, device=device, dtype=dtype)
            for sign in ("positive", "negative")
        )
        return positive, negative

    @override
    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        if i != self.layer:
            return state
        h, w = ctx.encoded.embeddings.shape[-2:]
        grid = (h, w)
        out = self.adapter(state.queries, state.keys, state.query_pe, state.key_pe, self.guide(ctx), grid)
        scratch = ctx.state.setdefault(self.key, {})
        scratch.update(coarse=out.coarse, refined=out.refined, uncertainty=out.uncertainty)

        tokens = out.tokens
        if self.mining_active(ctx):
            probability = upcast(out.uncertainty).sigmoid()  # M_U
            guidance = sampling_guidance(upcast(out.coarse), upcast(out.refined), probability)
            prompt_encoder = ctx.sam.prompt_encoder
            points = mine_hard_points(
                guidance,
                state.keys + out.guided,
                grid,
                prompt_encoder.pe_layer,
                prompt_encoder.point_embeddings,
                self.num_points,
                self.temperature,
                sample=ctx.training,
                uniforms=self.mining_draws(guidance, ctx) if ctx.training else None,
            )
            scratch.update(points=points.cells, point_labels=points.labels)
            zeros = torch.zeros_like(points.content)
            tokens = torch.cat([tokens, points.content], dim=1)
            state = state.append(queries=zeros, attn_out=zeros, query_pe=points.pe)  # visible point tokens
        return dataclasses.replace(state, keys=state.keys + out.guided, attn_out=state.attn_out + tokens)

    @override
    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        scratch = ctx.state.get(self.key, {})
        if "coarse" not in scratch:
            raise RuntimeError(
                f"Plugin {self.key!r} (pa_sam): the adapter did not run in decoder layer {self.layer}; "
                "is the decoder_layer hook called by this HookedSam?"
            )
        size = feats.upscaled.shape[-2:]  # (4h, 4w)
        return {name: F.interpolate(scratch[name], size, mode="bilinear") for name in MAPS}

    @override
    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        coarse, refined, uncertainty = (out.masks[f"{self.key}/{name}"] for name in MAPS)
        return pa_sam_losses(coarse, refined, uncertainty, batch.row_mask, self.band_ratio)

    @override
    def sample_panels(self, out: SamOutput, ctx: DecoderContext) -> dict[str, SamplePanel]:
        """The uncertainty map M_U as a heat map, with the mined hard points (positives green, negatives
        red) when mining ran, as a panel of the validation sample grids."""
        scratch = ctx.state.get(self.key, {})
        points = labels = None
        if "points" in scratch:
            h, w = ctx.encoded.embeddings.shape[-2:]
            points = cell_centres(scratch["points"], (h, w)) * ctx.batch.size  # (N, 2k, 2), S x S frame
            labels = scratch["point_labels"]
        uncertainty = out.masks[f"{self.key}/uncertainty"].sigmoid()
        return {"uncertainty": SamplePanel(uncertainty, "heat", points, labels)}
