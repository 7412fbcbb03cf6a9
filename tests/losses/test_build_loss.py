"""The loss registry and build_loss specs."""

from __future__ import annotations

import math

import pytest
import torch

from samflow.losses import LOSSES, BCELoss, DiceLoss, SoftIoULoss, WeightedLoss, build_loss


def test_registry_names() -> None:
    assert set(LOSSES) == {"bce", "soft_iou", "dice", "focal", "balanced_bce"}


def test_weighted_terms_and_total() -> None:
    loss = build_loss({"bce": 2.0, "dice": {"weight": 0.5, "smooth": 0.0}})
    target = torch.ones(1, 1, 2, 2)
    terms = loss(torch.zeros_like(target), target)
    assert set(terms) == {"bce", "dice", "total"}
    assert terms["bce"].item() == pytest.approx(2 * math.log(2))
    assert terms["dice"].item() == pytest.approx(0.5 * (1 - 4 / 6))
    torch.testing.assert_close(terms["total"], terms["bce"] + terms["dice"])
    assert isinstance(loss.losses["dice"], DiceLoss) and loss.losses["dice"].smooth == 0.0


def test_dict_form_weight_defaults_to_one() -> None:
    loss = build_loss({"soft_iou": {"eps": 1.0}})
    assert loss.weights == {"soft_iou": 1.0}
    assert isinstance(loss.losses["soft_iou"], SoftIoULoss) and loss.losses["soft_iou"].eps == 1.0


def test_total_is_differentiable() -> None:
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    build_loss({"bce": 1.0, "soft_iou": 1.0})(logits, torch.ones(2, 1, 4, 4))["total"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'iou'.*balanced_bce.*bce.*dice.*focal.*soft_iou"):
        build_loss({"iou": 1.0})


@pytest.mark.parametrize("weight", [-1.0, "1", True, None])
def test_bad_weight(weight: object) -> None:
    with pytest.raises(ValueError, match="'bce': weight"):
        build_loss({"bce": weight})  # type: ignore[dict-item]


def test_bad_kwargs_name_the_loss() -> None:
    with pytest.raises(TypeError, match="'dice' \\(DiceLoss\\)"):
        build_loss({"dice": {"weight": 1.0, "smoth": 1.0}})


def test_empty_spec_gives_zero_total() -> None:
    loss = build_loss({})
    terms = loss(torch.randn(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    assert list(terms) == ["total"] and terms["total"].item() == 0.0


def test_weighted_loss_rejects_total_as_a_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        WeightedLoss(losses={"total": BCELoss()}, weights={"total": 1.0})


class EdgeLoss(torch.nn.Module):
    """A third party's loss term: mean absolute error of the probabilities, scaled."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.scale * (logits.sigmoid() - target).abs().mean()


def test_class_path_terms_with_weights() -> None:
    spec = {
        "bce": 1.0,
        "iou": {"class_path": "SoftIoULoss", "init_args": {"eps": 1.0}, "weight": 0.5},  # short class name
        "edge": {"class_path": f"{EdgeLoss.__module__}.EdgeLoss", "init_args": {"scale": 2.0}},  # weight 1
        "torch_bce": {"class_path": "torch.nn.BCEWithLogitsLoss", "weight": 0.25},  # any nn.Module
    }
    loss = build_loss(spec)
    assert loss.weights == {"bce": 1.0, "iou": 0.5, "edge": 1.0, "torch_bce": 0.25}
    assert isinstance(loss.losses["iou"], SoftIoULoss) and loss.losses["iou"].eps == 1.0
    assert isinstance(loss.losses["edge"], EdgeLoss) and loss.losses["edge"].scale == 2.0
    target = torch.ones(1, 1, 2, 2)
    terms = loss(torch.zeros_like(target), target)
    assert terms["edge"].item() == pytest.approx(2.0 * 0.5)
    assert terms["torch_bce"].item() == pytest.approx(0.25 * math.log(2))


def test_a_built_module_is_a_term_of_weight_one() -> None:
    dice = DiceLoss()
    loss = build_loss({"mine": dice})
    assert loss.losses["mine"] is dice and loss.weights == {"mine": 1.0}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"class_path": "SoftIoULoss", "init_args": {"epsilon": 1.0}}, r"model.losses.edge: .*'epsilon'"),
        ({"class_path": "my_pkg.EdgeLoss"}, r"model.losses.edge: .*No module named 'my_pkg'"),
        (
            {"class_path": "samflow.data.BoxPrompt"},
            r"model.losses.edge: .*not correspond to a subclass of Module",
        ),
        ({"class_path": "SoftIoULoss", "weight": -1}, r"'edge': weight must be a number >= 0"),
    ],
)
def test_class_path_errors_name_the_term(entry: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss({"edge": entry})


def test_an_unknown_alias_says_how_to_give_a_class() -> None:
    with pytest.raises(ValueError, match=r"'edge'.*class_path: my_pkg.MyLoss"):
        build_loss({"edge": 1.0})
