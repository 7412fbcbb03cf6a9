"""BA-SAM: a length-dependent attention scale and a distance-penalty attention mask in SAM's encoder.

Song et al., "BA-SAM: Scalable Bias-Mode Attention Mask for Segment Anything Model", CVPR 2024. The
paper treats a change of input resolution as length extrapolation (the patch size stays, the number
of tokens N changes) and changes the encoder's attention logits in two ways (abstract and Fig. 2; the
method section, and so its equation numbers, were not available to us, see
``shared/reference/sam_adapter_hq_sam_ba_sam.md`` section 3):

(a) a new scaling factor, so the dot products keep their magnitude when N changes:

        logits = (1/sqrt(d)) * ln(N) / ln(N_train) * q k^T

    N is the number of keys at run time, N_train the number at SAM's training size (64 x 64 = 4096
    for the real variants at 1024 px). The factor is exactly 1 at N = N_train, so at the training size
    this term leaves SAM bit for bit unchanged. It applies to the global-attention blocks; a windowed
    block always attends over its fixed window, so its N never changes (``scale_windows`` changes
    that, see ``BASam``). This is the form of the released code (``scale = d^-1/2 log_4096(N)``), with
    N counted at run time: the code derives N at construction from ``img_size // 1024``, which has no
    effect at 1536 px and crashes below 1024 px (``log(0)``).

(b) a bias-mode attention mask, "increasing penalties on attention scores as the distance between
    the query and key grows", added to the logits:

        logits += -beta_h * dist(p_i, p_j)

    p = (row, col) are the token coordinates on the block's grid (the whole image's for a global
    block, the window's for a windowed one), dist is Euclidean (or Manhattan) in token units, and
    beta_h is a per-head slope. The paper's exact form was not available; we follow ALiBi (Press et
    al., ICLR 2022), from which "bias mode" with per-head slopes comes, extended to the 2-D grid:
    geometric slopes beta_h = 2^(-8h/H), h = 1..H. Fixed (buffers) for zero-shot use, learnable per
    block and head when fine-tuning. SAM's own relative-position bias and absolute position
    embedding stay as they are.

``bias: reference_code`` reproduces the released code's bias instead: no distance penalty, but a
learnable scalar c per block (init 0.1) times SAM's decomposed relative-position bias, and SAM's
absolute position embedding dropped:

        logits = scale * q k^T + c * (q . R_h[drow] + q . R_w[dcol])

The code also re-initialises the rel-pos tables R to zero and trains them with all of SAM (full
fine-tuning, nothing frozen), and drops them again when it loads a trained checkpoint for evaluation,
so there the term is zero; here SAM stays frozen and its pretrained tables are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn
from typing_extensions import override

from samflow.plugins import ForwardContext, PluginConfigError, SamPlugin
from samflow.sam import VARIANTS
from samflow_plugins.ba_sam.bias import (
    DISTANCES,
    Distance,
    alibi_slopes,
    distance_bias,
    grid_distance,
    length_scale,
)

BiasMode = Literal["distance", "reference_code", "none"]
BIAS_MODES: tuple[str, ...] = ("distance", "reference_code", "none")
SlopeInit = Literal["alibi", "zero"]


def native_img_size(sam: Sam) -> int:
    """The input side SAM was trained at: the size of the built-in variant with this encoder's shape
    (1024 for vit_b/l/h, 128 for tiny), else 1024, the size of SAM's pretraining."""
    enc = sam.image_encoder
    shape = (
        enc.patch_embed.proj.out_channels,
        len(enc.blocks),
        enc.blocks[0].attn.num_heads,
        enc.patch_embed.proj.kernel_size[0],
    )
    for spec in VARIANTS.values():
        if (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size) == shape:
            return spec.img_size
    return 1024


class BASam(SamPlugin):
    """BA-SAM: ln(N)/ln(N_train) on the attention scale and a distance penalty on the logits.

    Both act through the ``attn_logits`` site, so the encoder's output depends on the plugin and
    ``model.sam.encoder_cache`` is refused with it (also in zero-shot mode).

    Modes:

    - **fine-tuning** (defaults): the slopes beta (``depth x heads`` values, 24 for the tiny SAM, 144
      for ViT-B) are learnable parameters; ``train_decoder: true`` trains SAM's mask decoder with
      them (the released code trains all of SAM; a frozen encoder is this framework's setting).
    - **zero-shot** (``learnable: false``): the slopes or coefficients are buffers, nothing trains,
      SAM is fully frozen. Run it at another resolution with ``model.sam.img_size`` (position
      embeddings and rel-pos tables are interpolated, ``samflow.sam.build_sam`` / ``resize_sam``).

    At the training size the scale is SAM's exactly; the output equals SAM's bit for bit when the bias
    is off (``bias: none``) or zero (``slopes: zero``).

    Args:
        bias: ``distance`` (the paper: -beta_h * dist(i, j)), ``reference_code`` (the released code: a
            learnable scalar per block times SAM's rel-pos bias, absolute position embedding dropped)
            or ``none`` (the new scale alone).
        distance: ``euclidean`` or ``manhattan`` distance between token grid positions, in tokens.
        slopes: initial beta_h: ``alibi`` (2^(-8h/H), h = 1..H; ALiBi's rule when H is not a power of
            two), ``zero`` (start as SAM), or one value per head. The same for every block.
        learnable: the slopes (or coefficients) train; False makes them fixed buffers (zero-shot).
        blocks: encoder blocks whose logits get the bias (default: all).
        scale: apply the new scaling factor (False: SAM's 1/sqrt(d) everywhere, the bias alone).
        train_size: input side at which SAM was trained, N_train = (train_size / patch)^2 (default:
            the variant's own size, 1024 for vit_b/l/h and 128 for tiny).
        scale_windows: also rescale windowed blocks, with N and N_train counted over the whole image
            (h * w tokens) instead of the window; off by default, as a window's length never changes.
        coefficient: ``reference_code``: initial value of each block's scalar (the code's 0.1).
        drop_pos_embed: remove SAM's absolute position embedding from the first block's input
            (default: only with ``reference_code``, as the code does). It is subtracted, so the
            tokens equal the patch embedding up to float rounding.
        train_decoder: also train SAM's mask decoder.
        lr: learning rate of the plugin's parameters (default: the optimizer's).
        weight_decay: their weight decay (default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx: encoder side only (embeddings are inputs)

    needs_vit_encoder = True  # its setup reaches into SAM's ViT blocks

    def __init__(
        self,
        bias: BiasMode = "distance",
        distance: Distance = "euclidean",
        slopes: SlopeInit | Sequence[float] = "alibi",
        learnable: bool = True,
        blocks: Sequence[int] | None = None,
        scale: bool = True,
        train_size: int | None = None,
        scale_windows: bool = False,
        coefficient: float = 0.1,
        drop_pos_embed: bool | None = None,
        train_decoder: bool = False,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if bias not in BIAS_MODES:
            raise ValueError(f"ba_sam: bias must be one of {BIAS_MODES}, got {bias!r}.")
        if distance not in DISTANCES:
            raise ValueError(f"ba_sam: distance must be one of {DISTANCES}, got {distance!r}.")
        if isinstance(slopes, str):
            if slopes not in ("alibi", "zero"):
                raise ValueError(
                    f"ba_sam: slopes must be 'alibi', 'zero' or one value per head, got {slopes!r}."
                )
        elif not slopes:
            raise ValueError("ba_sam: `slopes` is empty; give one value per head, 'alibi' or 'zero'.")
        if blocks is not None and not blocks:
            raise ValueError("ba_sam: `blocks` is empty; leave it out (all blocks) or list indices.")
        if train_size is not None and train_size <= 0:
            raise ValueError(f"ba_sam: train_size must be a positive image side in pixels, got {train_size}.")
        if bias == "none" and not scale:
            raise ValueError("ba_sam: with bias 'none' and scale false the plugin would do nothing.")
        self.bias = bias
        self.distance = distance
        self.slope_init: str | list[float] = slopes if isinstance(slopes, str) else [float(s) for s in slopes]
        self.learnable = learnable
        self.blocks = None if blocks is None else sorted(set(blocks))
        self.scale = scale
        self.train_size = train_size
        self.scale_windows = scale_windows
        self.coefficient_init = coefficient
        self.drop_pos_embed = bias == "reference_code" if drop_pos_embed is None else drop_pos_embed
        self.train_decoder = train_decoder
        # Filled by setup (plain Python values: picklable, not in the state dict).
        self.patch = 16
        self.train_grid = 0
        self.windows: list[int] = []
        self.rows: dict[int, int] = {}  # block index -> row of `slopes` / `coefficients`

    @override
    def setup(self, sam: Sam) -> None:
        enc = sam.image_encoder
        depth = len(enc.blocks)
        heads = enc.blocks[0].attn.num_heads
        self.patch = enc.patch_embed.proj.kernel_size[0]
        size = self.train_size or native_img_size(sam)
        if size % self.patch or size // self.patch < 2:
            raise PluginConfigError(
                f"Plugin {self.key!r} (ba_sam): train_size {size} must be a multiple of the patch size "
                f"{self.patch} and at least two patches."
            )
        self.train_grid = size // self.patch
        self.windows = [block.window_size for block in enc.blocks]
        blocks = list(range(depth)) if self.blocks is None else self.blocks
        wrong = [i for i in blocks if not 0 <= i < depth]
        if wrong:
            raise PluginConfigError(
                f"Plugin {self.key!r} (ba_sam): blocks {wrong} do not exist; this SAM has {depth} encoder "
                f"blocks, 0..{depth - 1}."
            )
        self.rows = {i: row for row, i in enumerate(blocks)}
        device = enc.patch_embed.proj.weight.device
        if self.bias == "distance":
            if isinstance(self.slope_init, list):
                init = list(self.slope_init)
                if len(init) != heads:
                    raise PluginConfigError(
                        f"Plugin {self.key!r} (ba_sam): {len(init)} slopes given, but SAM's encoder has "
                        f"{heads} heads; give one slope per head."
                    )
            else:
                init = alibi_slopes(heads) if self.slope_init == "alibi" else [0.0] * heads
            values = torch.tensor(init, dtype=torch.float32, device=device).repeat(len(blocks), 1)
            self._register("slopes", values)  # (blocks, heads)
        elif self.bias == "reference_code":
            missing = [i for i in blocks if not enc.blocks[i].attn.use_rel_pos]
            if missing:
                raise PluginConfigError(
                    f"Plugin {self.key!r} (ba_sam): bias 'reference_code' scales SAM's relative-position "
                    f"bias, but blocks {missing} have none (use_rel_pos is off)."
                )
            values = torch.full((len(blocks),), float(self.coefficient_init), device=device)
            self._register("coefficients", values)  # (blocks,)

    def _register(self, name: str, values: Tensor) -> None:
        if self.learnable:
            self.register_parameter(name, nn.Parameter(values))
        else:
            self.register_buffer(name, values)

    def values(self, name: str) -> Tensor:
        """The slopes (blocks, heads) or coefficients (blocks,), parameters or buffers."""
        values = getattr(self, name)
        assert isinstance(values, Tensor)
        return values

    @override
    def sam_modules_to_train(self) -> list[str]:
        return ["mask_decoder"] if self.train_decoder else []

    # ---- the two terms ----
    def scale_factor(self, i: int, keys: int, ctx: ForwardContext) -> float:
        """ln(N)/ln(N_train) for block ``i`` with ``keys`` keys (1.0 where the scale is left alone)."""
        if not self.scale:
            return 1.0
        if self.windows[i] == 0:
            return length_scale(keys, self.train_grid**2)
        if not self.scale_windows:
            return 1.0
        h, w = self.grid(ctx)
        return length_scale(h * w, self.train_grid**2)

    def grid(self, ctx: ForwardContext) -> tuple[int, int]:
        """The encoder's token grid (h, w) for this batch's images."""
        size = ctx.image.shape[-2:]
        return size[0] // self.patch, size[1] // self.patch

    def block_grid(self, i: int, keys: int, ctx: ForwardContext) -> tuple[int, int]:
        """The grid block ``i`` attends over: its window, or the whole image for a global block."""
        window = self.windows[i]
        h, w = (window, window) if window > 0 else self.grid(ctx)
        if h * w != keys:
            raise RuntimeError(
                f"Plugin {self.key!r} (ba_sam): block {i} attends over {keys} keys, but its grid is {h} x {w}."
            )
        return h, w

    def distances(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype, ctx: ForwardContext
    ) -> Tensor:
        """dist(i, j) on ``grid`` (L, L) in ``dtype``, computed once per forward and shared by the blocks."""
        cache = ctx.state.setdefault(self.key, {}).setdefault("distance", {})
        key = (grid, device, dtype)
        if key not in cache:
            # computed in float32 at least (bf16 gets float32's values rounded once), float64 in float64
            exact = torch.promote_types(dtype, torch.float32)
            cache[key] = grid_distance(*grid, self.distance, device=device, dtype=exact).to(dtype)
        return cache[key]

    def penalty(self, i: int, keys: int, ctx: ForwardContext) -> Tensor:
        """-beta_h * dist(i, j) of block ``i`` with ``keys`` keys: (heads, L, L), in the slopes' dtype."""
        slopes = self.values("slopes")[self.rows[i]]
        dist = self.distances(self.block_grid(i, keys, ctx), slopes.device, slopes.dtype, ctx)
        return distance_bias(slopes, dist)

    @override
    def attn_logits(
        self, i: int, scale: float | Tensor, bias: Tensor | None, q: Tensor, ctx: ForwardContext
    ) -> tuple[float | Tensor, Tensor | None]:
        keys = q.shape[2]
        factor = self.scale_factor(i, keys, ctx)
        if factor != 1.0:
            scale = scale * factor
        if i not in self.rows:
            return scale, bias
        if self.bias == "distance":
            dtype = bias.dtype if bias is not None else q.dtype
            slopes = self.values("slopes")[self.rows[i]].to(dtype)
            dist = self.distances(self.block_grid(i, keys, ctx), slopes.device, dtype, ctx)
            if bias is None:
                bias = distance_bias(slopes, dist).unsqueeze(0)
            else:  # bias - beta_h * dist in one pass: no (heads, L, L) penalty is materialised
                bias = torch.addcmul(bias, -slopes[:, None, None], dist)
        elif self.bias == "reference_code":
            if bias is None:
                raise RuntimeError(
                    f"Plugin {self.key!r} (ba_sam): block {i} has no relative-position bias to scale."
                )
            bias = self.values("coefficients")[self.rows[i]].to(bias.dtype) * bias
        return scale, bias

    @override
    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        if i != 0 or not self.drop_pos_embed:
            return x
        pos = ctx.sam.image_encoder.pos_embed
        return x if pos is None else x - pos.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"bias={self.bias!r}, distance={self.distance!r}, learnable={self.learnable}, "
            f"scale={self.scale}, train_grid={self.train_grid}"
        )


def scale_at(img_size: int, train_size: int, head_dim: int, patch: int = 16) -> float:
    """BA-SAM's scale of a global block at ``img_size``: head_dim^-1/2 * ln(N)/ln(N_train)."""
    return head_dim**-0.5 * length_scale((img_size // patch) ** 2, (train_size // patch) ** 2)


__all__ = ["BIAS_MODES", "BASam", "native_img_size", "scale_at"]
