"""The bad-input matrix (tests/reliability/README.md) and the README's Errors list stay in step.

- every bullet of the README's **Errors** list (and its "Accepted, not errors" paragraph) has a row
  in the matrix, and every row's README words open a bullet: nothing is claimed without a test;
- every test the matrix names exists (``file.py::test_name``, paths relative to this folder).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "README.md"
README = HERE.parents[1] / "README.md"


def _plain(text: str) -> str:
    return " ".join(text.replace("`", "").replace('"', "").split()).lower()


def readme_claims() -> list[str]:
    """The bullets of the README's **Errors** list, and the sentence of what is accepted."""
    text = README.read_text()
    start = text.index("**Errors:**")
    end = text.index("\n**", start + 1)
    section = text[start:end]
    bullets = re.findall(r"^- (.*?)(?=^- |^\s*$)", section, flags=re.MULTILINE | re.DOTALL)
    accepted = re.search(r"^Accepted, not errors.*?(?=^\s*$)", section, flags=re.MULTILINE | re.DOTALL)
    assert accepted, "the Errors section says what is accepted"
    return [_plain(b) for b in bullets] + [_plain(accepted.group(0))]


def matrix_rows() -> list[list[str]]:
    rows = []
    for line in MATRIX.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[0]) <= {"-"} and cells[0] != "case":
            rows.append(cells)
    return rows


def test_every_readme_claim_has_a_row_and_every_row_names_a_claim():
    claims = readme_claims()
    assert len(claims) >= 15
    keys = {_plain(row[2]) for row in matrix_rows() if len(row) == 4 and row[2]}
    for key in keys:
        assert any(key in claim for claim in claims), f"matrix README words not in the README: {key!r}"
    *bullets, accepted = claims
    for claim in bullets:
        assert any(claim.startswith(key) for key in keys), f"README claim without a test: {claim!r}"
    for part in ("masks of any value range", "file names in any script"):
        assert part in accepted and part in keys


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_test_named_in_the_matrix_exists():
    named = re.findall(r"`([\w./]+\.py)::(\w+)`", MATRIX.read_text())
    assert len(named) >= 40
    for file, function in named:
        path = (HERE / file).resolve()
        assert path.is_file(), f"{file} does not exist"
        assert function in _functions(path), f"{file} has no {function}"


def test_every_test_of_this_folder_is_in_the_matrix():
    """A reader scanning the matrix sees every module here (resume and run-folder tests by file)."""
    text = MATRIX.read_text()
    for path in HERE.glob("test_*.py"):
        stem = path.name
        elsewhere = ("test_resume", "test_run_folder", "test_checkpoint_monitor")  # listed by file pattern
        listed = stem in text or stem.startswith(elsewhere)
        assert listed or path.name == Path(__file__).name, f"{stem} is not in {MATRIX.name}"
