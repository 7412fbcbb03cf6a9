"""The README's plugin example runs as written (its claims are tested elsewhere, named beside them)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.DOTALL)


def test_official_code_checkouts_in_the_readme_are_the_ones_the_tests_read():
    """Each environment variable of "Checked against the official code" is read by a test, and each
    official checkout a test reads is in that table."""
    text = README.read_text()
    section = text[text.index("### Checked against the official code") :]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"`(SAMFLOW_[A-Z_]+_SRC)`", section))
    tests = Path(__file__).resolve().parent
    read = {
        name for path in tests.rglob("*.py") for name in re.findall(r"SAMFLOW_[A-Z_]+_SRC", path.read_text())
    }
    assert documented and documented == read
