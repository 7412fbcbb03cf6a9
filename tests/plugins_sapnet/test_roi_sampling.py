"""SAPNet's RoI features are the reference's RoIAlign: mmcv's, adaptive sampling, half-pixel aligned.

The reference's ``bbox_roi_extractor`` is a ``SingleRoIExtractor`` with
``roi_layer=dict(type='RoIAlign', output_size=7)``: mmcv 1.5's defaults ``sampling_ratio=0`` (⌈roi side /
7⌉ samples per bin side, on the feature map) and ``aligned=True``. Checked against ``mmcv_roi_align``
(mmcv's kernel written out in plain torch) on SAM's one map, and with ``SAMFLOW_SAPNET_SRC`` against the
checkout's own ``SingleRoIExtractor`` (``build_roi_layers``, ``map_roi_levels``, ``forward``, cut out
with ``ast``; ``mmcv.ops.RoIAlign`` stood in for by ``mmcv_roi_align`` with mmcv 1.5's signature) on
a five-level pyramid; without the checkout its outputs recorded in
``tests/reference_outputs/sapnet_roi.pt``. The RoIs are large enough that 2 samples per bin side (the
old setting) reads other values.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from mmcv_roi_align import MMCV_DEFAULTS, mmcv_roi_align
from official_code import ReferenceOutputs, fingerprint, official_function
from torch import nn

from samflow_plugins.sapnet.net import SelectionNet

REF = ReferenceOutputs("sapnet_roi", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
EXTRACTORS = Path("TOV_mmdetection") / "mmdet" / "models" / "roi_heads" / "roi_extractors"
STRIDES = (4, 8, 16, 32, 64)  # the reference's featmap_strides
SIZE = 1024
# boxes of every level (sides 44 .. 950 px), most with ⌈side / stride / 7⌉ > 2, one past the image
ROIS = torch.tensor(
    [
        [0, 10, 12, 50, 60],
        [1, 3, 5, 100, 105],
        [0, 40, 30, 200, 210],
        [1, 0, 0, 300, 200],
        [0, 20, 40, 470, 420],
        [1, 0, 0, 512, 512],
        [0, 100, 60, 600, 540],
        [1, 5, 200, 110, 230],
        [0, 50, 100, 800, 700],
        [1, 0, 0, 1000, 900],
        [0, 30, 20, 1100, 1050],
    ],
    dtype=torch.float64,
)


class MmcvRoIAlign(nn.Module):
    """``mmcv.ops.RoIAlign`` as the reference's ``build_roi_layers`` builds it: mmcv 1.5's signature and
    defaults, its avg kernel computed by ``mmcv_roi_align``."""

    def __init__(
        self,
        output_size: int,
        spatial_scale: float = 1.0,
        sampling_ratio: int = MMCV_DEFAULTS["sampling_ratio"],
        pool_mode: str = MMCV_DEFAULTS["pool_mode"],
        aligned: bool = MMCV_DEFAULTS["aligned"],
        use_torchvision: bool = False,
    ) -> None:
        super().__init__()
        assert pool_mode == "avg" and not use_torchvision
        self.output_size = (output_size, output_size)
        self.spatial_scale, self.sampling_ratio, self.aligned = spatial_scale, sampling_ratio, aligned

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return mmcv_roi_align(
            input, rois, self.output_size[0], self.spatial_scale, self.sampling_ratio, self.aligned
        )


def pyramid(channels: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(2, channels, SIZE // s, SIZE // s, generator=gen, dtype=torch.float64) for s in STRIDES
    ]


def official_extractor(levels: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
    """The checkout's ``SingleRoIExtractor`` built from the checkout's config, run on ``levels``."""
    from test_fpn_official import CONFIG, config_dicts  # the config reader of the FPN's official test

    src = Path(REF.src or ".")
    cfg = config_dicts(src / CONFIG)["bbox_roi_extractor"]
    base, single = (
        src / EXTRACTORS / "base_roi_extractor.py",
        src / EXTRACTORS / "single_level_roi_extractor.py",
    )
    ops = types.SimpleNamespace(RoIAlign=MmcvRoIAlign)
    build = official_function(base, "build_roi_layers", "BaseRoIExtractor", ops=ops, nn=nn)
    extractor = types.SimpleNamespace(out_channels=levels[0].shape[1], finest_scale=56)  # 4 channels, not 256
    extractor.parameters = lambda: iter(())
    extractor.roi_layers = build(extractor, cfg["roi_layer"], cfg["featmap_strides"])
    extractor.map_roi_levels = types.MethodType(
        official_function(single, "map_roi_levels", "SingleRoIExtractor"), extractor
    )
    forward = official_function(
        single, "forward", "SingleRoIExtractor", force_fp32=lambda **kwargs: lambda f: f
    )
    return forward(extractor, levels, rois)


def test_sam_map_rois_are_mmcv_roialign_with_the_reference_defaults():
    torch.manual_seed(0)
    net = SelectionNet(in_channels=4, num_classes=2, hidden=8)
    embedding = torch.randn(2, 4, SIZE // 16, SIZE // 16, dtype=torch.float64)  # SAM's map, stride 16
    ours = net.roi_features(embedding, ROIS, SIZE)
    want = mmcv_roi_align(
        embedding, ROIS, 7, 1 / 16, **{k: MMCV_DEFAULTS[k] for k in ("sampling_ratio", "aligned")}
    )
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=0)
    # the boxes exercise the sampling: 2 samples per bin side read other values
    assert (mmcv_roi_align(embedding, ROIS, 7, 1 / 16, sampling_ratio=2) - want).abs().max() > 0.1


def test_pyramid_rois_are_mmcv_roialign_on_their_level():
    torch.manual_seed(0)
    net = SelectionNet(in_channels=4, num_classes=2, hidden=8)
    levels = pyramid()
    ours = net.roi_features(levels, ROIS, SIZE)
    side = ((ROIS[:, 3] - ROIS[:, 1]) * (ROIS[:, 4] - ROIS[:, 2])).sqrt()
    level = torch.floor(torch.log2(side / 56 + 1e-6)).clamp(0, len(STRIDES) - 1).long()
    assert sorted(set(level.tolist())) == [0, 1, 2, 3, 4]
    for i, lv in enumerate(level.tolist()):
        want = mmcv_roi_align(levels[lv], ROIS[i : i + 1], 7, 1 / STRIDES[lv])
        torch.testing.assert_close(
            ours[i : i + 1], want, atol=1e-10, rtol=0, msg=lambda m, i=i: f"roi {i}: {m}"
        )


@official
def test_pyramid_rois_equal_the_reference_single_roi_extractor():
    torch.manual_seed(0)
    net = SelectionNet(in_channels=4, num_classes=2, hidden=8)
    levels = pyramid()
    expected = REF.get(
        "extractor", fingerprint(levels, ROIS, MMCV_DEFAULTS), lambda: official_extractor(levels, ROIS)
    )
    torch.testing.assert_close(net.roi_features(levels, ROIS, SIZE), expected, atol=1e-10, rtol=0)
