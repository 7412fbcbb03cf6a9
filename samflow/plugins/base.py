"""The plugin contract: ``SamPlugin`` with no-op hooks.

A plugin overrides only the hooks it needs, like a Lightning ``Callback``; the stack calls only
overridden hooks. Structural work (building parameters from SAM's dimensions, wrapping SAM modules)
happens once in ``setup``; data flows per batch through an explicit context, never through globals:
encoder-side hooks receive a ``ForwardContext``, decoder-side hooks a ``DecoderContext`` whose
``encoded`` (embeddings, block features, dense PE) is always there. The objects hooks receive are
defined in ``samflow.sam.types`` and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from samflow.batch import SamBatch
from samflow.sam.types import (
    DecoderContext,
    DecoderFeatures,
    DecoderState,
    EncodedImages,
    ForwardContext,
    PromptEmbeddings,
    SamOutput,
)

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = [
    "DecoderContext",
    "DecoderFeatures",
    "DecoderState",
    "EncodedImages",
    "ForwardContext",
    "PromptEmbeddings",
    "SamBatch",
    "SamOutput",
    "SamPlugin",
    "SamplePanel",
]


@dataclass
class SamplePanel:
    """A picture a plugin adds to every row of the validation sample grids (``SamPlugin.sample_panels``).

    Attributes:
        values: (N, 1, h, w) in [0, 1], one map per prompt row at any resolution (resized to the
            grid's S x S input frame): a probability (``logits.sigmoid()``) or any map scaled to [0, 1].
        style: ``"mask"`` overlays ``values > 0.5`` in colour on the image; ``"heat"`` shows the values
            as a heat map blended over the image.
        points: (N, K, 2) x, y in the S x S input frame, drawn as dots, or None.
        point_labels: (N, K): 1 positive (green), 0 negative (red), -1 not drawn; None: all positive.
    """

    values: Tensor
    style: str = "mask"
    points: Tensor | None = None
    point_labels: Tensor | None = None


class SamPlugin(nn.Module):
    """Base class of every samflow plugin: each hook is a no-op; override what you need.

    A plugin declares what it does with class attributes (documented where they are defined):
    ``needs_vit_encoder`` (it reaches into SAM's ViT: refused by name on MobileSAM / EfficientSAM),
    ``reads_image`` (its decoder-side hooks read the pixels), ``predicts`` (its ``select`` gives the
    prediction), ``onnx_exportable`` and ``conflicts``. ``self.key`` is its key in ``model.plugins``,
    set before ``setup`` (name it in errors: ``samflow.plugins.PluginConfigError``).

    Args:
        lr: learning rate of this plugin's parameters (default: the optimizer's).
        weight_decay: weight decay of this plugin's parameters (default: the optimizer's).
    """

    #: Names of registered plugins this one cannot run with.
    conflicts: ClassVar[tuple[str, ...]] = ()
    #: True for a plugin that changes SAM's ViT image encoder (its blocks, attention or patch
    #: embedding): the stack refuses it, naming the plugin, on the other backbones (MobileSAM's
    #: TinyViT, EfficientSAM), whose encoders have another structure.
    needs_vit_encoder: ClassVar[bool] = False
    #: True for a plugin whose decoder side ``samflow export --onnx`` may trace: its decoder-side hooks
    #: (``prompts``, ``decoder_layer``, ``decode_token``, ``select``) take no Python branch on tensor
    #: values, draw no random numbers, keep nothing from the encoder stage in ``ctx.state`` and read
    #: of the image only ``ctx.encoded.embeddings``, ``features`` and ``image_pe``. Undeclared plugins
    #: are refused by name (``samflow.onnx_export``).
    onnx_exportable: ClassVar[bool] = False
    #: True for a plugin that reads the image's pixels in its decoder-side hooks (``ctx.image`` or
    #: ``ctx.encoded.normalized``; PA-SAM's edges). Training from an embedding store
    #: (``model.sam.embedding_store``) decodes no training image unless a plugin of the run says so;
    #: an undeclared plugin that reads one is stopped by an error naming this attribute.
    reads_image: ClassVar[bool] = False

    @property
    def predicts(self) -> bool | None:
        """Whether ``select`` gives the model's prediction (returns a mask): one plugin of a model at most
        may, and two that declare True are refused when the model is built, naming both.

        Default: False for a plugin that does not override ``select``, None (undeclared: found out at
        the first forward) for one that does. Declare it as a class attribute (``predicts = True``) or,
        when an option decides, a property (the extra tokens' ``predict``).
        """
        return None if type(self).select is not SamPlugin.select else False

    def __init__(self, lr: float | None = None, weight_decay: float | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.key = ""  # set by the stack: the name given in the experiment

    # ---- setup (structural, once) ----
    def setup(self, sam: Sam) -> None:
        """Read SAM's dimensions and build parameters; may wrap or inject modules into ``sam``.

        Do not store ``sam``. Parameters that appear in ``sam`` during this call (an injected or
        wrapping module, e.g. LoRA on ``attn.qkv``) belong to this plugin and train if they require
        grad; SAM's own parameters stay frozen unless named by ``sam_modules_to_train``.
        """

    def sam_modules_to_train(self) -> list[str]:
        """Dotted names of SAM sub-modules this plugin trains (e.g. ``["mask_decoder"]``)."""
        return []

    def output_tokens(self) -> Tensor | None:
        """Extra decoder output tokens (T, C), placed after SAM's mask tokens."""
        return None

    def encoder_features(self) -> tuple[int, ...]:
        """Encoder blocks whose outputs this plugin reads, from ``ctx.encoded.features[i]`` (B, h, w, C).

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
        """Change encoder block ``i``'s attention: logits = scale * q k^T + bias, q (B', heads, L, d), bias
        written in place or replaced."""
        return scale, bias

    def block_output(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Change the output (B, h, w, C) of encoder block ``i``. To only read it, declare the block in
        ``encoder_features`` instead: this hook makes the encoder's output uncacheable."""
        return x

    def prompts(self, prompts: PromptEmbeddings, ctx: DecoderContext) -> PromptEmbeddings:
        """Change the sparse (N, K, C) and dense (N, C, h, w) prompt embeddings (``PromptEmbeddings.append``
        adds sparse tokens with their visibility)."""
        return prompts

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        """Change the two-way transformer's state in layer ``i`` after its token-to-image attention
        (``DecoderState.append`` adds tokens)."""
        return state

    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        """Turn this plugin's output tokens (N, T, C) into named mask logits (N, M, 4h, 4w)."""
        return {}

    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor | None:
        """Choose the prediction (N, 1, h, w) among the outputs; None leaves it to SAM's rule. One plugin of
        a model at most may choose (declare ``predicts``): two that both return a prediction are refused,
        naming both."""
        return None

    def losses(self, out: SamOutput, batch: SamBatch, ctx: DecoderContext) -> dict[str, Tensor]:
        """Extra loss terms of this plugin, name -> scalar, each added as it is (weight it yourself) to the
        experiment's losses: in training (logged as ``train/loss/<key>/<name>``) and in evaluation on
        batches with a mask (in ``val/loss``); ``ctx.training`` tells which."""
        return {}

    # ---- pictures (validation sample grids; not part of the forward pass) ----
    def sample_panels(self, out: SamOutput, ctx: DecoderContext) -> dict[str, SamplePanel]:
        """Extra panels of the validation sample grids, name -> ``SamplePanel`` (e.g. an HQ mask)."""
        return {}
