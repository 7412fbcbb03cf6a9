"""LoRA on SAM's image encoder (SAMed, Zhang & Liu 2023) through peft, as a samflow plugin."""

from samflow_plugins.lora.dropout import KeyedDropout
from samflow_plugins.lora.merge import merged_sam_state_dict
from samflow_plugins.lora.plugin import TARGETS, LoRA

__all__ = ["TARGETS", "KeyedDropout", "LoRA", "merged_sam_state_dict"]
