"""SAM's operations that the hooked forward and plugins share: public, small, batched.

- ``normalize``: SAM's input normalisation of a [0, 1] image, zero outside the unpadded part;
- ``attend``: SAM's decoder ``Attention`` through SDPA, with an optional key mask (invisible tokens);
- ``constant``: index tensors made once per shape, dtype and device and shared;
- ``window_partition`` / ``window_unpartition``: SAM's windows of the encoder grid, one pass each;
- ``fourier_pe`` / ``dense_pe``: SAM's random-Fourier positional encoding, computed in at least float32;
- ``embed_points`` / ``embed_box``: SAM's point and box embeddings without in-place writes;
- ``mask_hypernetworks``: the decoder's per-mask-token MLPs as one batched product per layer;
- ``LayerNorm2d``: SAM's channel LayerNorm through ``F.layer_norm`` (one fused pass).

The encoder's relative-position attention is in ``samflow.sam.rel_pos``.

Unlike segment-anything's prompt encoder, nothing here casts down to float32, so a float64 model runs
end to end (parity checks at 1e-12); the positional encodings are computed in at least float32 (not
in bf16 under autocast) and cast to the caller's dtype at the end.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam
from segment_anything.modeling.common import LayerNorm2d as SamLayerNorm2d
from segment_anything.modeling.mask_decoder import MLP as SamMLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from samflow.sam.casts import CastOnceLinear, autocast_dtype, cast_once, compiling, frozen_copies

_INDICES: dict[tuple, Tensor] = {}
"""Index and one-hot tensors that are pure functions of shapes, dtype and device (``constant``)."""


def constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, made once per ``key`` (which must name everything it depends on: sizes, dtype,
    device) and shared: the window slots, rel-pos index and one-hot keys every encoder block uses. On
    a GPU each such small tensor costs kernel launches in every block of every forward. Shared, so no
    caller may write into it; under ``torch.compile`` or tracing it is made in place (the graph owns it).
    """
    if compiling():
        return make()
    made = _INDICES.get(key)
    if made is None:
        if len(_INDICES) >= 512:  # a bound for runs that see many sizes; these are cheap to make again
            _INDICES.clear()
        with torch.inference_mode(False), torch.no_grad():
            made = _INDICES[key] = make()
    return made


def normalize(sam: Sam, image: Tensor, input_size: Tensor | None) -> Tensor:
    """SAM's input: ``(255 * image - mean) / std`` of a [0, 1] image (B, 3, S, S), zero outside ``input_size``."""
    x = (image * 255.0 - sam.pixel_mean.to(image.dtype)) / sam.pixel_std.to(image.dtype)
    return zero_padding(x, input_size)


def zero_padding(image: Tensor, input_size: Tensor | None) -> Tensor:
    """``image`` (B, C, S, S) with zeros outside each image's ``input_size`` (B, 2) rows x columns (the
    padding of SAM's frame), so nothing there reaches what is computed from it; None: as it is."""
    if input_size is None:
        return image
    size = image.shape[-1]
    rows = torch.arange(size, device=image.device)
    inside = (rows[None, :, None] < input_size[:, 0, None, None]) & (
        rows[None, None, :] < input_size[:, 1, None, None]
    )
    return image * inside[:, None].to(image.dtype)


def key_bias(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """A (N, Lk) bool key mask as the additive float mask ``attend`` and SDPA apply: 0 where visible,
    -inf where not, in ``dtype`` (the dtype of the attention's queries: the autocast dtype under
    autocast). SDPA makes this mask from a bool one in every call; made once, it serves them all."""
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """SAM's decoder ``Attention`` (projections, heads, downsampling) through SDPA.

    q (N, Lq, C), k and v (N, Lk, C); ``key_mask`` (N, Lk) bool, False for keys no query may see
    (padding tokens), or the same as an additive float mask (``key_bias``: 0 visible, -inf not), which
    several calls can share. Every row must keep at least one visible key.
    """
    heads = attn.num_heads

    def split(x: Tensor) -> Tensor:  # (N, L, D) -> (N, heads, L, D/heads)
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, Lk)
    out = F.scaled_dot_product_attention(
        split(attn.q_proj(q)), split(attn.k_proj(k)), split(attn.v_proj(v)), attn_mask=mask
    )
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def window_slots(size: tuple[int, int], window: int, device: torch.device | None = None) -> Tensor:
    """Where segment-anything's ``window_partition`` puts each token of an (h, w) grid -> (h*w,) long.

    The windows tile the grid zero-padded at the bottom and right to multiples of ``window``, in
    row-major order; slot ``(n * window + r) * window + c`` is row r, column c of window n. Made once
    per grid, window and device (``constant``); do not write into it.
    """
    h, w = size

    def slots() -> Tensor:
        across = -(-w // window)  # windows per row of windows
        rows = torch.arange(h, device=device)[:, None]
        cols = torch.arange(w, device=device)[None, :]
        window_index = (rows // window) * across + cols // window
        return (window_index * window * window + (rows % window) * window + cols % window).flatten()

    return constant(("window_slots", h, w, window, torch.device(device or "cpu")), slots)


def window_partition(x: Tensor, window: int, fill: Tensor | None = None) -> Tensor:
    """segment-anything's ``window_partition`` in one pass: (B, h, w, C) -> (B * nW, window, window, C).

    The same windows, zero padding and order; SAM pads (one copy) and then permutes (another), this
    scatters each token into its slot of a zeroed buffer. ``fill`` (C,): the padding tokens' value
    instead of zero (what a per-token layer gives for a zero token: its bias).
    """
    b, h, w, c = x.shape
    down, across = -(-h // window), -(-w // window)
    slots = down * across * window * window
    if fill is None:
        windows = x.new_zeros(b, slots, c)
    else:
        windows = fill.to(x.dtype).expand(b, slots, c).contiguous()
    windows.index_copy_(1, window_slots((h, w), window, x.device), x.reshape(b, h * w, c))
    return windows.view(b * down * across, window, window, c)


def window_unpartition(windows: Tensor, window: int, size: tuple[int, int]) -> Tensor:
    """segment-anything's ``window_unpartition`` in one pass: (B * nW, window, window, C) -> (B, h, w, C).

    A gather of the tokens of the (h, w) grid; the padding is never copied (SAM copies the padded
    grid, then crops it with a second copy).
    """
    h, w = size
    c = windows.shape[-1]
    down, across = -(-h // window), -(-w // window)
    flat = windows.reshape(-1, down * across * window * window, c)
    return flat.index_select(1, window_slots(size, window, windows.device)).view(-1, h, w, c)


def fourier_pe(pe_layer: PositionEmbeddingRandom, coords: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """SAM's ``PositionEmbeddingRandom`` of coordinates in [0, 1]^2 (..., 2) -> (..., C), in ``dtype``
    (default: the coordinates' dtype).

    Computed in at least float32 whatever the autocast setting, then cast: the angles
    ``2 pi (2 coords - 1) @ gaussian`` reach tens of radians, where bf16 (8 significant bits) keeps
    only ~0.1 rad, and a bf16 product rounds the coordinates to ~2 px of a 1024 px frame first.
    """
    work = torch.promote_types(coords.dtype, torch.float32)
    gaussian = cast_once(pe_layer, "gaussian", (pe_layer.positional_encoding_gaussian_matrix,), work)
    with _no_autocast(coords.device):
        angles = 2 * math.pi * ((2 * coords.to(work) - 1) @ gaussian)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype or coords.dtype)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` while it is on (nothing to undo otherwise, as under ONNX tracing)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def dense_pe(pe_layer: PositionEmbeddingRandom, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """SAM's dense positional encoding of the embedding grid (1, C, h, w) (``get_dense_pe``), in ``dtype``;
    the grid is made in at least float32 (``fourier_pe``)."""
    h, w = size
    device = pe_layer.positional_encoding_gaussian_matrix.device
    work = torch.promote_types(dtype, torch.float32)
    y = (torch.arange(h, device=device, dtype=work) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=work) + 0.5) / w
    grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)  # (h, w, 2)
    return fourier_pe(pe_layer, grid, dtype).permute(2, 0, 1).unsqueeze(0)


def _pixel_pe(pe: PromptEncoder, coords: Tensor, frame: tuple[int, int]) -> Tensor:
    """Encode pixel coordinates (..., 2) of the (H, W) ``frame`` (``forward_with_coords``) in at least
    float32 (a bf16 pixel coordinate of a 1024 px frame is a multiple of 4 px past 512)."""
    coords = upcast(coords)
    # divided by Python numbers, as SAM does, so nothing is copied from the host (no GPU sync)
    scaled = torch.stack([coords[..., 0] / frame[1], coords[..., 1] / frame[0]], dim=-1)
    return fourier_pe(pe.pe_layer, scaled)


def embed_points(
    pe: PromptEncoder,
    coords: Tensor,
    labels: Tensor,
    frame: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """SAM's point embedding: coords (N, K, 2) pixel centres (SAM's coordinates + 0.5), labels (N, K).

    Label 1 positive, 0 negative, -1 not-a-point (SAM's own padding token). -> (N, K, C) in ``dtype``
    (default: the coordinates' dtype), computed in at least float32: pass float32 coordinates and the
    autocast dtype, so a 1 px move still moves the embedding under bf16 autocast.
    """
    enc = _pixel_pe(pe, coords, frame)
    labels = labels.unsqueeze(-1)
    not_a_point = cast_once(pe, "not_a_point", (pe.not_a_point_embed.weight,), enc.dtype)
    negative = cast_once(pe, "negative_point", (pe.point_embeddings[0].weight,), enc.dtype)
    positive = cast_once(pe, "positive_point", (pe.point_embeddings[1].weight,), enc.dtype)
    enc = torch.where(labels == -1, not_a_point, enc)
    enc = enc + torch.where(labels == 0, negative, 0.0)
    return (enc + torch.where(labels == 1, positive, 0.0)).to(dtype or coords.dtype)


def embed_box(
    pe: PromptEncoder, boxes: Tensor, frame: tuple[int, int], dtype: torch.dtype | None = None
) -> Tensor:
    """SAM's box embedding: boxes (N, 4) xyxy pixel centres (SAM's coordinates + 0.5) -> corners (N, 2, C)
    in ``dtype`` (default: the boxes' dtype), computed in at least float32 (``embed_points``)."""
    corners = _pixel_pe(pe, boxes.reshape(-1, 2, 2), frame)
    corner_weights = (pe.point_embeddings[2].weight, pe.point_embeddings[3].weight)
    weights = cast_once(pe, "box_corners", corner_weights, corners.dtype, lambda *w: torch.cat(w))  # (2, C)
    return (corners + weights).to(dtype or boxes.dtype)


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether a forward or forward-pre hook (global, or of these modules or their submodules) is set."""
    return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
        sub._forward_hooks or sub._forward_pre_hooks for m in modules for sub in m.modules()
    )


def _stackable(mlps: nn.ModuleList) -> bool:
    """Whether ``mask_hypernetworks`` may run ``mlps`` as one batched product per layer."""
    if len(mlps) == 0 or has_forward_hooks(mlps):
        return False
    members: list[Any] = list(mlps)
    first = members[0]
    if type(first) is not SamMLP:
        return False
    for mlp in members:
        if type(mlp) is not SamMLP or mlp.sigmoid_output or mlp.num_layers != first.num_layers:
            return False
        if len(mlp.layers) != first.num_layers:
            return False
        for layer, ref in zip(mlp.layers, first.layers):
            if type(layer) not in (nn.Linear, CastOnceLinear) or layer.bias is None:
                return False
            if layer.weight.shape != ref.weight.shape:
                return False
    return True


def _stack_layers(count: int, dtype: torch.dtype, *params: Tensor) -> tuple[Tensor, Tensor]:
    """``count`` weights (out, in) then ``count`` biases -> (count, in, out) and (count, 1, out) in ``dtype``."""
    weights, biases = params[:count], params[count:]
    return torch.stack(weights).transpose(1, 2).to(dtype), torch.stack(biases)[:, None].to(dtype)


def mask_hypernetworks(mlps: nn.ModuleList, tokens: Tensor) -> Tensor:
    """SAM's output hypernetworks: MLP j of ``mlps`` on ``tokens[:, j]`` (N, M, C) -> (N, M, C_out).

    For segment-anything's ``MLP`` (ReLU between layers, no sigmoid) each layer of the M MLPs runs as
    one ``baddbmm`` over their stacked weights, instead of M separate products: on a GPU, where the
    decoder is bound by kernel launches, 3 products instead of 12 (and 2 ReLUs instead of 8). Frozen
    weights are stacked (and cast to the autocast dtype) once and kept (``samflow.sam.casts``);
    trainable ones are stacked in every call, so their gradients reach each MLP's own weights. Equal
    to the separate products to float rounding. Any other MLP, or one with a forward hook, runs as
    SAM runs it, one by one.
    """
    if not _stackable(mlps):
        return torch.stack([mlp(tokens[:, j]) for j, mlp in enumerate(mlps)], 1)
    members: list[Any] = list(mlps)
    x = tokens.transpose(0, 1)  # (M, N, C)
    num_layers: int = members[0].num_layers
    cast_to = autocast_dtype(x.device)
    for i in range(num_layers):
        layers: list[nn.Linear] = [mlp.layers[i] for mlp in members]
        dtype = cast_to or layers[0].weight.dtype
        params = [layer.weight for layer in layers] + [layer.bias for layer in layers]
        build = functools.partial(_stack_layers, len(layers), dtype)
        kept = frozen_copies(mlps, ("hypernetworks", i, dtype), params, build)
        weight, bias = kept if kept is not None else build(*params)
        x = torch.baddbmm(bias, x, weight)  # type: ignore[arg-type]  # (M, N, C_out)
        if i < num_layers - 1:
            x = F.relu(x)
    return x.transpose(0, 1)


class LayerNorm2d(SamLayerNorm2d):
    """segment-anything's ``LayerNorm2d`` (over the channels of (B, C, H, W)) through ``F.layer_norm``.

    The same parameters and formula (biased variance, ``eps`` inside the root); SAM computes it as
    six separate elementwise passes and their backward, which on the CPU cost as much as HQ-SAM's
    3x3 convolutions around them at 256 x 256 (a vit_b HQ-SAM training step from stored embeddings:
    1.04 s -> 0.68 s). Equal to SAM's to float rounding. ``build_sam`` gives SAM's own modules this
    forward (``fast_layer_norms``); plugins build theirs from this class.
    """

    def forward(self, x: Tensor) -> Tensor:
        # under tracing (ONNX export) the channel count would be a traced value: SAM's own formula
        if torch.jit.is_tracing():
            return super().forward(x)
        out = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)


def fast_layer_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Give every segment-anything ``LayerNorm2d`` in ``module`` samflow's forward, in place: same
    object, parameters and state-dict keys (the class becomes the ``LayerNorm2d`` subclass above)."""
    for sub in module.modules():
        if type(sub) is SamLayerNorm2d:
            sub.__class__ = LayerNorm2d
    return module


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32: bf16/fp16 values go up to float32, float64 stays float64.

    For sums, sigmoids and losses that must not run in half precision, without forcing float64
    inputs down to float32 (``.float()`` would).
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))
