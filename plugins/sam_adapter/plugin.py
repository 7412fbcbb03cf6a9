"""SAM-Adapter: task prompts from high-frequency and patch-embedding features, added before each ViT block.

Chen et al., "SAM Fails to Segment Anything? SAM-Adapter", ICCV 2023 workshops, Sec. 3.2:

    F     = F_hfc + F_pe                                  (the task-specific knowledge, w_j = 1)
    P^i   = MLP_up( GELU( MLP_tune^i( F ) ) )             (Eq. 2; one MLP_tune^i per block, MLP_up shared)
    x^i   = block_i( x^{i-1} + P^i )

F_hfc is the high-frequency component of the normalised image, patch-embedded by a convolution with
SAM's patch size and stride to C/scale channels; F_pe is SAM's patch embedding (before the position
embedding) mapped by a linear C -> C/scale. F is computed once per forward; only MLP_tune^i differs
between blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor, nn
from typing_extensions import override

from samflow.plugins import ForwardContext, PluginConfigError, SamPlugin
from samflow.sam import upcast
from samflow_plugins.sam_adapter.frequency import HFC_MODES, HfcMode, high_frequency_components


def patch_tokens(tokens: Tensor, reference_order: bool = False) -> Tensor:
    """SAM's patch-embedding map (B, h, w, C) as the tokens F_pe is computed from, (B, h, w, C).

    Correct order: token (r, c) is the feature of patch (r, c), i.e. the map itself (a plain reshape of
    NHWC to (B, h*w, C) gives the same tokens in raster order).

    ``reference_order`` reproduces the reference repository's reshape bug: its NHWC buffer is reshaped
    as if it were NCHW, ``x.reshape(B, C, h*w).transpose(1, 2)``, so token s holds the flat elements
    s, s + h*w, s + 2*h*w, ... of each image's NHWC buffer, values strided across the whole image.
    """
    if not reference_order:
        return tokens
    b, h, w, c = tokens.shape
    return tokens.reshape(b, c, h * w).transpose(1, 2).reshape(b, h, w, c)


class SamAdapter(SamPlugin):
    """SAM-Adapter: adds P^i = MLP_up(GELU(MLP_tune^i(F_hfc + F_pe))) to the input of encoder blocks.

    With SAM ViT-B (C = 768, 12 blocks, scale 32 -> 24 channels) the adapter has 63,312 parameters;
    with ViT-H (C = 1280, 32 blocks -> 40 channels) 186,960: a patch-embedding conv of F_hfc
    (3 -> C/scale), a linear of SAM's patch tokens (C -> C/scale), one MLP_tune^i (C/scale -> C/scale)
    per block and a shared MLP_up (C/scale -> C). SAM's mask decoder is trained with it, as in the
    paper; the rest of SAM stays frozen. Gradients flow through the frozen encoder to the adapters.

    Prompts: SAM-Adapter uses none. Run it with the data's prompt mode ``none``: the decoder then gets
    SAM's own no-mask dense embedding and positional encoding, both from the checkpoint and frozen.
    The reference code differs here: it re-creates ``pe_layer`` and ``no_mask_embed`` outside SAM's
    prompt encoder, so the checkpoint does not load into them (``strict=False``): its decoder sees a
    random Fourier positional encoding and a randomly initialised, trained no-mask embedding (256
    more trainable parameters). Its released checkpoints are therefore not loadable here as is.

    Init follows the reference: linears truncated-normal (std 0.02) with zero bias, the conv
    normal(0, sqrt(2 / fan_out)) with zero bias. So the adapters change the frozen encoder's output
    from the first step; ``zero_init_up`` starts MLP_up at zero instead (the untrained model is then
    exactly frozen SAM).

    Args:
        scale_factor: bottleneck ratio; the adapters work in C // scale_factor channels.
        blocks: encoder blocks that receive a prompt P^i (default: all). MLP_tune^i exists only for them.
        hfc: how F_hfc is computed: ``fft`` (the paper: FFT high-pass of the normalised image),
            ``laplacian`` (|Laplacian|, kornia) or ``gaussian`` (|image - Gaussian blur|, kornia).
        freq_rate: ``fft``: fraction of the spectrum's area, a centred square around the zero frequency,
            that is removed (the reference's ``freq_nums``).
        laplacian_kernel: ``laplacian``: odd kernel size.
        gaussian_sigma: ``gaussian``: standard deviation in pixels of the blur.
        reference_token_order: compute F_pe from the reference code's scrambled patch tokens (its
            NHWC-as-NCHW reshape bug, see ``patch_tokens``). Kept for comparison with the released
            code only; leave it off.
        zero_init_up: start MLP_up at zero (weight and bias) instead of the reference's init.
        train_decoder: train SAM's mask decoder too (the paper); False trains the adapter alone.
        lr: learning rate of the adapter's parameters (default: the optimizer's). The mask decoder is
            trained with the same parameter group.
        weight_decay: weight decay of those parameters (default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx: the tuned decoder is traced (embeddings are inputs)

    needs_vit_encoder = True  # its setup reaches into SAM's ViT blocks

    def __init__(
        self,
        scale_factor: int = 32,
        blocks: Sequence[int] | None = None,
        hfc: HfcMode = "fft",
        freq_rate: float = 0.25,
        laplacian_kernel: int = 3,
        gaussian_sigma: float = 1.0,
        reference_token_order: bool = False,
        zero_init_up: bool = False,
        train_decoder: bool = True,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError(f"sam_adapter: scale_factor must be a positive integer, got {scale_factor}.")
        if hfc not in HFC_MODES:
            raise ValueError(f"sam_adapter: hfc must be one of {HFC_MODES}, got {hfc!r}.")
        if not 0.0 <= freq_rate <= 1.0:
            raise ValueError(f"sam_adapter: freq_rate must be in [0, 1], got {freq_rate}.")
        if laplacian_kernel < 3 or laplacian_kernel % 2 == 0:
            raise ValueError(f"sam_adapter: laplacian_kernel must be odd and >= 3, got {laplacian_kernel}.")
        if not gaussian_sigma > 0:
            raise ValueError(f"sam_adapter: gaussian_sigma must be positive, got {gaussian_sigma}.")
        if blocks is not None and not blocks:
            raise ValueError("sam_adapter: `blocks` is empty; leave it out (all blocks) or list indices.")
        self.scale_factor = scale_factor
        self.blocks = None if blocks is None else sorted(set(blocks))
        self.hfc = hfc
        self.freq_rate = freq_rate
        self.laplacian_kernel = laplacian_kernel
        self.gaussian_sigma = gaussian_sigma
        self.reference_token_order = reference_token_order
        self.zero_init_up = zero_init_up
        self.train_decoder = train_decoder

    @override
    def setup(self, sam: Sam) -> None:
        embed = sam.image_encoder.patch_embed.proj  # SAM's Conv2d(3 -> C, k=patch, s=patch)
        dim = embed.out_channels  # C
        depth = len(sam.image_encoder.blocks)
        hidden = dim // self.scale_factor  # C / scale
        if hidden < 1:
            raise PluginConfigError(
                f"Plugin {self.key!r} (sam_adapter): scale_factor {self.scale_factor} is larger than SAM's "
                f"embedding dimension {dim}; choose a scale_factor of at most {dim}."
            )
        blocks = list(range(depth)) if self.blocks is None else self.blocks
        wrong = [i for i in blocks if not 0 <= i < depth]
        if wrong:
            raise PluginConfigError(
                f"Plugin {self.key!r} (sam_adapter): blocks {wrong} do not exist; this SAM has {depth} "
                f"encoder blocks, 0..{depth - 1}."
            )
        # F_hfc (B, 3, S, S) -> (B, C/scale, h, w), on SAM's patch grid.
        self.hfc_embed = nn.Conv2d(
            embed.in_channels, hidden, embed.kernel_size, stride=embed.stride, padding=embed.padding
        )
        self.pe_embed = nn.Linear(dim, hidden)  # F_pe: (B, h, w, C) -> (B, h, w, C/scale)
        self.tune = nn.ModuleDict({str(i): nn.Linear(hidden, hidden) for i in blocks})  # MLP_tune^i
        self.up = nn.Linear(hidden, dim)  # MLP_up, shared by all blocks
        self.apply(_init_weights)
        if self.zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.to(embed.weight.device)

    @override
    def sam_modules_to_train(self) -> list[str]:
        return ["mask_decoder"] if self.train_decoder else []

    def high_frequency(self, image: Tensor) -> Tensor:
        """F_hfc (B, 3, S, S) of the normalised image, in float32 whatever the autocast setting."""
        with torch.autocast(image.device.type, enabled=False):
            return high_frequency_components(
                upcast(image), self.hfc, self.freq_rate, self.laplacian_kernel, self.gaussian_sigma
            )

    def features(self, image: Tensor, tokens: Tensor) -> Tensor:
        """F = F_hfc + F_pe (B, h, w, C/scale) from the normalised image and SAM's patch tokens."""
        f_hfc = self.hfc_embed(self.high_frequency(image)).permute(0, 2, 3, 1)  # (B, h, w, C/scale)
        f_pe = self.pe_embed(patch_tokens(tokens, self.reference_token_order))  # (B, h, w, C/scale)
        if f_hfc.shape != f_pe.shape:
            raise ValueError(
                f"Plugin {self.key!r} (sam_adapter): the high-frequency map embeds to {tuple(f_hfc.shape)} "
                f"but SAM's patch tokens give {tuple(f_pe.shape)}; the image must be SAM's input size."
            )
        return f_hfc + f_pe

    def prompt(self, i: int, features: Tensor) -> Tensor:
        """P^i = MLP_up(GELU(MLP_tune^i(F))): (B, h, w, C/scale) -> (B, h, w, C)."""
        return self.up(F.gelu(self.tune[str(i)](features)))

    @override
    def on_image(self, image: Tensor, tokens: Tensor, ctx: ForwardContext) -> None:
        ctx.state.setdefault(self.key, {})["features"] = self.features(image, tokens)

    @override
    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        if str(i) not in self.tune:
            return x
        state = ctx.state.get(self.key, {})
        if "features" not in state:
            raise RuntimeError(
                f"Plugin {self.key!r} (sam_adapter): block_input ran before on_image; run the encoder "
                "through HookedSam.encode so the adapter sees the image first."
            )
        return x + self.prompt(i, state["features"]).to(x.dtype)


def _init_weights(module: nn.Module) -> None:
    """The reference's init: linear trunc-normal std 0.02, conv normal(0, sqrt(2 / fan_out)), biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
