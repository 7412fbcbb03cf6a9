"""What the hooked forward pass hands to its hook sites, and what it returns.

The pass has two stages, and so do the contexts:
- ``ForwardContext``: known before the image encoder (the batch, the frozen SAM, the trainer's
  epoch); encoder-side hooks (``on_image``, ``block_input``, ``attn_logits``, ``block_output``)
  receive it;
- ``DecoderContext``: the same plus ``encoded`` (``EncodedImages``: the normalised images, their
  embeddings, the block features plugins asked for and SAM's dense positional encoding), never None;
  decoder-side hooks (``prompts``, ``decoder_layer``, ``decode_token``, ``select``, ``losses``)
  receive it.

``HookSites`` is the interface the forward pass calls; ``samflow.plugins.PluginStack`` implements
it with plugins. Its methods here are the no-op defaults (SAM alone).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from samflow.batch import SamBatch
from samflow.seeding import image_keys, stable_seed

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


@dataclass(kw_only=True)
class ForwardContext:
    """What one forward pass shares with the hooks, before the image encoder has run.

    Attributes:
        sam: the frozen SAM (read its modules, e.g. ``sam.prompt_encoder.pe_layer``; never keep it).
        batch: the ``SamBatch`` as the data module gave it, after device transforms.
        training: whether the model is in training mode.
        epoch, global_step: read from the trainer (0 outside a trainer).
        multimask_output: the model's rule for SAM's own mask: token 0 (False) or the best of
            tokens 1..3 by predicted IoU (True); plugins that combine their masks with SAM's follow it.
        state: scratch space per plugin key, emptied every forward.
    """

    sam: Sam
    batch: SamBatch
    training: bool = False
    epoch: int = 0
    global_step: int = 0
    multimask_output: bool = False
    state: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def image(self) -> Tensor:
        """The input in [0, 1], un-normalised (B, 3, S, S).

        A batch whose pixels were not decoded (``batch.pixels`` False: training from an embedding store
        where no plugin declared ``reads_image``) has none to give: reading it is an error that says so.
        """
        if not self.batch.pixels:
            from samflow.sam.cache import EncoderCacheError

            raise EncoderCacheError(
                "model.sam.embedding_store: this batch's images were not decoded (the store holds their "
                "encoder outputs and no plugin declared that it reads the image), but a plugin read them "
                "(ctx.image or ctx.encoded.normalized). Set `reads_image = True` on that plugin's class."
            )
        return self.batch.image

    @property
    def image_index(self) -> Tensor:
        """Which image each prompt row belongs to (N,)."""
        return self.batch.image_index

    def rand(
        self,
        stream: str,
        shape: Sequence[int] = (),
        *,
        per_image: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """U(0, 1) draws (N, *shape), one block per prompt row (``per_image``: (B, *shape), per image).

        How a plugin draws its randomness. Each row draws from a CPU generator of its own, seeded by
        (its image's key, the row's rank among its image's rows, ``stream``), so a row's draws depend
        neither on its batch, its place in it, nor the DDP rank (ranks share the global generator's
        state: one draw per batch would give their i-th rows the same noise). An image's key is:
        - its ``batch.sample_seed`` when the batch has them (training batches: ``ResumableLoader``
          derives them from run seed, epoch and index);
        - else its ``batch.id``: in evaluation the id alone, so every epoch, run and batching draws
          alike (a loss or metric that draws, such as HQ-SAM's loss points, compares between runs);
          in training the id with the run's seed (``torch.initial_seed()``) and the epoch, so every
          epoch draws afresh (two images with one id draw alike);
        - else (no seeds and no ids) there is none: one draw from the global generator on ``device``,
          as ``torch.rand`` does.
        Name ``stream`` after the plugin's key and the use (``f"{self.key}/mining"``): two streams
        never draw alike.
        """
        seeds = self.seeds(stream, per_image=per_image)
        if seeds is None:
            count = self.batch.num_images if per_image else self.batch.num_rows
            return torch.rand(count, *shape, device=device, dtype=dtype)
        target = torch.device(device) if device is not None else torch.device("cpu")
        # drawn on the host; page-locked for a GPU, so that the copy there does not wait for the device
        drawn = torch.empty(len(seeds), *shape, dtype=dtype, pin_memory=target.type == "cuda")
        generator = torch.Generator()
        for i, seed in enumerate(seeds):
            generator.manual_seed(seed)
            torch.rand(tuple(shape), generator=generator, dtype=dtype, out=drawn[i])  # in place: no copy
        return drawn.to(target, non_blocking=True)

    def seeds(self, stream: str, *, per_image: bool = False) -> list[int] | None:
        """The generator seed of each prompt row (``per_image``: each image) for ``stream``, the seeds
        ``rand`` draws from; None when the batch has no key per image (see ``rand``).

        For draws too large to make on the host (a dropout mask the size of an activation), seed a
        generator on the tensor's device with them: the draws then depend on the device's kind, but
        still neither on the batch nor on the row's place in it.
        """
        keys = self._image_keys if per_image else self._row_keys
        return None if keys is None else [_stream_seed(key, stream) for key in keys]

    @cached_property
    def _row_keys(self) -> list[tuple[int | str, ...]] | None:
        """(image key, rank among its image's rows) of each row; None without a key per image. Takes
        the rows' images from the batch's host copy (``SamBatch.image_index_host``): no device read."""
        images = self._image_keys
        if images is None:
            return None
        seen: dict[int, int] = {}
        keys: list[tuple[int | str, ...]] = []
        for image in self.batch.image_index_host:
            rank = seen.get(image, 0)
            seen[image] = rank + 1
            keys.append((*images[image], rank))
        return keys

    @cached_property
    def _image_keys(self) -> list[tuple[int | str, ...]] | None:
        """Each image's key (see ``rand``, ``samflow.seeding.image_keys``); None when the batch has
        neither a seed nor an id per image."""
        batch = self.batch
        return image_keys(
            batch.sample_seed, batch.id, batch.num_images, training=self.training, epoch=self.epoch
        )


def _stream_seed(key: tuple[int | str, ...], stream: str) -> int:
    """A 63-bit generator seed from a row's (or image's) key and a stream name: distinct inputs, independent seeds."""
    return stable_seed(*key, stream)


class EncodedImages:
    """What exists once the image encoder has run (B images, embedding grid h x w).

    Attributes:
        normalized: SAM's normalised input (B, 3, S, S), zero outside each image's ``input_size``.
            It may be given as a function: then it is computed on first use and kept (with the
            embedding store no encoder reads it, so only plugins that do pay for it).
        embeddings: the neck output (B, C, h, w).
        features: outputs (B, h', w', C_vit) of the encoder blocks that plugins ask for with
            ``SamPlugin.encoder_features``, by block index.
        image_pe: SAM's dense positional encoding of the embedding grid (1, C, h, w).
    """

    def __init__(
        self,
        *,
        normalized: Tensor | Callable[[], Tensor],
        embeddings: Tensor,
        features: dict[int, Tensor],
        image_pe: Tensor,
    ) -> None:
        self._normalized = normalized
        self.embeddings = embeddings
        self.features = features
        self.image_pe = image_pe

    @property
    def normalized(self) -> Tensor:
        if not isinstance(self._normalized, Tensor):
            self._normalized = self._normalized()
        return self._normalized

    def __repr__(self) -> str:
        return f"EncodedImages(embeddings={tuple(self.embeddings.shape)}, features={sorted(self.features)})"


@dataclass(kw_only=True)
class DecoderContext(ForwardContext):
    """``ForwardContext`` plus the encoder's results; what the decoder-side hooks receive."""

    encoded: EncodedImages

    @classmethod
    def after_encoder(cls, ctx: ForwardContext, encoded: EncodedImages) -> DecoderContext:
        """The decoder stage of ``ctx`` (sharing its ``state``)."""
        fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ForwardContext)}
        return cls(**fields, encoded=encoded)


@dataclass
class PromptEmbeddings:
    """SAM's prompt embeddings for N rows: what the ``prompts`` hook receives and returns.

    ``visible`` marks the sparse tokens that exist for a row; the others (empty point slots, the box
    corners of a row without a box) take no part in any attention, so a row's output never depends
    on its batch-mates. A plugin that appends sparse tokens appends to ``visible`` too (``append``).
    """

    sparse: Tensor  # (N, K, C)
    visible: Tensor  # (N, K) bool
    dense: Tensor  # (N, C, h, w)

    def append(self, tokens: Tensor, visible: Tensor | None = None) -> PromptEmbeddings:
        """Add sparse tokens (N, k, C), visible unless ``visible`` (N, k) says otherwise."""
        if visible is None:
            visible = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return dataclasses.replace(
            self, sparse=torch.cat([self.sparse, tokens], 1), visible=torch.cat([self.visible, visible], 1)
        )


@dataclass
class DecoderState:
    """The two-way transformer's state at the ``decoder_layer`` site (after token-to-image attention).

    N prompt rows, T tokens, HW image tokens, C channels. ``visible`` (N, T) marks the tokens that
    take part in attention as keys. A plugin appends tokens with ``append``; they take part in every
    later attention and are dropped before the heads. A plugin returns changed tensors as new ones
    (``dataclasses.replace``), never writing into these in place: the layer goes on with the tensors
    it gets back (``key_pe`` is read only).
    """

    queries: Tensor  # (N, T, C) tokens after self-attention and norm1
    keys: Tensor  # (N, HW, C) image tokens
    query_pe: Tensor  # (N, T, C) positional encoding of the tokens
    key_pe: Tensor  # (N, HW, C) positional encoding of the image
    attn_out: Tensor  # (N, T, C) token-to-image attention output, before the residual
    visible: Tensor  # (N, T) bool

    def append(
        self, queries: Tensor, attn_out: Tensor, query_pe: Tensor, visible: Tensor | None = None
    ) -> DecoderState:
        """Add tokens: their queries, attention outputs and positional encodings, each (N, k, C)."""
        if visible is None:
            visible = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        return dataclasses.replace(
            self,
            queries=torch.cat([self.queries, queries], 1),
            attn_out=torch.cat([self.attn_out, attn_out], 1),
            query_pe=torch.cat([self.query_pe, query_pe], 1),
            visible=torch.cat([self.visible, visible], 1),
        )


@dataclass
class DecoderFeatures:
    """What the mask decoder hands to ``decode_token`` after the two-way transformer."""

    tokens: Tensor  # (N, T', C) all token outputs
    src: Tensor  # (N, C, h, w) image tokens after the transformer
    upscaled: Tensor  # (N, C/8, 4h, 4w) SAM's upscaled mask features
    sam_masks: Tensor  # (N, 4, 4h, 4w) SAM's mask logits
    iou_pred: Tensor  # (N, 4) SAM's predicted IoU of each of its mask tokens
    prompt_tokens: Tensor | None = None  # (N, K, C) outputs of the sparse prompt tokens, as appended


def sam_rule(sam_masks: Tensor, iou_pred: Tensor, multimask_output: bool) -> Tensor:
    """SAM's choice among its mask tokens (N, 4, h, w) -> (N, 1, h, w).

    Token 0 without multimask output; otherwise the token among 1..3 with the highest predicted IoU.
    """
    if not multimask_output:
        return sam_masks[:, :1]
    best = iou_pred[:, 1:].argmax(dim=1) + 1  # (N,)
    return sam_masks[torch.arange(sam_masks.shape[0], device=sam_masks.device), best].unsqueeze(1)


@dataclass
class SamOutput:
    """Named mask logits and everything plugins report.

    Shapes use N for prompt rows (one row per image unless several prompts share an image) and
    (h, w) for the decoder's low resolution (4x the embedding grid, 256 x 256 for SAM at 1024).

    Attributes:
        masks: name -> mask logits (N, M, h, w). ``"sam"`` holds SAM's four mask tokens (token 0 is the
            single-mask output, 1..3 the multimask outputs); a plugin's masks are ``"<key>/<name>"``.
        iou_pred: SAM's predicted IoU for each of its four mask tokens (N, 4).
        image_index: which image of the batch each row belongs to (N,).
        pred: the selected prediction (N, 1, h, w) after ``select``; losses and metrics use it.
        extras: anything else plugins report, keyed ``"<key>/<name>"``.
        context: with context views (``SamBatch.context_image``), the same outputs for every row in
            its image's context view (``image_index`` into the context images); None otherwise.
    """

    masks: dict[str, Tensor]
    iou_pred: Tensor
    image_index: Tensor
    pred: Tensor = None  # type: ignore[assignment]  # set by the forward pass after ``select``
    extras: dict[str, Any] = field(default_factory=dict)
    context: SamOutput | None = None

    def split_context(self, rows: int, images: int) -> SamOutput:
        """Rows [0, rows) as the output, rows [rows, 2 rows) (on images ``images`` on) as its ``context``."""

        def part(sl: slice, shift: int) -> SamOutput:
            return SamOutput(
                masks={k: v[sl] for k, v in self.masks.items()},
                iou_pred=self.iou_pred[sl],
                image_index=self.image_index[sl] - shift,
                pred=self.pred[sl] if self.pred is not None else self.pred,
                extras=self.extras,
            )

        out = part(slice(0, rows), 0)
        out.context = part(slice(rows, None), images)
        return out

    def sam_default(self, multimask_output: bool) -> Tensor:
        """SAM's own rule (``sam_rule``) on its mask tokens."""
        return sam_rule(self.masks["sam"], self.iou_pred, multimask_output)


class HookSites:
    """The hook sites the forward pass calls, as no-ops: SAM alone. ``PluginStack`` overrides them."""

    def attach(self, sam: Sam) -> None:
        """Set the hooks up on ``sam`` (once, when the model is built)."""

    def encoder_features(self) -> tuple[int, ...]:
        """Encoder blocks whose outputs the hooks read."""
        return ()

    def encoder_hook_users(self) -> list[str]:
        """Who changes or sees the inside of the image encoder (for the encoder cache's check)."""
        return []

    def image_readers(self) -> list[str]:
        """Who reads the image's pixels on the decoder side (``SamPlugin.reads_image``)."""
        return []

    def trained_encoder_parameters(self) -> dict[str, list[str]]:
        """Owner -> names of trained parameters inside the image encoder (for the encoder cache's check)."""
        return {}

    def injected_modules(self) -> list[nn.Module]:
        """Modules the hooks put into SAM (e.g. LoRA layers); they follow the model's train/eval mode."""
        return []

    def uses(self, hook: str) -> bool:
        """Whether any hook fills the site ``hook``."""
        return False

    def on_image(self, image: Tensor, tokens: Tensor, ctx: ForwardContext) -> None:
        return None

    def block_input(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        return x

    def attn_logits(
        self, i: int, scale: float | Tensor, bias: Tensor | None, q: Tensor, ctx: ForwardContext
    ) -> tuple[float | Tensor, Tensor | None]:
        return scale, bias

    def block_output(self, i: int, x: Tensor, ctx: ForwardContext) -> Tensor:
        return x

    def prompts(self, prompts: PromptEmbeddings, ctx: DecoderContext) -> PromptEmbeddings:
        return prompts

    def decoder_layer(self, i: int, state: DecoderState, ctx: DecoderContext) -> DecoderState:
        return state

    def output_tokens(self) -> Tensor | None:
        return None

    def decode_tokens(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        return {}

    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor | None:
        return None


class NoHooks(HookSites, nn.Module):
    """SAM alone: every site a no-op (an ``nn.Module`` so the model's structure is the same)."""


_RUNNING: ContextVar[ForwardContext | None] = ContextVar("samflow_running_block", default=None)


def current_context() -> ForwardContext | None:
    """The ``ForwardContext`` of the image-encoder block that ``HookedSam`` is running, also while
    activation checkpointing recomputes it; None outside a block.

    For modules a plugin puts inside SAM's encoder that need the forward's keys without a hook of
    their own (LoRA's per-image dropout reads ``current_context().seeds(...)``): hooks are what the
    plugin adds to the computation, and such a module adds nothing at inference.
    """
    return _RUNNING.get()


@contextlib.contextmanager
def running(ctx: ForwardContext) -> Iterator[None]:
    """Make ``ctx`` the ``current_context()`` inside the block."""
    token = _RUNNING.set(ctx)
    try:
        yield
    finally:
        _RUNNING.reset(token)
