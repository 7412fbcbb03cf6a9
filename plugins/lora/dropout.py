"""LoRA's dropout with a mask per image, drawn from the image's key: ``KeyedDropout``.

peft's LoRA layer computes ``B A dropout(x)`` with ``dropout = layer.lora_dropout[adapter]``, an
``nn.Dropout`` (peft 0.21's ``LoraConfig`` takes only the rate). Its mask comes from the global
generator, one draw for the batch: an image's mask, hence its loss and its gradients, would depend on
its batch-mates and its place in the batch. ``KeyedDropout`` takes its place in that ``ModuleDict``
(the entry peft reads at every call) and draws each image's mask from a generator of its own, seeded
with the image's seed for the layer's stream (``ForwardContext.seeds``): an image's mask is the same
alone or in any batch. It reads the forward's context from ``samflow.plugins.current_context()``, which
``HookedSam`` sets for each encoder block it runs, also when activation checkpointing recomputes the
block, so the recomputed forward draws the mask again, bit for bit. No hook is needed: at inference
the module is the identity, so a LoRA run still merges into a plain SAM checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samflow.plugins import current_context


class KeyedDropout(nn.Module):
    """Inverted dropout at rate ``p`` whose mask for each image comes from that image's seed.

    In training, inside an encoder block that ``HookedSam`` runs (its ``current_context()`` gives one
    seed per image of the encoder's batch of B images for ``stream``) and with an input
    (B * m, ...) of 3 or more dimensions and m rows per image (m = 1 for a global-attention block's
    (B, h, w, C) or EfficientSAM's tokens (B, L, C), the number of windows for a windowed block's
    (B * nW, ws, ws, C) or TinyViT's (B * nW, L, C)): rows [b m, (b + 1) m) keep each value where
    ``u >= p``, u ~ U(0, 1) drawn (m, ...) by a generator on x's device seeded with ``seeds[b]``, and
    are scaled by ``1 / (1 - p)``, as ``nn.Dropout``. Outside such a block, without seeds (a batch with
    neither sample seeds nor ids) or for an input without the image axis first, it is ``nn.Dropout``:
    one draw from the global generator. In eval mode it is the identity.

    Args:
        p: the dropout rate, in [0, 1).
        stream: the name of the layer's draws (``"<plugin key>/dropout/<layer>"``): two layers never
            draw alike.
    """

    def __init__(self, p: float, stream: str) -> None:
        super().__init__()
        self.p = p
        self.stream = stream

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        ctx = current_context()
        seeds = None if ctx is None else ctx.seeds(self.stream, per_image=True)
        if seeds is None or x.dim() < 3 or x.shape[0] % len(seeds):
            return F.dropout(x, self.p, training=True)
        rows = x.shape[0] // len(seeds)
        # float32 draws whatever x's dtype (bf16 autocast): the mask does not depend on the precision
        u = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        generator = torch.Generator(device=x.device)
        for b, seed in enumerate(seeds):
            generator.manual_seed(seed)
            torch.rand(
                u[b * rows : (b + 1) * rows].shape, generator=generator, out=u[b * rows : (b + 1) * rows]
            )
        keep = (u >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream!r}"
