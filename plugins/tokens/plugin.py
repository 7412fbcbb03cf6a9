"""Extra output tokens: learnable decoder tokens with their own hypernetwork heads.

The smallest use of the extra-token mechanism that HQ-SAM, PA-SAM and WSI-SAM build on: each token
joins SAM's output tokens in the frozen two-way transformer; its own MLP head (C -> C -> C -> C/8,
like SAM's hypernetworks) turns the token into a dynamic kernel that is dotted with SAM's upscaled
mask features: mask_t = MLP_t(token_t) . upscaled.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn
from typing_extensions import override

from samflow.plugins import DecoderContext, DecoderFeatures, SamPlugin
from samflow.sam import SamOutput


class ExtraTokens(SamPlugin):
    """Add ``num_tokens`` learnable output tokens to SAM's decoder.

    Args:
        num_tokens: how many tokens; their masks are ``<key>/mask0``, ``<key>/mask1``, ...
        predict: use ``mask0`` as the model's prediction (losses and metrics apply to it).
        init_from_sam: start each token from a copy of SAM's single-mask token and each head from
            SAM's single-mask hypernetwork (so the untrained plugin predicts what SAM predicts);
            otherwise random.
        lr: learning rate of the tokens and heads (default: the optimizer's).
        weight_decay: their weight decay (default: the optimizer's).
    """

    onnx_exportable = True  # samflow export --onnx: its tokens and heads are traced

    def __init__(
        self,
        num_tokens: int = 1,
        predict: bool = True,
        init_from_sam: bool = True,
        lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay)
        if num_tokens < 1:
            raise ValueError(f"tokens: num_tokens must be at least 1, got {num_tokens}.")
        self.num_tokens = num_tokens
        self.predict = predict
        self.init_from_sam = init_from_sam

    @property
    @override
    def predicts(self) -> bool:
        return self.predict  # select gives mask0 with ``predict``

    @override
    def setup(self, sam: Sam) -> None:
        decoder = sam.mask_decoder
        dim = decoder.transformer_dim
        self.tokens = nn.Embedding(self.num_tokens, dim)
        self.heads = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_tokens))
        if self.init_from_sam:
            with torch.no_grad():
                self.tokens.weight.copy_(decoder.mask_tokens.weight[:1].expand(self.num_tokens, -1))
                for head in self.heads:
                    head.load_state_dict(decoder.output_hypernetworks_mlps[0].state_dict())

    @override
    def output_tokens(self) -> Tensor:
        return self.tokens.weight

    @override
    def decode_token(self, tokens: Tensor, feats: DecoderFeatures, ctx: DecoderContext) -> dict[str, Tensor]:
        kernels = torch.stack([head(tokens[:, t]) for t, head in enumerate(self.heads)], dim=1)  # (N, T, C/8)
        masks = (kernels @ feats.upscaled.flatten(2)).unflatten(-1, feats.upscaled.shape[-2:])
        return {f"mask{t}": masks[:, t : t + 1] for t in range(self.num_tokens)}

    @override
    def select(self, out: SamOutput, ctx: DecoderContext) -> Tensor | None:
        return out.masks[f"{self.key}/mask0"] if self.predict else None
