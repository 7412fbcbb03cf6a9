"""README, "Checkpoints": the best checkpoint's metric is maximised, "or minimised for metrics where lower
is better" — the README's list of those is exactly the registered metrics with ``higher_is_better``
False, and each of them is monitored in ``min`` mode."""

from __future__ import annotations

import re
from pathlib import Path

from samflow.main_metric import main_metric
from samflow.metrics.registry import METRICS

README = Path(__file__).resolve().parents[2] / "README.md"
DATA = {"class_path": "samflow.data.SegmentationDataModule", "init_args": {"val": "v"}}


def test_the_readmes_lower_is_better_list_is_every_such_metric():
    text = " ".join(README.read_text(encoding="utf-8").split())
    found = re.search(r"minimised for metrics where lower is better \(([^)]*)\)", text)
    assert found, "the README's sentence changed: update this test"
    listed = set(re.findall(r"`(\w+)`", found.group(1)))
    assert listed == {name for name, m in METRICS.items() if getattr(m, "higher_is_better", True) is False}
    for name in listed:
        assert main_metric([name], DATA) == (f"val/{name}", "min")
