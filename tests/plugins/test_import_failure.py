"""``import_failure``: the one-line reason a module failed to import, shared by plugin discovery (a
broken entry point's status) and the ``class_path`` check of ``samflow fit`` (``plugin_check._importable``)."""

from __future__ import annotations

import sys

import pytest

from samflow.experiment_files import ExperimentError
from samflow.plugin_check import check_plugin_target
from samflow.plugins.registry import import_failure


@pytest.mark.parametrize(
    ("err", "printed", "reason"),
    [
        (SystemExit("needs a GPU"), "", "exited at import with sys.exit('needs a GPU')"),
        (
            SystemExit(2),
            "usage: x [--rank RANK]\nx: error: unrecognized arguments: -q\n",
            "exited at import with sys.exit(2) (it printed 'error: unrecognized arguments: -q')",
        ),
        (ImportError("libfoo.so: cannot open"), "ignored", "ImportError: libfoo.so: cannot open"),
        (ModuleNotFoundError("No module named 'x'"), "", "ModuleNotFoundError: No module named 'x'"),
    ],
)
def test_import_failure_is_one_line(err, printed, reason):
    assert import_failure(err, printed) == reason


def test_class_path_of_a_module_exiting_at_import_gives_the_registrys_reason(tmp_path, monkeypatch):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ExperimentError) as err:
            check_plugin_target("model.plugins.a.class_path", "exits_at_import.Adapter")
    finally:
        sys.modules.pop("exits_at_import", None)
    assert str(err.value) == (
        "model.plugins.a.class_path: module 'exits_at_import' of plugin class 'exits_at_import.Adapter' "
        "fails to import: exited at import with sys.exit('needs a GPU'). Install what it needs or fix the module."
    )
