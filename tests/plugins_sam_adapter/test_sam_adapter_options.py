"""SamAdapter refuses option values it cannot honour when it is built, naming the option."""

from __future__ import annotations

import pytest

from samflow_plugins.sam_adapter import SamAdapter


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"scale_factor": 2.5}, "scale_factor"),  # failed later in setup with torch's TypeError
        ({"gaussian_sigma": float("nan")}, "gaussian_sigma"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, option):
    with pytest.raises(ValueError, match=f"sam_adapter: {option}"):
        SamAdapter(**kwargs)
