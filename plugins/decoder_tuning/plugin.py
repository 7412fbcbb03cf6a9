"""Decoder tuning: train SAM's mask decoder, keep the rest frozen (the classic baseline).

It adds no parameters of its own; it only declares which SAM parts become trainable.
"""

from __future__ import annotations

from collections.abc import Sequence

from segment_anything.modeling import Sam
from typing_extensions import override

from samflow.plugins import PluginConfigError, SamPlugin


class DecoderTuning(SamPlugin):
    """Unfreeze SAM sub-modules, by default the whole mask decoder.

    Args:
        parts: dotted names of SAM sub-modules to train, e.g. ``mask_decoder`` or
            ``mask_decoder.output_hypernetworks_mlps``.
        lr: learning rate of these parameters (default: the optimizer's).
        weight_decay: their weight decay (default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx traces its decoder side

    def __init__(
        self,
        parts: Sequence[str] = ("mask_decoder",),
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if not parts:
            raise ValueError("decoder_tuning needs at least one SAM part in `parts`.")
        self.parts = list(parts)

    @override
    def setup(self, sam: Sam) -> None:
        for part in self.parts:
            try:
                sam.get_submodule(part)
            except AttributeError:
                raise PluginConfigError(
                    f"Plugin {self.key!r} (decoder_tuning): SAM has no sub-module {part!r}. Use a dotted "
                    "name such as 'mask_decoder' or 'mask_decoder.output_upscaling'."
                ) from None

    @override
    def sam_modules_to_train(self) -> list[str]:
        return self.parts
