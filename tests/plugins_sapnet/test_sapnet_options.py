"""SAPNet refuses option values it cannot honour when it is built, naming the option."""

from __future__ import annotations

import pytest

from samflow_plugins.sapnet import SAPNet


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"num_classes": 0}, "num_classes"),  # every batch would then be refused at its first step
        ({"hidden": 0}, "hidden"),  # a head of constant logits
        ({"num_negatives": -1}, "num_negatives"),  # failed at the first training step
        ({"resnet_trainable_layers": 6}, "resnet_trainable_layers"),  # ResNet-50 has 5 stages
        ({"resnet_trainable_layers": -1}, "resnet_trainable_layers"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(ValueError, match=f"sapnet: {option}"):
        SAPNet(**kwargs)


def test_no_negatives_is_allowed():
    assert SAPNet(num_negatives=0).options["num_negatives"] == 0
