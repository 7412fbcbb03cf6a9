"""The package list in pyproject.toml must match the package folders in the tree.

setuptools stops an install when a listed folder is missing, and leaves a folder out of a
non-editable install without saying anything when it is not listed. This test catches both cases
before CI does.
"""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config["package-dir"]


def _on_disk(package_dir: dict[str, str]) -> set[str]:
    found = set()
    for top, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            found.add(".".join((top, *relative.parts)))
    return found


def test_every_listed_package_exists_and_every_package_is_listed():
    declared, package_dir = _declared()
    on_disk = _on_disk(package_dir)
    assert declared - on_disk == set(), "listed in pyproject.toml but missing in the tree"
    assert on_disk - declared == set(), "in the tree but not listed in pyproject.toml"


def test_entry_points_name_listed_packages():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared, _ = _declared()
    for name, target in config["project"]["entry-points"]["samflow.plugins"].items():
        module = target.split(":")[0]
        assert module in declared, f"plugin {name!r} points at {module!r}, which is not packaged"
