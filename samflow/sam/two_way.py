"""segment-anything's ``TwoWayTransformer`` with the ``decoder_layer`` hook site, as ``HookedSam`` runs it.

Every attention goes through ``samflow.sam.ops.attend`` (SDPA), with the prompt tokens' visibility as
one additive key mask shared by the attentions whose keys are tokens.
"""

from __future__ import annotations

from segment_anything.modeling.transformer import TwoWayTransformer
from torch import Tensor

from samflow.sam.casts import autocast_dtype
from samflow.sam.ops import attend, key_bias
from samflow.sam.types import DecoderContext, DecoderState, HookSites


def two_way(
    transformer: TwoWayTransformer,
    tokens: Tensor,
    visible: Tensor,
    src: Tensor,
    pos: Tensor,
    hooks: HookSites,
    ctx: DecoderContext,
) -> tuple[Tensor, Tensor]:
    """SAM's ``TwoWayTransformer`` with the ``decoder_layer`` site -> (tokens, image tokens).

    ``visible`` (N, T) masks tokens out wherever tokens are keys (self-attention and
    image-to-token attention), so invisible slots change nothing.
    """
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
        if hooks.uses("decoder_layer"):
            state = DecoderState(queries, keys, query_pe, key_pe, attn_out, visible)
            state = hooks.decoder_layer(i, state, ctx)
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
