"""SAPNet's ResNet-50 BatchNorm as the reference configures it: ``norm_cfg=dict(type='BN',
requires_grad=True), norm_eval=True, frozen_stages=1``.

mmdetection's ``ResNet.train`` puts every BatchNorm in eval mode (``norm_eval``: the running statistics
normalise and never update) and ``_freeze_stages`` freezes the stem and ``layer1`` (``frozen_stages=1``);
the BN weight and bias of ``layer2``-``layer4`` keep ``requires_grad=True`` and train. Checked here by a
training step through the plugin, and with ``SAMFLOW_SAPNET_SRC`` against the checkout's own
``ResNet.train`` and ``_freeze_stages`` (cut out with ``ast``) applied to a torchvision ResNet-50 with
``nn.BatchNorm2d`` built as mmcv's ``build_norm_layer`` would (its parameters' ``requires_grad`` from
``norm_cfg``), the config's ``backbone`` dict read with ``ast``; without the checkout what they
decided, recorded in ``tests/reference_outputs/sapnet_backbone.pt``.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from official_code import ReferenceOutputs, assert_close, fingerprint, official_function, randomize_all
from torch import nn

from samflow_plugins.sapnet import SAPNet
from samflow_plugins.sapnet.fpn import ResNet50FPN

REF = ReferenceOutputs("sapnet_backbone", "SAMFLOW_SAPNET_SRC")
official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
RESNET = Path("TOV_mmdetection") / "mmdet" / "models" / "backbones" / "resnet.py"
CONFIG = Path("TOV_mmdetection") / "configs2" / "COCO" / "SAPNet" / "SAPNet_r50_fpn_1x_coco.py"


def batch_norms(body: nn.Module) -> dict[str, nn.Module]:
    """The ResNet's BatchNorms (by their statistics: whatever class they are)."""
    return {name: m for name, m in body.named_modules() if hasattr(m, "running_mean")}


def bn_state(body: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": t.detach().clone()
        for name, m in batch_norms(body).items()
        for key, t in (
            ("weight", m.weight),
            ("bias", m.bias),
            ("mean", m.running_mean),
            ("var", m.running_var),
        )
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A ResNet-50 state dict in torchvision's layout with random BN statistics and affines, as a file:
    a batch's own statistics are then far from the running ones."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet50(weights=None)
    randomize_all(resnet, 2)
    path = tmp_path_factory.mktemp("resnet") / "resnet50-random.pth"
    torch.save(resnet.state_dict(), path)
    return path


def test_a_training_step_trains_bn_affines_of_layer2_to_4_never_the_statistics(weights):
    from helpers import random_batch

    from samflow.module import SamflowModule, SamSpec

    torch.manual_seed(0)
    plugin = SAPNet(
        num_classes=3, hidden=16, num_negatives=8, features="resnet50_fpn", resnet_weights=str(weights)
    )
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"sap": plugin}).train()
    body = plugin.backbone.body
    assert len(batch_norms(body)) == 53
    before = bn_state(body)
    batch = random_batch(2)
    out, ctx = module(batch)
    with torch.no_grad():  # the statistics normalise in training too: the same maps in eval mode
        training_maps = plugin.feature_maps(ctx)
        module.eval()
        assert all(torch.equal(a, b) for a, b in zip(training_maps, plugin.feature_maps(ctx), strict=True))
        module.train()
    losses = module.compute_losses(out, batch, ctx)
    sum(losses[k] for k in ("sap/psm", "sap/prm", "sap/neg")).backward()
    trained = [p for p in module.parameters() if p.requires_grad]
    torch.optim.SGD(trained, lr=1.0).step()
    after = bn_state(body)
    for key in before:
        name, kind = key.rsplit(".", 1)
        if kind in ("mean", "var"):
            assert torch.equal(after[key], before[key]), key  # never updated
        elif name.startswith(("layer2", "layer3", "layer4")):
            assert not torch.equal(after[key], before[key]), key  # trained
        else:
            assert name.startswith(("bn1", "layer1")), name
            assert torch.equal(after[key], before[key]), key  # stem and layer1 frozen
    assert not any(m.training for m in batch_norms(body).values())  # eval mode under module.train()


@pytest.mark.parametrize("trainable", [0, 1, 3, 5])
def test_trainable_layers_reach_the_bn_affines_of_their_stages(trainable):
    body = ResNet50FPN(trainable).body
    stages = ("layer4", "layer3", "layer2", "layer1", "bn1")[:trainable]
    for name, m in batch_norms(body).items():
        want = name.startswith(stages)
        assert m.weight.requires_grad == m.bias.requires_grad == want, name
    assert body.conv1.weight.requires_grad == (trainable == 5)


def backbone_config(path: Path) -> dict[str, Any]:
    """The ``backbone`` dict of the config's ``model`` (its values literals)."""
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "model":
            call = stmt.value
            assert isinstance(call, ast.Call)
            node = next(kw.value for kw in call.keywords if kw.arg == "backbone")
            assert isinstance(node, ast.Call)
            return {
                kw.arg: {k.arg: ast.literal_eval(k.value) for k in kw.value.keywords}
                if isinstance(kw.value, ast.Call)
                else ast.literal_eval(kw.value)
                for kw in node.keywords
            }
    raise AssertionError(f"{path}: no model dict")


def official_decisions(state: dict[str, torch.Tensor], image: torch.Tensor) -> dict[str, Any]:
    """The checkout's ``ResNet.train(True)`` (``norm_eval``, ``_freeze_stages``) on a torchvision ResNet-50
    with the config's settings: each parameter's ``requires_grad``, each BN's mode, C2..C5 of ``image``."""
    src = Path(REF.src or ".")
    cfg = backbone_config(src / CONFIG)

    class ResNet(torchvision.models.ResNet):  # mmdet's names for what torchvision calls otherwise
        @property
        def norm1(self) -> nn.Module:
            return self.bn1

    net = ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])
    net.load_state_dict(state, strict=False)  # no fc.* here
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # mmcv's build_norm_layer
            for p in m.parameters():
                p.requires_grad = cfg["norm_cfg"]["requires_grad"]
    net.deep_stem, net.frozen_stages, net.norm_eval = False, cfg["frozen_stages"], cfg["norm_eval"]
    net._freeze_stages = types.MethodType(official_function(src / RESNET, "_freeze_stages", "ResNet"), net)
    train = official_function(src / RESNET, "train", "ResNet", ResNet=ResNet, _BatchNorm=nn.BatchNorm2d)
    train(net, True)
    x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
    maps = []
    with torch.no_grad():
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, stage)(x)
            maps.append(x)
    return {
        "config": cfg,
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters() if not n.startswith("fc.")},
        "bn_training": {n: m.training for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)},
        "maps": maps,
    }


@official
def test_requires_grad_bn_modes_and_maps_equal_the_reference_resnet_train(weights):
    state = {k: v for k, v in torch.load(weights, weights_only=True).items() if not k.startswith("fc.")}
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got = REF.get("train", fingerprint(state, image), lambda: official_decisions(state, image))
    cfg = got["config"]
    assert (cfg["frozen_stages"], cfg["norm_eval"], cfg["norm_cfg"]) == (
        1,
        True,
        {"type": "BN", "requires_grad": True},
    )
    backbone = ResNet50FPN(trainable_layers=4 - cfg["frozen_stages"]).train()  # frozen_stages=1: 3 train
    body = backbone.body
    body.load_state_dict({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    assert {n: p.requires_grad for n, p in body.named_parameters()} == got["requires_grad"]
    assert {n: m.training for n, m in batch_norms(body).items()} == got["bn_training"]
    x = body.maxpool(body.relu(body.bn1(body.conv1(image))))
    with torch.no_grad():
        for stage, expected in zip(("layer1", "layer2", "layer3", "layer4"), got["maps"], strict=True):
            x = getattr(body, stage)(x)
            # float32 through ResNet-50's convolutions: the recording, made on another CPU, differs by up
            # to 6e-4 where values near 100 (AVX2 vs AVX-512 kernels); a wrong BN mode moves them by O(1)
            assert_close(x, expected, atol=2e-3, rtol=1e-4)
