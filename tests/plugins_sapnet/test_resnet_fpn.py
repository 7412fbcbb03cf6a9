"""SAPNet's ResNet-50-FPN feature option: weights only from a path, RoIs on their pyramid level, shapes, gradients."""

from __future__ import annotations

import pytest
import torch
import torchvision
from mmcv_roi_align import mmcv_roi_align

from samflow_plugins.sapnet import SAPNet
from samflow_plugins.sapnet.net import SelectionNet, roi_levels


def resnet50_file(tmp_path_factory):
    """A random ResNet-50 state dict in torchvision's layout (with fc and num_batches_tracked), as a file."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("resnet") / "resnet50-random.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return resnet50_file(tmp_path_factory)


def test_roi_levels_by_hand():
    sides = torch.tensor([40.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 5000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    # floor(log2(side / 56)): < 112 -> 0, 112-223 -> 1, 224-447 -> 2, >= 448 -> 3 (mmdetection's mapping)
    assert roi_levels(boxes, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert roi_levels(boxes, 2).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_pyramid_rois_read_their_own_level():
    torch.manual_seed(0)
    net = SelectionNet(in_channels=4, num_classes=2, hidden=8)
    size = 512
    levels = [torch.randn(2, 4, size // s, size // s) for s in (4, 8, 16, 32)]
    rois = torch.tensor(
        [[0, 10, 10, 60, 60], [1, 0, 0, 150, 150], [0, 100, 50, 400, 350], [1, 0, 0, 500, 500]],
        dtype=torch.float32,
    )
    out = net.roi_features(levels, rois, size)
    assert out.shape == (4, 4, 7, 7)
    for i, (level, stride) in enumerate(zip(range(4), (4, 8, 16, 32), strict=True)):
        # the reference's RoIAlign (mmcv's defaults: adaptive sampling, aligned), not 2 samples per side
        direct = mmcv_roi_align(levels[level], rois[i : i + 1], 7, 1 / stride)
        torch.testing.assert_close(
            out[i : i + 1], direct, atol=1e-5, rtol=0, msg=lambda m, i=i: f"roi {i}: {m}"
        )


def test_needs_a_weights_path_and_never_downloads(tmp_path):
    with pytest.raises(ValueError, match=r"resnet50_fpn needs resnet_weights: PATH.*never downloads weights"):
        SAPNet(features="resnet50_fpn")
    with pytest.raises(FileNotFoundError, match=r"resnet_weights .*nowhere.pth not found"):
        SAPNet(features="resnet50_fpn", resnet_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match=r"features must be 'sam' or 'resnet50_fpn'"):
        SAPNet(features="resnet101")  # type: ignore[arg-type]
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    plugin = SAPNet(features="resnet50_fpn", resnet_weights=str(bad))
    from samflow.sam import build_sam

    with pytest.raises(ValueError, match=r"bad.pth is not a ResNet-50 state dict: missing \d+ keys"):
        plugin.setup(build_sam("tiny", seed=0))


def test_shapes_weights_and_gradients(weights):
    from helpers import random_batch

    from samflow.module import SamflowModule, SamSpec

    torch.manual_seed(0)
    plugin = SAPNet(
        num_classes=3, hidden=16, num_negatives=8, features="resnet50_fpn", resnet_weights=str(weights)
    )
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"sap": plugin}).train()
    state = torch.load(weights, weights_only=True)
    body = plugin.backbone.body
    assert torch.equal(body.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])  # read from the file
    assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
    batch = random_batch(2)
    out, ctx = module(batch)
    maps = plugin.feature_maps(ctx)
    assert [tuple(m.shape) for m in maps] == [
        (2, 256, 32, 32),
        (2, 256, 16, 16),
        (2, 256, 8, 8),
        (2, 256, 4, 4),
        (2, 256, 2, 2),  # P6: the reference's stride-2 conv on C5
    ]
    losses = module.compute_losses(out, batch, ctx)
    total = sum(losses[k] for k in ("sap/psm", "sap/prm", "sap/neg"))
    assert torch.isfinite(total)
    total.backward()
    assert plugin.net.fc_cls[0].weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.backbone.fpn.parameters())
    assert body.layer4[0].conv1.weight.grad is not None  # trainable: layer2..4 (reference: frozen_stages=1)
    assert not body.layer1[0].conv1.weight.requires_grad and not body.conv1.weight.requires_grad
    for name, p in module.named_parameters():
        if ".plugins.sap." not in name:
            assert p.grad is None, name  # SAM stays frozen
    owned = module.plugins.owned["sap"]
    assert any(".backbone.body.layer4." in n for n in owned) and not any(".layer1." in n for n in owned)
