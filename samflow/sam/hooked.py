"""SAM's forward pass with named hook sites, batched over images and prompts.

Only the control flow of SAM's image encoder, two-way transformer and mask decoder is written here;
every weight and layer is SAM's own module. Encoder attention runs through
``scaled_dot_product_attention`` without a mask: SAM's decomposed relative-position term rides in an
augmented query and key (``samflow.sam.rel_pos.rel_pos_attention``). Only when a plugin fills the
``attn_logits`` site (it receives and may change the logits' scale and bias, e.g. BA-SAM) is the term
built as a dense (B, heads, L, L) additive mask: the dense path, with its memory cost. The encoder
block's internals are in ``samflow.sam.encoder_block``, the two-way transformer's in
``samflow.sam.two_way``.

Hook sites, in order: ``on_image`` -> for each encoder block i: ``block_input(i)`` -> block (with
``attn_logits(i)``) -> ``block_output(i)`` -> neck -> prompt encoder -> ``prompts`` -> decoder with
``decoder_layer(i)`` after each layer's token-to-image attention -> heads -> ``decode_token`` ->
``select``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from samflow.batch import SamBatch
from samflow.sam.backbones import Backbone
from samflow.sam.batch_shapes import check_batch_shapes
from samflow.sam.build import freeze
from samflow.sam.cache import EncoderCache, EncoderCacheError, StoredEncoder
from samflow.sam.casts import autocast_dtype, cast_once
from samflow.sam.encoder_block import vit_block
from samflow.sam.ops import dense_pe, embed_box, embed_points, mask_hypernetworks, normalize
from samflow.sam.two_way import two_way
from samflow.sam.types import (
    DecoderContext,
    DecoderFeatures,
    EncodedImages,
    ForwardContext,
    HookSites,
    NoHooks,
    PromptEmbeddings,
    SamOutput,
    running,
)


class HookedSam(nn.Module):
    """A frozen SAM and the hooks (a ``PluginStack``) that fill its sites.

    Args:
        sam: a (frozen) segment-anything ``Sam``.
        plugins: the hooks, usually a ``samflow.plugins.PluginStack``; ``attach`` runs here (plugins
            build their parameters, may wrap SAM modules, and what trains is recorded). None: SAM alone.
        multimask_output: SAM's selection rule: token 0 (False) or best of tokens 1..3 (True).
        checkpoint_blocks: recompute each encoder block in the backward pass instead of keeping its
            activations (activation checkpointing): less memory, about one more encoder forward of
            time, and only in training when gradients flow through the encoder (e.g. SAM-Adapter).
        encoder_cache: reuse the encoder's outputs for images seen before (see ``EncoderCache``);
            only valid when no plugin changes the encoder, which ``check_encoder_cache`` enforces.
        embedding_store: read the encoder's outputs from an embedding store on disk instead of
            running the encoder (``samflow.embed``; set by ``SamflowModule`` once the store is
            checked against the data): images are found by their file (``batch.path``).
    """

    def __init__(
        self,
        sam: Sam,
        plugins: HookSites | None = None,
        multimask_output: bool = False,
        checkpoint_blocks: bool = False,
        encoder_cache: EncoderCache | None = None,
        embedding_store: StoredEncoder | None = None,
    ) -> None:
        super().__init__()
        self.sam = freeze(sam)
        self.plugins = plugins if plugins is not None else NoHooks()
        self.plugins.attach(sam)
        self.multimask_output = multimask_output
        self.checkpoint_blocks = checkpoint_blocks
        self.encoder_cache = encoder_cache
        self.embedding_store = embedding_store
        # the frozen SAM it is built on (a ``samflow.sam_spec.BuiltOn``, a layer above), set by who builds
        # it: ``rebuild.load_trained_checkpoint`` checks a checkpoint's record against it
        self.built_on: object | None = None

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    def train(self, mode: bool = True) -> HookedSam:
        """Plugins follow ``mode``; SAM stays in eval mode (frozen statistics, no dropout), except the
        modules plugins injected into it (e.g. LoRA's dropout), which follow ``mode`` one by one (the
        SAM modules they wrap stay in eval mode)."""
        super().train(mode)
        self.sam.eval()
        for module in self.plugins.injected_modules():
            module.training = mode
        return self

    def forward(self, batch: SamBatch, ctx: ForwardContext | None = None) -> SamOutput:
        """Run SAM with the plugins on a ``SamBatch`` -> ``SamOutput`` (see ``run``)."""
        return self.run(batch, ctx)[0]

    def run(self, batch: SamBatch, ctx: ForwardContext | None = None) -> tuple[SamOutput, DecoderContext]:
        """The whole pass -> (output, the decoder-stage context that ``losses`` hooks receive).

        ``batch.image`` is (B, 3, S, S) in [0, 1]; ``input_size`` (B, 2) marks the unpadded part.
        Prompts are in the S x S input frame, one row per ``image_index`` entry. With
        ``batch.context_image`` the hooks see ``batch.with_context()`` (the encoder runs on the 2B
        images at once, the decoder on the 2N rows) and the output's ``context`` holds the context rows.
        """
        if not isinstance(batch, SamBatch):
            raise TypeError(
                f"HookedSam takes a samflow.batch.SamBatch, got {type(batch).__name__}; "
                "build one with SamBatch(image=..., box=..., ...)."
            )
        check_batch_shapes(batch, self.sam.prompt_encoder)
        ctx = ctx or self.context(batch)
        if batch.context_image is not None:  # views and context views: 2B images, 2N rows, one pass
            ctx = dataclasses.replace(ctx, batch=batch.with_context())
        dctx = DecoderContext.after_encoder(ctx, self.encode(ctx))
        out = self.decode(dctx)
        if ctx.batch.context_rows:
            out = out.split_context(ctx.batch.context_rows, batch.num_images)
        return out, dctx

    def context(self, batch: SamBatch, *, epoch: int = 0, global_step: int = 0) -> ForwardContext:
        """A fresh ``ForwardContext`` for ``batch`` (``epoch`` and ``global_step`` may be given)."""
        return ForwardContext(
            sam=self.sam,
            batch=batch,
            training=self.training,
            epoch=epoch,
            global_step=global_step,
            multimask_output=self.multimask_output,
        )

    # ---- image encoder ----
    def preprocess(self, image: Tensor, input_size: Tensor | None) -> Tensor:
        """SAM's normalisation of a [0, 1] image; padding is zero after normalising, as in SAM."""
        return normalize(self.sam, image, input_size)

    def encode(self, ctx: ForwardContext) -> EncodedImages:
        """Image encoder with hook sites -> ``EncodedImages`` (embeddings, block features, dense PE)."""
        normalized: Tensor | Callable[[], Tensor]
        if self.embedding_store is not None:
            x = ctx.batch.image  # its shape, dtype and device: the pixels may not have been decoded

            def normalized_images() -> Tensor:
                # no encoder runs: the normalised images are computed only if a plugin reads them, and
                # ``ctx.image`` refuses when they were not decoded
                return self.preprocess(ctx.image, ctx.batch.input_size)

            normalized = normalized_images
            self.check_encoder_cache("model.sam.embedding_store")
            if ctx.batch.context_rows:
                raise EncoderCacheError(
                    "model.sam.embedding_store finds images by file, but this batch has context views (two "
                    "resolutions of one file); drop the store for two-resolution data."
                )
            paths = ctx.batch.path
            if len(paths) != x.shape[0]:
                raise EncoderCacheError(
                    f"model.sam.embedding_store finds images by file, but the batch has {len(paths)} paths "
                    f"for {x.shape[0]} images; feed batches from samflow's data module."
                )
            dtype = autocast_dtype(x.device) or x.dtype
            blocks = self.plugins.encoder_features()
            embeddings, features = self.embedding_store.encoded(paths, blocks, x.device, dtype)
        elif self.encoder_cache is None:
            x = normalized = self.preprocess(ctx.image, ctx.batch.input_size)
            embeddings, features = self.run_encoder(x, ctx)
        else:
            x = normalized = self.preprocess(ctx.image, ctx.batch.input_size)
            self.check_encoder_cache()
            blocks = self.plugins.encoder_features()
            embeddings, features = self.encoder_cache.encode(
                x,
                blocks,
                lambda sub: self.run_encoder(sub, ctx),
                "train" if self.training else "eval",
                weights=self.sam.image_encoder.parameters(),  # new weights (load_state_dict) empty it
            )
        pe = self.sam.prompt_encoder
        image_pe = dense_pe(pe.pe_layer, pe.image_embedding_size, embeddings.dtype)
        return EncodedImages(
            normalized=normalized, embeddings=embeddings, features=features, image_pe=image_pe
        )

    def run_encoder(self, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, dict[int, Tensor]]:
        """The encoder on normalised images ``x`` -> (embeddings, {block: output}) for the blocks plugins read."""
        enc = self.sam.image_encoder
        stack = self.plugins
        wanted = set(stack.encoder_features())
        if isinstance(enc, Backbone):  # MobileSAM, EfficientSAM: samflow/sam/backbones
            tokens = enc.embed(x)  # (B, h0, w0, C0)
            stack.on_image(x, tokens, ctx)
            x = enc.add_position(tokens)
        else:
            tokens = enc.patch_embed(x)  # (B, h, w, C)
            stack.on_image(x, tokens, ctx)
            x = tokens + enc.pos_embed if enc.pos_embed is not None else tokens
        features: dict[int, Tensor] = {}
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for i, block in enumerate(enc.blocks):
            if recompute:
                x = checkpoint(self._hooked_block, i, block, x, ctx, use_reentrant=False)
            else:
                x = self._hooked_block(i, block, x, ctx)
            if i in wanted:
                features[i] = x
        return enc.neck(x.permute(0, 3, 1, 2)), features

    def check_encoder_cache(self, option: str = "model.sam.encoder_cache") -> None:
        """Fail when the encoder's outputs are not a pure function of the image, so a cache (or the
        embedding store, ``option``) would be wrong."""
        users = self.plugins.encoder_hook_users()
        owned = self.plugins.trained_encoder_parameters()
        trained = [n for n, p in self.sam.image_encoder.named_parameters() if p.requires_grad]
        if users or owned or trained:
            if users:
                what = f"plugins {', '.join(users)} change it"
            elif owned:
                what = "; ".join(f"plugin {key!r} trains {names[:3]}" for key, names in owned.items())
            else:
                what = f"its parameters {trained[:3]} are trained"
            turn_off = "0" if option.endswith("encoder_cache") else "null"
            raise EncoderCacheError(
                f"{option} is set, but the image encoder's output is not a fixed function of the image: {what}. "
                f"Turn it off ({option}: {turn_off}) for this experiment."
            )

    def _hooked_block(self, i: int, block: Block, x: Tensor, ctx: ForwardContext) -> Tensor:
        # ctx is current_context() for modules inside the block, in the forward and its recomputation
        with running(ctx):
            x = self.plugins.block_input(i, x, ctx)
            enc = self.sam.image_encoder
            if isinstance(enc, Backbone):
                x = enc.run_block(i, x, self.plugins, ctx)
            else:
                x = vit_block(i, block, x, self.plugins, ctx)
            return self.plugins.block_output(i, x, ctx)

    # ---- prompts and mask decoder ----
    def encode_prompts(self, batch: SamBatch, dtype: torch.dtype) -> PromptEmbeddings:
        """SAM's prompt encoder for every row at once -> sparse (N, K, C) with visibility, dense (N, C, h, w).

        Slots per row: the batch's K point slots, one not-a-point slot, two box corners. A row sees
        exactly what SAM's own prompt encoder gives for its prompt: its points (label != -1), the
        not-a-point token only when it has points and no box (as SAM pads), its box corners only
        when it has a box; every other slot is invisible. Rows without a mask prompt get SAM's
        no-mask embedding.
        """
        pe = self.sam.prompt_encoder
        frame = pe.input_image_size
        rows = batch.num_rows
        device = batch.image.device
        sparse = [torch.empty(rows, 0, pe.embed_dim, device=device, dtype=dtype)]
        visible = [torch.empty(rows, 0, dtype=torch.bool, device=device)]
        has_box = batch.box_valid()
        if has_box is None:
            has_box = torch.zeros(rows, dtype=torch.bool, device=device)
        # coordinates stay in at least float32: in bf16 a point at x = 700 of 1024 is 700 or 704
        work = torch.promote_types(dtype, torch.float32)
        if batch.points is not None and batch.point_labels is not None:
            coords = F.pad(batch.points.to(work) + 0.5, (0, 0, 0, 1))  # + SAM's not-a-point slot
            labels = F.pad(batch.point_labels, (0, 1), value=-1)
            points_visible = batch.point_labels != -1  # (N, K)
            pad_visible = points_visible.any(1) & ~has_box
            sparse.append(embed_points(pe, coords, labels, frame, dtype))
            visible += [points_visible, pad_visible[:, None]]
        if batch.box is not None:
            sparse.append(embed_box(pe, batch.box.to(work) + 0.5, frame, dtype))
            visible.append(has_box[:, None].expand(rows, 2))
        grid = pe.image_embedding_size
        no_mask = cast_once(pe, "no_mask", (pe.no_mask_embed.weight,), dtype)
        dense = no_mask.reshape(1, -1, 1, 1).expand(rows, -1, *grid)
        has_mask = batch.mask_prompt_valid()
        if batch.mask_prompt is not None and has_mask is not None:
            embedded = pe.mask_downscaling(batch.mask_prompt.to(dtype))
            dense = torch.where(has_mask.view(-1, 1, 1, 1), embedded, dense)
        return PromptEmbeddings(sparse=torch.cat(sparse, 1), visible=torch.cat(visible, 1), dense=dense)

    def decode(self, ctx: DecoderContext) -> SamOutput:
        """Prompt encoder, two-way transformer and heads with hook sites -> ``SamOutput``."""
        dec = self.sam.mask_decoder
        stack = self.plugins
        index = ctx.image_index
        rows = index.shape[0]
        embeddings = ctx.encoded.embeddings
        prompts = stack.prompts(self.encode_prompts(ctx.batch, embeddings.dtype), ctx)

        sam_tokens = (dec.iou_token.weight, dec.mask_tokens.weight)
        out_tokens = cast_once(dec, "output_tokens", sam_tokens, embeddings.dtype, lambda *t: torch.cat(t))
        extra = stack.output_tokens()
        if extra is not None:
            out_tokens = torch.cat([out_tokens, extra.to(embeddings.dtype)])
        n_out = out_tokens.shape[0]
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(rows, -1, -1), prompts.sparse], 1)
        visible = torch.cat(
            [torch.ones(rows, n_out, dtype=torch.bool, device=tokens.device), prompts.visible], 1
        )

        src = embeddings[index] + prompts.dense  # (N, C, h, w)
        b, c, h, w = src.shape
        pos = ctx.encoded.image_pe.expand(rows, -1, -1, -1)
        hs, keys = two_way(dec.transformer, tokens, visible, src, pos, stack, ctx)
        src = keys.transpose(1, 2).reshape(b, c, h, w)

        upscaled = dec.output_upscaling(src)  # (N, C/8, 4h, 4w)
        mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens]
        hyper = mask_hypernetworks(dec.output_hypernetworks_mlps, mask_tokens)  # (N, M, C/8)
        sam_masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
        iou_pred = dec.iou_prediction_head(hs[:, 0])

        masks = {"sam": sam_masks}
        feats = DecoderFeatures(
            tokens=hs,
            src=src,
            upscaled=upscaled,
            sam_masks=sam_masks,
            iou_pred=iou_pred,
            prompt_tokens=hs[:, n_out:],
        )
        masks.update(stack.decode_tokens(hs[:, 1 + dec.num_mask_tokens : n_out], feats, ctx))
        out = SamOutput(masks=masks, iou_pred=iou_pred, image_index=index)
        chosen = stack.select(out, ctx)
        out.pred = chosen if chosen is not None else out.sam_default(self.multimask_output)
        return out
