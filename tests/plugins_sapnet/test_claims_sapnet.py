"""README ("Built-in plugins", sapnet row): the defaults it states are the plugin's, and the reference's
quirks are off by default."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from samflow_plugins.sapnet import SAPNet

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_stated_defaults_are_the_plugins():
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `sapnet` | `SAPNet` |"))
    stated = {k: int(v) for k, v in re.findall(r"`(\w+)` \((\d+)\)", row)}
    stated.update({k: int(v) for k, v in re.findall(r"`(resnet_trainable_layers)` (\d+)", row)})
    assert set(stated) == {"num_classes", "hidden", "num_negatives", "resnet_trainable_layers"}
    defaults = {p.name: p.default for p in inspect.signature(SAPNet).parameters.values()}
    assert {k: defaults[k] for k in stated} == stated
    quirks = re.search(r"the reference's quirks, off by default: (.*?) Its pseudo masks", row)[1]
    for name in re.findall(r"`(\w+)` \(", quirks):
        assert defaults[name] is False, name
    assert defaults["features"] == "sam" and defaults["resnet_weights"] is None
