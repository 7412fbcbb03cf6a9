"""The plugin contract: ``SamPlugin`` with no-op hooks, and the objects hooks receive.

A plugin overrides only the hooks it needs, like a Lightning ``Callback``; the stack calls only
overridden hooks. Structural work (building parameters from SAM's dimensions) happens once in
``setup``; data flows per batch through an explicit ``ForwardContext``, never through globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from samflow.sam.output import SamOutput


@dataclass
class ForwardContext:
    """What one forward pass shares between the hooked SAM and its plugins.

    Attributes:
        sam: the frozen SAM (read its modules, e.g. ``sam.prompt_encoder.pe_layer``; never keep it).
        batch: the batch as the data module gave it, after device transforms.
        image: the input in [0, 1], un-normalised, (B, 3, S, S); SAM's normalised input is
            ``normalized`` once the encoder has started.
        training: whether the model is in training mode.
        epoch, global_step: read from the trainer (0 outside a trainer).
        image_index: which image each prompt row belongs to (N,).
        multimask_output: the model's rule for SAM's own mask: token 0 (False) or the best of
            tokens 1..3 by predicted IoU (True); plugins that combine their masks with SAM's follow it.
        image_embeddings: the neck output (B, C, h, w), set after the encoder.
        encoder_features: outputs (B, h, w, C) of the encoder blocks that plugins ask for with
            ``SamPlugin.encoder_features``, by block index, set after the encoder.
        image_pe: SAM's dense positional encoding (1, C, h, w), set before the decoder.
        state: scratch space per plugin key, emptied every forward.
    """

    sam: Sam
    batch: dict[str, Any]
    image: Tensor
    training: bool = False
    epoch: int = 0
    global_step: int = 0
    image_index: Tensor | None = None
    multimask_output: bool = False
    normalized: Tensor | None = None
    image_embeddings: Tensor | None = None
    encoder_features: dict[int, Tensor] = field(default_factory=dict)
    image_pe: Tensor | None = None
    state: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class DecoderState:
    """The two-way transformer's state at the ``decoder_layer`` site (after token-to-image attention).

    N prompt rows, T tokens, HW image tokens, C channels. A plugin may append tokens: extend
    ``queries``, ``attn_out`` and ``query_pe`` by the same number of rows; they take part in every
    later attention and are dropped before the heads.
    """

    queries: Tensor  # (N, T, C) tokens after self-attention and norm1
    keys: Tensor  # (N, HW, C) image tokens
    query_pe: Tensor  # (N, T, C) positional encoding of the tokens
    key_pe: Tensor  # (N, HW, C) positional encoding of the image
    attn_out: Tensor  # (N, T, C) token-to-image attention output, before the residual


@dataclass
class DecoderFeatures:
    """What the mask decoder hands to ``decode_token`` after the two-way transformer."""

    tokens: Tensor  # (N, T', C) all token outputs
    src: Tensor  # (N, C, h, w) image tokens after the transformer
    upscaled: Tensor  # (N, C/8, 4h, 4w) SAM's upscaled mask features
    sam_masks: Tensor  # (N, 4, 4h, 4w) SAM's mask logits
    iou_pred: Tensor  # (N, 4) SAM's predicted IoU of each of its mask tokens


class SamPlugin(nn.Module):
    """Base class of every samflow plugin: each hook is a no-op; override what you need.

    Args:
        lr: learning rate of this plugin's parameters (default: the optimizer's).
        weight_decay: weight decay of this plugin's parameters (default: the optimizer's).
    """

    #: Names of registered plugins this one cannot run with.
    conflicts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lr: float | None = None, weight_decay: float | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.key = ""  # set by the stack: the name given in the experiment

    # ---- setup (structural, once) ----
    def setup(self, sam: Sam) -> None:
        """Read SAM's dimensions and build parameters. Do not store ``sam``."""

    def sam_modules_to_train(self) -> list[str]:
        """Dotted names of SAM sub-modules this plugin trains (e.g. ``["mask_decoder"]``)."""
        return []

    def output_tokens(self) -> Tensor | None:
        """Extra decoder output tokens (T, C), placed after SAM's mask tokens."""
        return None

    def encoder_features(self) -> tuple[int, ...]:
        """Encoder blocks whose outputs this plugin reads, from ``ctx.encoder_features[i]`` (B, h, w, C).

        Prefer this to overriding ``block_output`` to capture a feature: a plugin that only reads
        the encoder leaves it a pure function of the image, so its outputs can be cached.
        """
        return ()

    # ---- forward (per batch) ----
    def on_image(self, image: Tensor, tokens: Tensor, ctx: ForwardContext) -> None:
        """See the normalised image (B, 3, S, S) and patch tokens (B, h, w, C) before position embedding."""

    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Change the input (B, h, w, C) of encoder block ``i``."""
        return x

    def attn_logits(
        self, i: int, scale: float | Tensor, bias: Tensor | None, q: Tensor, ctx: ForwardContext
    ) -> tuple[float | Tensor, Tensor | None]:
        """Change encoder block ``i``'s attention: logits = scale * q k^T + bias, q (B', heads, L, d)."""
        return scale, bias

    def block_output(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        """See or change the output (B, h, w, C) of encoder block ``i`` (e.g. capture early features)."""
        return x

    def prompts(self, sparse: Tensor, dense: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """Change the sparse (N, K, C) and dense (N, C, h, w) prompt embeddings."""
        return sparse, dense

    def decoder_layer(self, i: int, state: DecoderState, ctx: ForwardContext) -> DecoderState:
        """Change the two-way transformer's state in layer ``i`` after its token-to-image attention."""
        return state

    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: ForwardContext) -> dict[str, Tensor]:
        """Turn this plugin's output tokens (N, T, C) into named mask logits (N, M, 4h, 4w)."""
        return {}

    def select(self, out: SamOutput, ctx: ForwardContext) -> Tensor | None:
        """Choose the prediction (N, 1, h, w) among the outputs; None leaves the choice to others."""
        return None

    def losses(self, out: SamOutput, batch: dict[str, Any], ctx: ForwardContext) -> dict[str, Tensor]:
        """Extra loss terms of this plugin; they are added to the experiment's losses."""
        return {}
