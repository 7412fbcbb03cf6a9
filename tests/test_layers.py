"""Imports go one way (docs/architecture.md, "Layers"), and built-in plugins use only public names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> samflow packages it may import (besides itself).
ALLOWED = {
    "samflow.batch": {"samflow.seeding"},
    "samflow.seeding": set(),
    "samflow.paths": set(),
    "samflow.sam": {"samflow.batch", "samflow.seeding", "samflow.paths"},
    "samflow.plugins": {"samflow.batch", "samflow.seeding", "samflow.paths", "samflow.sam"},
}
#: modules a built-in plugin may import from samflow.
PUBLIC = {"samflow", "samflow.batch", "samflow.sam", "samflow.plugins", "samflow.testing"}


def samflow_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import samflow...`` / ``from samflow... import`` in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "samflow":
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "samflow"]
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(package):
    base = ROOT / package.replace(".", "/")
    files = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else sorted(base.rglob("*.py"))
    assert files
    for path in files:
        for module, _ in samflow_imports(path):
            target = package_of(module)
            assert target == package or target in ALLOWED[package], (
                f"{path.relative_to(ROOT)} imports {module}"
            )


def test_builtin_plugins_import_only_public_names():
    files = sorted((ROOT / "plugins").rglob("*.py"))
    assert files
    for path in files:
        for module, names in samflow_imports(path):
            where = path.relative_to(ROOT)
            assert module in PUBLIC, f"{where} imports the non-public module {module}"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{where} imports private names {private} from {module}"
            exported = set(__import__(module, fromlist=["__all__"]).__all__)
            assert set(names) <= exported, (
                f"{where} imports {sorted(set(names) - exported)} not in {module}.__all__"
            )
