"""HQSam refuses option values it cannot honour, NaN included, naming the option."""

from __future__ import annotations

import pytest

from samflow_plugins.hq_sam import HQSam

NAN = float("nan")


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"oversample_ratio": NAN}, "oversample_ratio"),
        ({"importance_sample_ratio": NAN}, "importance_sample_ratio"),
        ({"bce_weight": NAN}, "loss weights"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(ValueError, match=f"hq_sam: {option}"):
        HQSam(**kwargs)
