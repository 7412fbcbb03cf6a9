"""SAM's forward pass with named hook sites, batched over images and prompts.

Only the control flow of SAM's image encoder, two-way transformer and mask decoder is written here;
every weight and layer is SAM's own module. Encoder attention runs through
``scaled_dot_product_attention`` without a mask: SAM's decomposed relative-position term rides in an
augmented query and key (``samflow.sam.ops.rel_pos_attention``). Only when a plugin fills the
``attn_logits`` site (it receives and may change the logits' scale and bias, e.g. BA-SAM) is the term
built as a dense (B, heads, L, L) additive mask: the dense path, with its memory cost.

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
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from samflow.batch import SamBatch
from samflow.sam.backbones import Backbone
from samflow.sam.build import freeze
from samflow.sam.cache import EncoderCache, EncoderCacheError, StoredEncoder
from samflow.sam.casts import autocast_dtype, cast_once
from samflow.sam.ops import (
    attend,
    decomposed_rel_pos_bias,
    dense_pe,
    embed_box,
    embed_points,
    has_forward_hooks,
    key_bias,
    mask_hypernetworks,
    normalize,
    rel_pos_attention,
    window_partition,
    window_unpartition,
)
from samflow.sam.types import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    EncodedImages,
    ForwardContext,
    HookSites,
    NoHooks,
    PromptEmbeddings,
    SamOutput,
)


def _needs_grad(*items: Tensor | nn.Module) -> bool:
    """Whether autograd records anything computed from these tensors and modules' parameters."""
    if not torch.is_grad_enabled():
        return False
    return any(
        item.requires_grad if isinstance(item, Tensor) else any(p.requires_grad for p in item.parameters())
        for item in items
    )


MLP_TOKENS = 1024
"""Tokens per piece of ``_mlp_residual_in_place`` (a vit_b hidden layer of 1024 tokens: 12 MiB in fp32)."""


def _mlp_residual_in_place(block: Block, x: Tensor) -> Tensor:
    """``x + block.mlp(block.norm2(x))`` at inference, written into ``x``.

    For SAM's ``MLPBlock`` with a GELU, with the GELU in place and, on the CPU, in pieces of
    ``MLP_TOKENS`` tokens: the whole hidden layer (B, h, w, 4C) would be a fresh allocation per block,
    whose page faults cost the CPU about as long as the GELU itself. Every step is per token, so the
    values are the unsplit ones up to float rounding: a matrix product of fewer rows may round
    differently (on this project's CPUs pieces of 512 tokens or more gave the same bits). Any other
    MLP (a plugin's) runs whole.
    """
    mlp = block.mlp
    if type(mlp) is not MLPBlock or type(mlp.act) is not nn.GELU or not x.is_contiguous():
        return x.add_(mlp(block.norm2(x)))
    tokens = x.view(-1, x.shape[-1])
    # pieces on the CPU only: a GPU's caching allocator reuses memory, and small products waste it
    for piece in tokens.split(MLP_TOKENS) if x.device.type == "cpu" else [tokens]:
        hidden = torch.ops.aten.gelu_(mlp.lin1(block.norm2(piece)), approximate=mlp.act.approximate)
        piece.add_(mlp.lin2(hidden))
    return x


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
                x, blocks, lambda sub: self.run_encoder(sub, ctx), "train" if self.training else "eval"
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
        x = self.plugins.block_input(i, x, ctx)
        enc = self.sam.image_encoder
        if isinstance(enc, Backbone):
            x = enc.run_block(i, x, self.plugins, ctx)
        else:
            x = self._block(i, block, x, ctx)
        return self.plugins.block_output(i, x, ctx)

    def _block(self, i: int, block: Block, x: Tensor, ctx: ForwardContext) -> Tensor:
        shortcut = x
        x = block.norm1(x)
        if block.window_size > 0:
            size = x.shape[1], x.shape[2]
            x = window_partition(x, block.window_size)
            # back to the grid before the projection, which then skips the padding tokens (per token)
            x = window_unpartition(self._attention_heads(i, block.attn, x, ctx), block.window_size, size)
        else:
            x = self._attention_heads(i, block.attn, x, ctx)
        x = block.attn.proj(x)
        # a forward hook may keep an output, a pre-hook an input, that the in-place sums would write into
        # (and the MLP in pieces would call no hook of ``mlp`` itself)
        if _needs_grad(shortcut, x, block.norm2, block.mlp) or has_forward_hooks(
            block.attn.proj, block.norm2, block.mlp
        ):
            x = shortcut + x
            return x + block.mlp(block.norm2(x))
        # inference, or training with a frozen block that no gradient passes through (a decoder-side
        # plugin's step): the residual sums go in place into the attention's output, which no one else holds
        # when no forward hook saw it (a fresh (B, h, w, C) tensor per sum costs page faults on the CPU
        # as large as the sum itself); the same values (the MLP's up to its pieces' rounding)
        return _mlp_residual_in_place(block, x.add_(shortcut))

    def _attention_heads(self, i: int, attn: Attention, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Block ``i``'s attention on x (B, h, w, C) (a window batch for a windowed block) with the
        ``attn_logits`` site, before the output projection: SAM's ``Attention.forward`` is
        ``attn.proj`` of this, the heads' outputs side by side (B, h, w, C)."""
        b, h, w, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, L, d)
        scale: float | Tensor = attn.scale
        plain = not self.plugins.uses("attn_logits")  # no plugin sees the logits: no (L, L) tensor at all
        if not plain:  # dense path: plugins receive the rel-pos term as an additive (B, heads, L, L) bias
            sam_bias = (
                decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w))
                if attn.use_rel_pos
                else None
            )
            scale, bias = self.plugins.attn_logits(i, scale, sam_bias, q, ctx)
            # a bias the plugins left as SAM's (the same tensor, or equal values without a gradient to
            # carry) goes the plain way, so the output is bit for bit the plain path's
            plain = bias is sam_bias or (
                bias is not None
                and sam_bias is not None
                and not bias.requires_grad
                and bias.shape == sam_bias.shape
                and torch.equal(bias, sam_bias)
            )
            del sam_bias
        if plain:
            if attn.use_rel_pos:
                out = rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (h, w), scale)
            else:
                if isinstance(scale, Tensor):
                    q, scale = q * scale, 1.0
                out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out.transpose(1, 2).reshape(b, h, w, -1)
        if isinstance(scale, Tensor):
            q, scale = q * scale, 1.0
        if bias is not None and bias.requires_grad:
            # a trained bias (BA-SAM's slopes) needs the (L, L) probabilities for its gradient anyway, and
            # CUDA's memory-efficient kernel refuses a bias gradient at sequence lengths that are not
            # multiples of 16 (SAM's 14 x 14 windows): plain softmax attention, as SAM computes it
            logits = torch.matmul(q * scale, k.transpose(-2, -1)) + bias
            out = torch.matmul(logits.softmax(dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return out.transpose(1, 2).reshape(b, h, w, -1)

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
        if batch.points is not None and batch.point_labels is not None:
            coords = F.pad(batch.points.to(dtype) + 0.5, (0, 0, 0, 1))  # + SAM's not-a-point slot
            labels = F.pad(batch.point_labels, (0, 1), value=-1)
            points_visible = batch.point_labels != -1  # (N, K)
            pad_visible = points_visible.any(1) & ~has_box
            sparse.append(embed_points(pe, coords, labels, frame))
            visible += [points_visible, pad_visible[:, None]]
        if batch.box is not None:
            sparse.append(embed_box(pe, batch.box.to(dtype) + 0.5, frame))
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
        hs, keys = self._two_way(tokens, visible, src, pos, ctx)
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

    def _two_way(
        self, tokens: Tensor, visible: Tensor, src: Tensor, pos: Tensor, ctx: DecoderContext
    ) -> tuple[Tensor, Tensor]:
        """SAM's ``TwoWayTransformer`` with the ``decoder_layer`` site -> (tokens, image tokens).

        ``visible`` (N, T) masks tokens out wherever tokens are keys (self-attention and
        image-to-token attention), so invisible slots change nothing.
        """
        transformer = self.sam.mask_decoder.transformer
        keys = src.flatten(2).transpose(1, 2)  # (N, HW, C)
        key_pe = pos.flatten(2).transpose(1, 2)
        queries, query_pe = tokens, tokens
        # the token mask as SDPA's additive mask, made once for the 2 attentions per layer that use it
        bias_dtype = autocast_dtype(tokens.device) or tokens.dtype
        mask = key_bias(visible, bias_dtype)
        for i, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = attend(layer.self_attn, queries, queries, queries, mask)
            else:
                q = queries + query_pe
                queries = queries + attend(layer.self_attn, q, q, queries, mask)
            queries = layer.norm1(queries)
            keys_pe = keys + key_pe  # also the image-to-token queries below, unless a hook changes keys
            attn_out = attend(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys)
            if self.plugins.uses("decoder_layer"):
                state = DecoderState(queries, keys, query_pe, key_pe, attn_out, visible)
                state = self.plugins.decoder_layer(i, state, ctx)
                if state.visible is not visible:
                    mask = key_bias(state.visible, bias_dtype)
                if state.keys is not keys:
                    keys, keys_pe = state.keys, state.keys + key_pe
                queries, query_pe, attn_out, visible = (
                    state.queries,
                    state.query_pe,
                    state.attn_out,
                    state.visible,
                )
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = layer.norm4(
                keys + attend(layer.cross_attn_image_to_token, keys_pe, queries + query_pe, queries, mask)
            )
        attn_out = attend(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + attn_out), keys
