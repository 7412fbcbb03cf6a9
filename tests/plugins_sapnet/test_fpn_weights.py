"""SAPNet's ResNet-50-FPN: its weights from a file only, and the plugin running on the reference's FPN.

``resnet_weights`` takes torchvision's ResNet-50 ImageNet state dict (``resnet50-*.pth``: ``fc.*`` and
``num_batches_tracked`` ignored; the FPN keeps its Xavier init) or a whole ``ResNet50FPN`` state dict;
a torchvision ``resnet_fpn_backbone`` file is refused (its FPN is another network).
"""

from __future__ import annotations

import pytest
import torch
from test_resnet_fpn import resnet50_file

from samflow_plugins.sapnet import SAPNet
from samflow_plugins.sapnet.fpn import FPN, ResNet50FPN, resnet50_fpn


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return resnet50_file(tmp_path_factory)


def test_torchvision_resnet50_file_fills_the_body_and_the_fpn_keeps_its_init(weights):
    torch.manual_seed(0)
    backbone = resnet50_fpn(str(weights))
    state = torch.load(weights, weights_only=True)
    body = backbone.body.state_dict()
    assert set(body) == {
        k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    for key, value in body.items():
        assert torch.equal(value, state[key]), key
    torch.manual_seed(0)
    fresh = ResNet50FPN()
    for key, value in backbone.fpn.state_dict().items():
        assert torch.equal(value, fresh.fpn.state_dict()[key]), key  # the init, not something loaded
    assert (
        not backbone.body.layer1[0].conv1.weight.requires_grad
        and backbone.body.layer2[0].conv1.weight.requires_grad
    )


def test_a_whole_backbone_file_round_trips(weights, tmp_path):
    torch.manual_seed(0)
    backbone = resnet50_fpn(str(weights))
    with torch.no_grad():
        for p in backbone.fpn.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "whole.pth"
    torch.save({"state_dict": backbone.state_dict()}, path)
    again = resnet50_fpn(str(path))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_a_torchvision_fpn_file_is_refused_naming_its_keys(tmp_path):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    path = tmp_path / "tv_fpn.pth"
    torch.save(resnet_fpn_backbone(backbone_name="resnet50", weights=None).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"tv_fpn.pth is not a ResNet-50 state dict: missing \d+ keys \(fpn\.extra.*fpn\.inner_blocks.*another FPN",
    ):
        resnet50_fpn(str(path))


def test_the_plugin_runs_on_the_reference_fpn_p2_to_p6(weights):
    from helpers import random_batch

    from samflow.module import SamflowModule, SamSpec

    torch.manual_seed(0)
    plugin = SAPNet(
        num_classes=3, hidden=16, num_negatives=8, features="resnet50_fpn", resnet_weights=str(weights)
    )
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"sap": plugin}).train()
    assert isinstance(plugin.backbone.fpn, FPN)
    out, ctx = module(random_batch(2))
    maps = plugin.feature_maps(ctx)
    side = ctx.encoded.normalized.shape[-1]
    assert [side // m.shape[-1] for m in maps] == [4, 8, 16, 32, 64]
    assert {m.shape[1] for m in maps} == {256}
    losses = module.compute_losses(out, random_batch(2), ctx)
    sum(losses[k] for k in ("sap/psm", "sap/prm", "sap/neg")).backward()
    norm = plugin.backbone.fpn.output[0].norm
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0  # the GN trains
