"""SAM's forward pass with named hook sites, batched over images and prompts.

Only the control flow of SAM's image encoder, two-way transformer and mask decoder is written here;
every weight and layer is SAM's own module. Attention runs through
``scaled_dot_product_attention`` with the decomposed relative-position bias as an additive mask.

Hook sites, in order: ``on_image`` -> for each encoder block i: ``block_input(i)`` -> block (with
``attn_logits(i)``) -> ``block_output(i)`` -> neck -> prompt encoder -> ``prompts`` -> decoder with
``decoder_layer(i)`` after each layer's token-to-image attention -> heads -> ``decode_token`` ->
``select``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from samflow.plugins.base import DecoderFeatures, DecoderState, ForwardContext
from samflow.plugins.stack import PluginStack
from samflow.sam.cache import EncoderCache, EncoderCacheError
from samflow.sam.output import SamOutput

PROMPT_KEYS = ("points", "point_labels", "boxes", "has_box", "mask_prompt", "has_mask_prompt")


class HookedSam(nn.Module):
    """A frozen SAM and the plugins that fill its hook sites.

    Args:
        sam: a (frozen) segment-anything ``Sam``.
        plugins: the plugin stack; its ``setup`` runs here.
        multimask_output: SAM's selection rule: token 0 (False) or best of tokens 1..3 (True).
        checkpoint_blocks: recompute each encoder block in the backward pass instead of keeping its
            activations (activation checkpointing): less memory, about one more encoder forward of
            time, and only in training when gradients flow through the encoder (e.g. SAM-Adapter).
        encoder_cache: reuse the encoder's outputs for images seen before (see ``EncoderCache``);
            only valid when no plugin changes the encoder, which ``check_encoder_cache`` enforces.
    """

    def __init__(
        self,
        sam: Sam,
        plugins: PluginStack | None = None,
        multimask_output: bool = False,
        checkpoint_blocks: bool = False,
        encoder_cache: EncoderCache | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.plugins = plugins if plugins is not None else PluginStack()
        self.plugins.setup(sam)
        depth = len(sam.image_encoder.blocks)
        for key, plugin in self.plugins.items():
            wrong = [i for i in plugin.encoder_features() if not 0 <= i < depth]
            if wrong:
                raise ValueError(
                    f"Plugin {key!r} asks for the output of encoder block(s) {wrong}, but the encoder "
                    f"has blocks 0..{depth - 1}."
                )
        self.multimask_output = multimask_output
        self.checkpoint_blocks = checkpoint_blocks
        self.encoder_cache = encoder_cache

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    def train(self, mode: bool = True) -> HookedSam:
        """Plugins follow ``mode``; SAM stays in eval mode (frozen statistics, no dropout)."""
        super().train(mode)
        self.sam.eval()
        return self

    def forward(self, batch: dict[str, Any], ctx: ForwardContext | None = None) -> SamOutput:
        """Run SAM with the plugins on a batch (see samflow.data for the keys).

        ``batch["image"]`` is (B, 3, S, S) in [0, 1]; ``input_size`` (B, 2) marks the unpadded part.
        Prompts are in the S x S input frame. ``image_index`` (N,) maps prompt rows to images when
        an image has several prompt rows (default: one row per image).
        """
        ctx = ctx or self.context(batch)
        ctx.image_embeddings = self.encode(ctx)
        return self.decode(ctx)

    def context(self, batch: dict[str, Any], **kwargs: Any) -> ForwardContext:
        """A fresh ``ForwardContext`` for ``batch``."""
        image = batch["image"]
        index = batch.get("image_index")
        if index is None:
            index = torch.arange(image.shape[0], device=image.device)
        return ForwardContext(
            sam=self.sam,
            batch=batch,
            image=image,
            training=self.training,
            image_index=index,
            multimask_output=self.multimask_output,
            **kwargs,
        )

    # ---- image encoder ----
    def preprocess(self, image: Tensor, input_size: Tensor | None) -> Tensor:
        """SAM's normalisation of a [0, 1] image; padding is zero after normalising, as in SAM."""
        return normalize(self.sam, image, input_size)

    def encode(self, ctx: ForwardContext) -> Tensor:
        """Image encoder with hook sites -> image embeddings (B, C, h, w).

        Sets ``ctx.normalized`` and ``ctx.encoder_features`` (the blocks plugins asked for).
        """
        x = self.preprocess(ctx.image, ctx.batch.get("input_size"))
        ctx.normalized = x
        if self.encoder_cache is None:
            embeddings, ctx.encoder_features = self.run_encoder(x, ctx)
        else:
            self.check_encoder_cache()
            blocks = self.plugins.encoder_features()
            embeddings, ctx.encoder_features = self.encoder_cache.encode(
                x, blocks, lambda sub: self.run_encoder(sub, ctx), "train" if self.training else "eval"
            )
        return embeddings

    def run_encoder(self, x: Tensor, ctx: ForwardContext) -> tuple[Tensor, dict[int, Tensor]]:
        """The encoder on normalised images ``x`` -> (embeddings, {block: output}) for the blocks plugins read."""
        enc = self.sam.image_encoder
        stack = self.plugins
        wanted = set(stack.encoder_features())
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

    def check_encoder_cache(self) -> None:
        """Fail when the encoder's outputs are not a pure function of the image, so a cache would be wrong."""
        users = self.plugins.encoder_hook_users()
        trained = [n for n, p in self.sam.image_encoder.named_parameters() if p.requires_grad]
        if users or trained:
            what = f"plugins {', '.join(users)} change it" if users else f"its parameters {trained[:3]} are trained"
            raise EncoderCacheError(
                f"encoder_cache is on, but the image encoder's output is not a fixed function of the image: {what}. "
                "Turn the cache off (model.sam.encoder_cache: 0) for this experiment."
            )

    def _hooked_block(self, i: int, block: nn.Module, x: Tensor, ctx: ForwardContext) -> Tensor:
        x = self.plugins.block_input(i, x, ctx)
        x = self._block(i, block, x, ctx)
        return self.plugins.block_output(i, x, ctx)

    def _block(self, i: int, block: nn.Module, x: Tensor, ctx: ForwardContext) -> Tensor:
        shortcut = x
        x = block.norm1(x)
        if block.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, block.window_size)
        x = self._attention(i, block.attn, x, ctx)
        if block.window_size > 0:
            x = window_unpartition(x, block.window_size, pad_hw, (h, w))
        x = shortcut + x
        return x + block.mlp(block.norm2(x))

    def _attention(self, i: int, attn: nn.Module, x: Tensor, ctx: ForwardContext) -> Tensor:
        b, h, w, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, L, d)
        bias = decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (h, w)) if attn.use_rel_pos else None
        scale: float | Tensor = attn.scale
        if self.plugins.uses("attn_logits"):
            scale, bias = self.plugins.attn_logits(i, scale, bias, q, ctx)
        if isinstance(scale, Tensor):
            q, scale = q * scale, 1.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return attn.proj(out)

    # ---- prompts and mask decoder ----
    def encode_prompts(self, batch: dict[str, Any], rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """SAM's prompt encoder, batched with per-row presence flags -> sparse (N, K, C), dense (N, C, h, w).

        Rows without a box (``has_box`` False) get two not-a-point tokens in its place; rows without a
        mask prompt get SAM's no-mask embedding. With points and no boxes one not-a-point token is
        appended, exactly as SAM does.
        """
        pe = self.sam.prompt_encoder
        frame = pe.input_image_size
        sparse = [torch.empty(rows, 0, pe.embed_dim, device=device)]
        boxes = batch.get("boxes")
        if batch.get("points") is not None:
            coords, labels = batch["points"].float() + 0.5, batch["point_labels"]
            if boxes is None:
                coords = F.pad(coords, (0, 0, 0, 1))
                labels = F.pad(labels, (0, 1), value=-1)
            sparse.append(embed_points(pe, coords, labels, frame))
        if boxes is not None:
            corners = pe.pe_layer.forward_with_coords(boxes.float().reshape(-1, 2, 2) + 0.5, frame)
            corners = corners + torch.cat([pe.point_embeddings[2].weight, pe.point_embeddings[3].weight])
            has_box = batch.get("has_box")
            if has_box is not None:
                absent = pe.not_a_point_embed.weight.expand_as(corners)
                corners = torch.where(has_box.view(-1, 1, 1), corners, absent)
            sparse.append(corners)
        grid = pe.image_embedding_size
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(rows, -1, *grid)
        if batch.get("mask_prompt") is not None:
            embedded = pe.mask_downscaling(batch["mask_prompt"].float())
            has_mask = batch.get("has_mask_prompt")
            dense = embedded if has_mask is None else torch.where(has_mask.view(-1, 1, 1, 1), embedded, dense)
        return torch.cat(sparse, dim=1), dense

    def decode(self, ctx: ForwardContext) -> SamOutput:
        """Prompt encoder, two-way transformer and heads with hook sites -> ``SamOutput``."""
        dec = self.sam.mask_decoder
        stack = self.plugins
        index = ctx.image_index
        rows = index.shape[0]
        embeddings = ctx.image_embeddings
        sparse, dense = self.encode_prompts(ctx.batch, rows, embeddings.device)
        sparse, dense = stack.prompts(sparse, dense, ctx)
        ctx.image_pe = self.sam.prompt_encoder.get_dense_pe()

        output_tokens = [dec.iou_token.weight, dec.mask_tokens.weight]
        extra = stack.output_tokens()
        if extra is not None:
            output_tokens.append(extra)
        output_tokens = torch.cat(output_tokens, dim=0)
        n_out = output_tokens.shape[0]
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(rows, -1, -1), sparse.to(output_tokens.dtype)], 1)

        src = embeddings[index] + dense  # (N, C, h, w)
        b, c, h, w = src.shape
        pos = ctx.image_pe.expand(rows, -1, -1, -1)
        hs, keys = self._two_way(tokens, src, pos, ctx)
        src = keys.transpose(1, 2).reshape(b, c, h, w)

        upscaled = dec.output_upscaling(src)  # (N, C/8, 4h, 4w)
        mask_tokens = hs[:, 1 : 1 + dec.num_mask_tokens]
        hyper = torch.stack([mlp(mask_tokens[:, j]) for j, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        sam_masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
        iou_pred = dec.iou_prediction_head(hs[:, 0])

        masks = {"sam": sam_masks}
        feats = DecoderFeatures(tokens=hs, src=src, upscaled=upscaled, sam_masks=sam_masks, iou_pred=iou_pred)
        masks.update(stack.decode_tokens(hs[:, 1 + dec.num_mask_tokens : n_out], feats, ctx))
        out = SamOutput(masks=masks, iou_pred=iou_pred, image_index=index)
        out.pred = stack.select(out, ctx)
        if out.pred is None:
            out.pred = out.sam_default(self.multimask_output)
        return out

    def _two_way(self, tokens: Tensor, src: Tensor, pos: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """SAM's ``TwoWayTransformer`` with the ``decoder_layer`` site -> (tokens, image tokens)."""
        transformer = self.sam.mask_decoder.transformer
        keys = src.flatten(2).transpose(1, 2)  # (N, HW, C)
        key_pe = pos.flatten(2).transpose(1, 2)
        queries, query_pe = tokens, tokens
        for i, layer in enumerate(transformer.layers):
            if layer.skip_first_layer_pe:
                queries = attend(layer.self_attn, queries, queries, queries)
            else:
                q = queries + query_pe
                queries = queries + attend(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries)
            attn_out = attend(layer.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
            if self.plugins.uses("decoder_layer"):
                state = DecoderState(queries, keys, query_pe, key_pe, attn_out)
                state = self.plugins.decoder_layer(i, state, ctx)
                queries, keys, query_pe, attn_out = state.queries, state.keys, state.query_pe, state.attn_out
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            k = keys + key_pe
            keys = layer.norm4(keys + attend(layer.cross_attn_image_to_token, k, queries + query_pe, queries))
        attn_out = attend(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + attn_out), keys


def normalize(sam: Sam, image: Tensor, input_size: Tensor | None) -> Tensor:
    """SAM's input: ``(255 * image - mean) / std`` of a [0, 1] image (B, 3, S, S), zero outside ``input_size``."""
    x = (image * 255.0 - sam.pixel_mean) / sam.pixel_std
    if input_size is not None:
        size = image.shape[-1]
        rows = torch.arange(size, device=image.device)
        inside = (rows[None, :, None] < input_size[:, 0, None, None]) & (
            rows[None, None, :] < input_size[:, 1, None, None]
        )
        x = x * inside[:, None].to(x.dtype)
    return x


def attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's decoder ``Attention`` (projections, heads, downsampling) through SDPA."""
    heads = attn.num_heads

    def split(x: Tensor) -> Tensor:  # (N, L, D) -> (N, heads, L, D/heads)
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(attn.q_proj(q)), split(attn.k_proj(k)), split(attn.v_proj(v)))
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def decomposed_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """SAM's decomposed relative-position term as an additive attention mask.

    bias[b, n, (i, j), (k, l)] = q[b, n, (i, j)] . R_h[i - k] + q[b, n, (i, j)] . R_w[j - l]
    q: (B, heads, h*w, d) -> bias (B, heads, h*w, h*w).
    """
    h, w = size
    r_h = get_rel_pos(h, h, rel_pos_h)  # (h, h, d)
    r_w = get_rel_pos(w, w, rel_pos_w)  # (w, w, d)
    r_q = q.unflatten(2, (h, w))  # (B, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).flatten(2, 3)


def embed_points(pe: nn.Module, coords: Tensor, labels: Tensor, frame: tuple[int, int]) -> Tensor:
    """SAM's point embedding without in-place masking: coords (N, K, 2) pixel centres, labels (N, K)."""
    enc = pe.pe_layer.forward_with_coords(coords, frame)
    labels = labels.unsqueeze(-1)
    enc = torch.where(labels == -1, pe.not_a_point_embed.weight, enc)
    enc = enc + torch.where(labels == 0, pe.point_embeddings[0].weight, 0.0)
    return enc + torch.where(labels == 1, pe.point_embeddings[1].weight, 0.0)
