"""LoRA on SAM's image encoder (SAMed-style), injected with peft.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, applied to SAM's image
encoder as in SAMed: Zhang & Liu, "Customized Segment Anything Model for Medical Image Segmentation",
arXiv:2304.13785, 2023 (reference: hitachinsk/SAMed). Each adapted linear layer W (out x in) of the
frozen encoder computes

    h = W x + (alpha / r) B A dropout(x)        A: (r, in), B: (out, r)

A is initialised as peft does (Kaiming-uniform, as SAMed), B is zero, so at the start h = W x and the
model is frozen SAM exactly. Trainable: r (in + out) per adapted layer, nothing else. The layers are
peft's own (``peft.inject_adapter_in_model`` with a ``LoraConfig``): after ``setup`` SAM's
``blocks.i.attn.qkv`` is a ``peft.tuners.lora.Linear`` whose ``base_layer`` is SAM's frozen linear, and
the adapter's parameters are ``...qkv.lora_A.<key>.weight`` and ``...qkv.lora_B.<key>.weight`` (the
adapter is named after the plugin's key). With ``dropout`` > 0 the layer's ``lora_dropout`` entry is
``KeyedDropout`` instead of peft's ``nn.Dropout``: each image's mask is drawn from its own key, so an
image's output and gradients do not depend on its batch (``samflow_plugins/lora/dropout.py``).
``merged_sam_state_dict`` folds the deltas into the weights for export (``W + (alpha / r) B A``),
giving a plain segment-anything state dict.

The other frozen backbones (``samflow/sam/backbones``) take it too, on the same short target names:
EfficientSAM's ViT blocks have SAM's ``attn.qkv`` and ``attn.proj`` and name the MLP's layers
``mlp.fc1`` and ``mlp.fc2`` (the official names), which ``lin1`` and ``lin2`` adapt; MobileSAM's
TinyViT has them in its 10 attention blocks (hook units 2-11, under ``layers.s.blocks.j``), and its
convolutional blocks 0-1 have no linear layer to adapt.

Compared with SAMed: SAMed adds two rank-r deltas to the fused ``qkv`` layer, one on q and one on v
(delta W_qkv = [B_q A_q; 0; B_v A_v], scale 1), while peft's LoRA on ``qkv`` adds one rank-r delta to
q, k and v together. Both train 4 r C values per block (C the encoder width): r (C + 3C) here, 2 r (C + C)
in SAMed. ``alpha`` defaults to ``rank``, SAMed's scale of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from segment_anything.modeling import Sam
from torch import Tensor, nn
from typing_extensions import override

from samflow.plugins import PluginConfigError, SamPlugin
from samflow_plugins.lora.dropout import KeyedDropout
from samflow_plugins.lora.merge import merged_sam_state_dict

if TYPE_CHECKING:
    from peft import LoraConfig

# peft (which imports transformers, seconds) is imported where the LoRA layers are built or read, not
# here: `samflow plugins` and every run without this plugin import this module but need no peft.

#: Short names of the linear layers of a SAM encoder block that can be adapted.
TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.lin1", "lin2": "mlp.lin2"}
#: The same layers' names in the blocks of MobileSAM's TinyViT and EfficientSAM's ViT (official names).
BACKBONE_NAMES = {"mlp.lin1": "mlp.fc1", "mlp.lin2": "mlp.fc2"}


class LoRA(SamPlugin):
    """peft's LoRA on the linear layers of chosen image-encoder blocks; SAM's weights stay frozen.

    Trainable: ``rank * (in + out)`` per adapted layer, owned by this plugin (they live in SAM, under
    ``image_encoder.blocks.i.<target>.lora_A/lora_B``, and are kept in the slim checkpoint). ViT-B with
    the defaults (rank 4, ``qkv`` of all 12 blocks): 12 * 4 * (768 + 2304) = 147,456. MobileSAM
    (TinyViT: the 10 attention blocks, its convolutional blocks 0-1 have no linear layer) and EfficientSAM
    take it too, ``lin1``/``lin2`` adapting their ``mlp.fc1``/``mlp.fc2``; MobileSAM with the defaults:
    29,696. The encoder's output changes with training, so ``model.sam.encoder_cache`` is refused with
    this plugin.

    Args:
        rank: r, the rank of each delta B A (SAMed: 4).
        alpha: the delta is scaled by alpha / r; default ``rank`` (scale 1, as SAMed).
        dropout: dropout on the input of A in training (SAMed: none), with a mask per image drawn from the
            image's key (``KeyedDropout``, in place of peft's ``nn.Dropout``): an image's loss and
            gradients are the same alone or in any batch, and activation checkpointing redraws the same
            mask. It lives inside SAM, which samflow keeps in eval mode, and follows the model's mode.
        blocks: encoder blocks to adapt (0-based, as the block hooks count them); default all that have
            the targets (MobileSAM: 2-11).
        targets: linear layers of each block to adapt: ``qkv`` (``attn.qkv``), ``proj`` (``attn.proj``),
            ``lin1``, ``lin2`` (``mlp.lin1``, ``mlp.lin2``; ``mlp.fc1``, ``mlp.fc2`` in MobileSAM and
            EfficientSAM), short or dotted names.
        lr: learning rate of the LoRA parameters (default: the optimizer's).
        weight_decay: their weight decay (default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx: encoder side only (embeddings are inputs)

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        blocks: Sequence[int] | None = None,
        targets: Sequence[str] = ("qkv",),
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if rank < 1:
            raise ValueError(f"lora: rank must be at least 1, got {rank}.")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"lora: alpha must be positive, got {alpha}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora: dropout must lie in [0, 1), got {dropout}.")
        if blocks is not None and not list(blocks):
            raise ValueError("lora: `blocks` is empty; leave it out to adapt every encoder block.")
        if not targets:
            raise ValueError(f"lora: `targets` is empty; choose among {sorted(TARGETS)}.")
        dotted = {v: v for v in TARGETS.values()} | {fc: sam for sam, fc in BACKBONE_NAMES.items()}
        unknown = [t for t in targets if t not in TARGETS and t not in dotted]
        if unknown:
            raise ValueError(
                f"lora: unknown target(s) {unknown}; choose among {sorted(TARGETS)} "
                f"(or their dotted names {sorted(dotted)})."
            )
        self.rank = rank
        self.alpha = float(rank) if alpha is None else float(alpha)
        self.dropout = dropout
        self.blocks = None if blocks is None else [int(i) for i in blocks]
        self.targets = list(dict.fromkeys(TARGETS.get(t) or dotted[t] for t in targets))  # SAM's dotted names
        self.adapted: list[str] = []  # set in setup: SAM module names that carry this plugin's LoRA

    @property
    def adapter_name(self) -> str:
        """peft's name of this plugin's adapter: the plugin's key in the experiment."""
        return self.key or "default"

    @property
    def scaling(self) -> float:
        """alpha / r, the factor of every delta B A."""
        return self.alpha / self.rank

    def lora_config(self, depth: int, names: Sequence[str] | None = None) -> LoraConfig:
        """peft's ``LoraConfig`` of this plugin for SAM's ViT encoder of ``depth`` blocks, or for the
        layers ``names`` (full names relative to the encoder, as ``setup`` finds them in any backbone)."""
        from peft import LoraConfig

        if names is None:
            blocks = range(depth) if self.blocks is None else self.blocks
            names = [f"blocks.{i}.{t}" for i in blocks for t in self.targets]
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is all it uses
            lora_dropout=self.dropout,
            target_modules=list(names),
            bias="none",
        )

    def _layers(self, encoder: nn.Module) -> dict[str, nn.Module]:
        """The modules to adapt by their names in ``encoder`` (block order, then name): the targets of
        the chosen blocks, under each block's own path (MobileSAM's blocks live in ``layers.s.blocks``)."""
        blocks: Sequence[nn.Module] = encoder.blocks  # type: ignore[assignment]
        depth = len(blocks)
        wrong = [i for i in self.blocks or [] if not 0 <= i < depth]
        if wrong:
            raise PluginConfigError(
                f"Plugin {self.key!r} (lora): block(s) {wrong} do not exist; the encoder has blocks 0..{depth - 1}."
            )
        paths = {id(m): name for name, m in encoder.named_modules()}
        found: dict[int, dict[str, nn.Module]] = {}  # block -> {target's name in the block: module}
        for i, block in enumerate(blocks):
            layers = {}
            for target in self.targets:
                name = next((n for n in (target, BACKBONE_NAMES.get(target)) if n and _has(block, n)), None)
                if name is not None:
                    layers[name] = block.get_submodule(name)
            if len(layers) == len(self.targets):
                found[i] = layers
        chosen = list(found) if self.blocks is None else self.blocks
        lacking = [i for i in chosen if i not in found]
        if lacking or not chosen:
            short = {v: k for k, v in TARGETS.items()}
            raise PluginConfigError(
                f"Plugin {self.key!r} (lora): block(s) {lacking or list(range(depth))} of this SAM's "
                f"{type(encoder).__name__} encoder have no {[short[t] for t in self.targets]} layers to adapt; "
                f"the blocks that have them: {list(found) or 'none'} (leave `blocks` out to adapt all of them)."
            )
        return {
            f"{paths[id(blocks[i])]}.{name}": found[i][name]
            for i in sorted(set(chosen))
            for name in sorted(found[i])
        }

    @override
    def setup(self, sam: Sam) -> None:
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        encoder = sam.image_encoder
        modules = self._layers(encoder)
        names = list(modules)
        config = self.lora_config(len(encoder.blocks), names)
        taken = [f"image_encoder.{n}" for n, m in modules.items() if isinstance(m, BaseTunerLayer)]
        if taken:
            raise PluginConfigError(
                f"Plugin {self.key!r} (lora): already adapted by peft: {', '.join(taken[:3])}; "
                "give each LoRA plugin its own blocks or targets."
            )
        wrapped = [
            f"image_encoder.{n} ({type(m).__name__})"
            for n, m in modules.items()
            if not isinstance(m, nn.Linear)
        ]
        if wrapped:
            raise PluginConfigError(
                f"Plugin {self.key!r} (lora): not an nn.Linear (another plugin wraps it): "
                f"{', '.join(wrapped[:3])}; put lora first in model.plugins or adapt other targets."
            )
        # peft freezes every non-adapter parameter of the model it injects into; what trains in SAM
        # is the stack's decision, so the flags of the parameters already there are kept.
        requires_grad = {id(p): p.requires_grad for p in encoder.parameters()}
        configs = encoder.__dict__.pop("peft_config", {})  # another LoRA plugin's adapters, if any
        inject_adapter_in_model(config, encoder, adapter_name=self.adapter_name)
        encoder.peft_config = {**configs, **encoder.peft_config}
        for param in encoder.parameters():
            if id(param) in requires_grad:
                param.requires_grad_(requires_grad[id(param)])
        self.adapted = [f"image_encoder.{name}" for name in names]
        if self.dropout > 0:  # peft's entry, read at every call, takes the per-image dropout
            for name in names:
                dropout = KeyedDropout(self.dropout, f"{self.adapter_name}/dropout/{name}")
                encoder.get_submodule(name).lora_dropout[self.adapter_name] = dropout

    def merged_sam_state_dict(self, sam: Sam) -> dict[str, Tensor]:
        """A plain segment-anything state dict of ``sam`` with the LoRA deltas folded in (for export).

        Every LoRA layer in ``sam`` is folded, this plugin's and any other LoRA plugin's, so that
        ``Sam.load_state_dict(..., strict=True)`` of the same variant takes the result; see
        ``samflow_plugins.lora.merged_sam_state_dict``. ``sam`` is not changed.
        """
        missing = [name for name in self.adapted if not self._carries(sam, name)]
        if missing or not self.adapted:
            raise ValueError(
                f"Plugin {self.key!r} (lora): this SAM does not carry its LoRA layers "
                f"({missing[:3] or 'setup has not run'}); pass the SAM the plugin was set up on."
            )
        return merged_sam_state_dict(sam)

    def _carries(self, sam: Sam, name: str) -> bool:
        """Whether SAM module ``name`` is a peft LoRA layer with this plugin's adapter."""
        from peft.tuners.lora import LoraLayer

        try:
            layer = sam.get_submodule(name)
        except AttributeError:
            return False
        return isinstance(layer, LoraLayer) and self.adapter_name in layer.lora_A


def _has(module: nn.Module, name: str) -> bool:
    """Whether ``module`` has a submodule ``name`` (dotted)."""
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True
