"""Folding peft's LoRA deltas into SAM's weights: a plain segment-anything state dict for export."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as LoraLinear


def merged_sam_state_dict(sam: Sam) -> dict[str, Tensor]:
    """``sam``'s state dict with every active LoRA adapter folded in: W' = W + (alpha / r) B A.

    The keys are segment-anything's own (``...attn.qkv.weight``, not ``...qkv.base_layer.weight``; no
    ``lora_`` keys), so a plain ``Sam`` of the same variant loads the result with ``strict=True`` and its
    encoder then equals the unmerged LoRA encoder up to float rounding. The deltas come from peft
    (``LoraLayer.get_delta_weight``); ``sam`` itself is not changed. Tensors other than the merged
    weights share storage with ``sam``, as ``state_dict()`` does. This is what an export of a LoRA run
    to a plain SAM checkpoint writes (``torch.save(merged_sam_state_dict(sam), path)``).
    """
    from peft.tuners.lora import Linear as LoraLinear  # here, not at module level: peft imports transformers
    from peft.tuners.lora import LoraLayer

    layers: dict[str, tuple[LoraLinear, nn.Linear]] = {}  # name -> (peft's layer, SAM's linear in it)
    for name, module in sam.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if not isinstance(module, LoraLinear) or not isinstance(base, nn.Linear):
                raise TypeError(f"{name}: only LoRA on linear layers is merged here, not {module!r:.60}.")
            layers[name] = (module, base)
    renamed: dict[str, tuple[str, Tensor]] = {}  # peft's key -> (SAM's key, value)
    dropped: set[str] = set()
    with torch.no_grad():
        for name, (layer, base) in layers.items():
            weight = base.weight.detach().clone()
            if not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                        weight += layer.get_delta_weight(adapter).to(weight.dtype)
            dropped.update(layer.state_dict(prefix=f"{name}.").keys())
            renamed[f"{name}.base_layer.weight"] = (f"{name}.weight", weight)
            if base.bias is not None:
                renamed[f"{name}.base_layer.bias"] = (f"{name}.bias", base.bias.detach())
    merged: dict[str, Tensor] = {}
    for key, value in sam.state_dict().items():
        if key in renamed:
            new_key, new_value = renamed[key]
            merged[new_key] = new_value
        elif key not in dropped:
            merged[key] = value
    return merged
