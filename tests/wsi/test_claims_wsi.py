"""README ("Whole-slide images"): the signatures it prints, defaults included, are the code's."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from samflow.data.wsi import PatchPairFolder, Slide, SlidePatches, load_label_mask

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = README.read_text().split("## Whole-slide images (WSI-SAM)", 1)[1].split("\n## ", 1)[0]


def readme_signature(name: str) -> list[tuple[str, object]]:
    """``name(a, b=1, ...)`` as the README writes it: [(parameter, default, or Parameter.empty if none)]."""
    match = re.search(rf"`{name}\(([^`]*)\)`", SECTION)
    assert match, f"README: no `{name}(...)` in the WSI section"
    out = []
    for item in " ".join(match[1].split()).split(", "):
        key, _, value = item.partition("=")
        out.append((key, ast.literal_eval(value) if value else inspect.Parameter.empty))
    return out


@pytest.mark.parametrize(
    ("name", "target"),
    [("Slide", Slide), ("SlidePatches", SlidePatches), ("PatchPairFolder", PatchPairFolder),
     ("load_label_mask", load_label_mask)],
)  # fmt: skip
def test_the_readme_signature_is_the_codes(name, target):
    code = [(p.name, p.default) for p in inspect.signature(target).parameters.values()]
    said = readme_signature(name)
    assert [key for key, _ in code[: len(said)]] == [key for key, _ in said], name
    given = {key: default for key, default in said if default is not inspect.Parameter.empty}
    assert {key: dict(code)[key] for key in given} == given, f"README's {name}(...) defaults differ"
