"""SAPNet's ResNet-50-FPN, as the reference configures it (``SAPNet_r50_fpn_1x_coco.py``).

The body is torchvision's ResNet-50 with the reference's BatchNorm (``norm_cfg=dict(type='BN',
requires_grad=True), norm_eval=True``: ``FrozenStatsBatchNorm2d``, the running statistics fixed, the
affine weight and bias trained with their stage). ``trainable_layers`` stages train, from ``layer4``
down (their convs and BN affines): 3 is the reference's ``frozen_stages=1`` (stem and ``layer1``
frozen). The neck is mmdetection's ``FPN`` with the reference's settings (``in_channels=[256, 512, 1024, 2048]``, ``out_channels=256``, ``start_level=0``,
``num_outs=5``, ``add_extra_convs='on_input'``, ``norm_cfg=GN(32)``), here in plain torch:

- every conv is mmcv's ``ConvModule`` with a norm: conv without bias, then GroupNorm(32, 256)
  (eps 1e-5), no activation (the FPN's ``act_cfg=None``);
- laterals: 1 × 1 conv + GN on C2..C5; top-down: from the coarsest, each lateral adds the nearest
  upsampling (to its own size) of the one above it;
- outputs P2..P5: 3 × 3 conv (padding 1) + GN on each summed lateral;
- P6 ("on_input"): 3 × 3 conv, stride 2, padding 1, + GN on C5 itself (not max pooling of P5, as
  torchvision's ``LastLevelMaxPool``);
- init (the FPN's ``init_cfg``, Xavier uniform on every Conv2d, gain 1, after ``ConvModule``'s own):
  conv weights U(-b, b), b = sqrt(6 / (fan_in + fan_out)); GN weight 1, bias 0.

Strides 4, 8, 16, 32, 64: each RoI reads the level ``net.roi_levels`` maps it to (mmdetection's
``SingleRoIExtractor``, finest scale 56, clamped to the 5 levels).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FPN",
    "FPN_CHANNELS",
    "FPN_GROUPS",
    "RESNET_CHANNELS",
    "ConvGN",
    "FrozenStatsBatchNorm2d",
    "ResNet50FPN",
    "resnet50_fpn",
]

RESNET_CHANNELS = (256, 512, 1024, 2048)  # C2..C5 of ResNet-50
FPN_CHANNELS = 256
FPN_GROUPS = 32
STAGES = ("layer1", "layer2", "layer3", "layer4")


class FrozenStatsBatchNorm2d(nn.Module):
    """BatchNorm as mmdetection's ResNet runs it under ``norm_eval=True``: y = (x − μ) / √(σ² + eps) · γ + β
    with the running μ, σ² always (in training too; they never update), γ and β parameters that train
    unless their stage is frozen. The state dict is ``BatchNorm2d``'s without ``num_batches_tracked``
    (``resnet50_fpn`` drops it from a file); the module stays in eval mode whatever ``train()`` asks."""

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.training = False

    def train(self, mode: bool = True) -> FrozenStatsBatchNorm2d:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )


class ConvGN(nn.Module):
    """mmcv's ``ConvModule`` with a GN norm and no activation: a bias-free conv, then GroupNorm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = FPN_GROUPS) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, cout, eps=1e-5)
        nn.init.xavier_uniform_(self.conv.weight, gain=1.0)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class FPN(nn.Module):
    """The reference's FPN: maps C2..C5 (finest first) to P2..P6, ``out_channels`` each (module docstring)."""

    def __init__(
        self,
        in_channels: tuple[int, ...] = RESNET_CHANNELS,
        out_channels: int = FPN_CHANNELS,
        groups: int = FPN_GROUPS,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = tuple(in_channels), out_channels
        self.lateral = nn.ModuleList([ConvGN(c, out_channels, 1, groups=groups) for c in in_channels])
        self.output = nn.ModuleList(
            [ConvGN(out_channels, out_channels, 3, groups=groups) for _ in in_channels]
        )
        self.extra = ConvGN(in_channels[-1], out_channels, 3, stride=2, groups=groups)  # on_input

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        if len(inputs) != len(self.lateral):
            raise ValueError(f"sapnet FPN: expected {len(self.lateral)} backbone maps, got {len(inputs)}.")
        laterals = [conv(x) for conv, x in zip(self.lateral, inputs, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.output, laterals, strict=True)]
        outs.append(self.extra(inputs[-1]))
        return outs


class ResNet50FPN(nn.Module):
    """torchvision's ResNet-50 (``FrozenStatsBatchNorm2d``, ``fc`` dropped) as ``body`` and the reference's ``fpn``.

    ``body``'s state dict is torchvision's ResNet-50's without ``fc.*`` and ``num_batches_tracked``.
    ``trainable_layers``: stages whose convs and BN affines train, from ``layer4`` down (5: the stem's
    ``conv1`` and ``bn1`` too). Returns P2..P6 (strides 4-64).
    """

    def __init__(self, trainable_layers: int = 3) -> None:
        super().__init__()
        from torchvision.models import resnet50

        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"sapnet: resnet_trainable_layers must be 0..5, got {trainable_layers}.")
        body = resnet50(weights=None, norm_layer=FrozenStatsBatchNorm2d)
        del body.fc, body.avgpool
        stages = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1.", "bn1."))
        trained = tuple(prefix for stage in stages[:trainable_layers] for prefix in stage)
        for name, p in body.named_parameters():
            if not name.startswith(trained):
                p.requires_grad_(False)
        self.body = body
        self.fpn = FPN()

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        maps = []
        for stage in STAGES:
            x = getattr(b, stage)(x)
            maps.append(x)
        return self.fpn(maps)


def resnet50_fpn(weights: str, trainable_layers: int = 3) -> ResNet50FPN:
    """``ResNet50FPN`` with weights read from ``weights`` only; the FPN keeps its init unless the file has it.

    The file holds torchvision's ResNet-50 state dict (``conv1.*`` ... ``layer4.*``; ``fc.*`` ignored) or
    a whole ``ResNet50FPN``'s (``body.*`` and ``fpn.*``). Raises ValueError naming the file and the keys
    that do not fit (e.g. a torchvision ``resnet_fpn_backbone``, whose FPN is another network).
    """
    backbone = ResNet50FPN(trainable_layers)
    path = Path(weights).expanduser()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"sapnet: resnet_weights {path} holds no state dict.")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # our BN has none
    target: nn.Module
    if any(k.startswith(("body.", "fpn.")) for k in state):
        target = backbone
    else:
        target, state = backbone.body, {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"sapnet: resnet_weights {path} is not a ResNet-50 state dict: missing {len(missing)} keys "
            f"({', '.join(missing[:3])}), unexpected {len(unexpected)} ({', '.join(unexpected[:3])}). Give "
            "torchvision's ResNet-50 ImageNet weights (resnet50-*.pth) or a whole sapnet ResNet50FPN state "
            "dict; a torchvision resnet_fpn_backbone's fpn.* do not fit (another FPN)."
        )
    target.load_state_dict(state)
    return backbone
