"""PASam refuses option values it cannot honour, naming the option."""

from __future__ import annotations

import pytest

from samflow_plugins.pa_sam import PASam


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"band_ratio": -0.01}, "band_ratio"),  # would silently give the 1 px band
        ({"band_ratio": 0.0}, "band_ratio"),
        ({"band_ratio": float("nan")}, "band_ratio"),
        ({"mining_start_epoch": -2}, "mining_start_epoch"),  # -1 already mines from the start
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(ValueError, match=f"pa_sam: {option}"):
        PASam(**kwargs)
