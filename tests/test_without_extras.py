"""samflow as `pip install samflow` installs it, without any extra (pyproject.toml's optional dependencies).

A missing extra is simulated by hiding its package (``sys.modules[name] = None``, as if not installed).
What needs an extra stops before any work in one ``samflow: error:`` line naming the extra and its pip
command, never with a traceback or at the first batch; ``import samflow`` and ``samflow --help`` import no
optional package; and every package samflow imports at module level is a core dependency.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from helpers import prompted_predict_args

from samflow.cli import main
from samflow.usage import MissingExtraError, UsageError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: the optional packages of the extras users install (not test / lint) -> their extra
OPTIONAL = {
    "cv2": "opencv",
    "matplotlib": "report",
    "optuna": "sweep",
    "sklearn": "sweep",
    "sqlalchemy": "sweep",
    "tiffslide": "wsi",
    "tifffile": "wsi",
    "shapely": "wsi",
    "skimage": "wsi",
    "pycocotools": "coco",
    "onnx": "onnx",
    "onnxruntime": "onnx",
}

pytest.importorskip("pycocotools")  # the COCO set is written with it, before it is hidden
sys.path.insert(0, str(ROOT / "tests" / "sapnet_e2e"))
from overlap_coco import make_overlap_coco, sapnet_experiment


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """``package`` and its loaded submodules made unimportable, as when its extra is not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")] or [package]:
        monkeypatch.setitem(sys.modules, name, None)


def one_line(err: str, extra: str) -> str:
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    assert line.startswith("samflow: error: ") and f"pip install 'samflow[{extra}]'" in line, err
    return line


# ---- the pip metadata: what samflow imports unconditionally is installed by `pip install samflow` ----
def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level package, at module level outside try / TYPE_CHECKING) of every absolute import."""
    found: list[tuple[str, bool]] = []

    def walk(nodes: list[ast.stmt], unconditional: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((a.name.split(".")[0], unconditional) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.module.split(".")[0], unconditional))
            elif isinstance(node, ast.Try):
                walk(node.body, False)
                for part in (node.handlers, node.orelse, node.finalbody):
                    walk(part, unconditional)  # type: ignore[arg-type]
            elif isinstance(node, ast.If):
                typing_only = "TYPE_CHECKING" in ast.unparse(node.test)
                walk(node.body, unconditional and not typing_only)
                walk(node.orelse, unconditional and not typing_only)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                walk(node.body, False)
            elif isinstance(node, (ast.With, ast.For, ast.While)):
                walk(node.body, unconditional)

    walk(tree.body, True)
    return found


def test_every_import_of_samflow_and_its_plugins_is_a_dependency_or_an_extra():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {
        _name(r)
        for extra, reqs in PYPROJECT["optional-dependencies"].items()
        if extra not in ("test", "lint")
        for r in reqs
    }
    distributions = packages_distributions()
    not_core, unknown = [], []
    for path in sorted([*(ROOT / "samflow").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]):
        for package, unconditional in _imports(ast.parse(path.read_text())):
            if package in sys.stdlib_module_names or package in ("samflow", "samflow_plugins"):
                continue
            names = {_name(d) for d in distributions.get(package, [package])}
            where = f"{path.relative_to(ROOT)}: {package}"
            if unconditional and not names & core:
                not_core.append(where)
            elif not names & (core | extras):
                unknown.append(where)
    assert not not_core, f"imported at module level but not in [project] dependencies: {not_core}"
    assert not unknown, f"imported but in no dependency or user extra of pyproject.toml: {unknown}"


_WATCHED_RUN = """
import builtins, importlib, json, sys
OPTIONAL = set(sys.argv[1].split(","))
tried = []
real_import, real_import_module = builtins.__import__, importlib.import_module


def watched_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.split(".")[0] in OPTIONAL:  # every import statement, even of a loaded module
        tried.append([name, (globals or {}).get("__name__", "")])
    return real_import(name, globals, locals, fromlist, level)


def watched_import_module(name, package=None):
    if name.split(".")[0] in OPTIONAL:
        tried.append([name, sys._getframe(1).f_globals.get("__name__", "")])
    return real_import_module(name, package)


builtins.__import__, importlib.import_module = watched_import, watched_import_module
import samflow, samflow.cli, samflow_plugins
for args in (["--help"], ["plugins"], ["experiments"]):
    assert samflow.cli.main(args) == 0, args
print(json.dumps(tried))
"""


def test_import_samflow_help_plugins_and_experiments_import_no_optional_package():
    done = subprocess.run(
        [sys.executable, "-c", _WATCHED_RUN, ",".join(OPTIONAL)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    tried = json.loads(done.stdout.strip().splitlines()[-1])
    own = [(name, by) for name, by in tried if by.split(".")[0] in ("samflow", "samflow_plugins")]
    assert not own, f"samflow imports optional packages at import or for help: {own}"


def test_the_error_names_the_extra_and_is_a_one_line_usage_error(monkeypatch):
    from samflow.usage import require_extra

    hide(monkeypatch, "pycocotools")
    with pytest.raises(MissingExtraError) as caught:
        require_extra("pycocotools.mask", "coco", "COCO data")
    assert isinstance(caught.value, UsageError) and isinstance(caught.value, ImportError)
    assert str(caught.value) == (
        "COCO data needs pycocotools, which samflow's `coco` extra installs: pip install 'samflow[coco]'."
    )


# ---- coco: the data module, the student's COCO mask AP ----
def test_coco_data_refuses_when_built_not_at_the_first_batch(tmp_path, monkeypatch):
    from samflow.data.coco import CocoDataModule

    annotations = make_overlap_coco(tmp_path / "coco", n_images=2)
    hide(monkeypatch, "pycocotools")
    with pytest.raises(MissingExtraError, match=r"pip install 'samflow\[coco\]'"):
        CocoDataModule(train={"annotations": str(annotations)}, img_size=128)


@pytest.mark.parametrize("command", ["fit", "proposals"])
def test_coco_commands_stop_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    exp = sapnet_experiment(tmp_path, test=True, epochs=1)
    hide(monkeypatch, "pycocotools")
    args = ["--out", str(tmp_path / "store")] if command == "proposals" else []
    assert main([command, "--experiment", str(exp), *args]) == 1
    one_line(capsys.readouterr().err, "coco")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "store").exists()  # nothing started


def test_student_stops_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    exp = sapnet_experiment(tmp_path, test=True, epochs=1)
    pseudo = tmp_path / "coco" / "instances.json"
    hide(monkeypatch, "pycocotools")
    args = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--out", str(tmp_path / "s")]
    assert main(args) == 1
    one_line(capsys.readouterr().err, "coco")


def test_coco_mask_ap_refuses_in_one_line(monkeypatch):
    from samflow.instance import CocoMaskAP

    hide(monkeypatch, "pycocotools")
    with pytest.raises(MissingExtraError, match=r"CocoMaskAP .* pip install 'samflow\[coco\]'"):
        CocoMaskAP()


# ---- onnx: samflow export --onnx ----
def test_export_onnx_stops_in_one_line_before_writing(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("predictor_conftest", ROOT / "tests/predictor/conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    run = conftest.make_run(tmp_path, {"decoder": conftest.PLUGINS["decoder"]}, steps=1)
    hide(monkeypatch, "onnx")
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 1
    line = one_line(capsys.readouterr().err, "onnx")
    assert "samflow export --onnx needs onnx" in line
    assert not out.exists() or not list(out.iterdir())  # nothing written
    assert main(["export", str(run), "--out", str(out)]) == 0  # without --onnx: no extra needed
    assert json.loads((out / "samflow.json").read_text())


# ---- coco: samflow predict --prompts writes results.json with COCO RLE masks ----
def test_predict_prompts_stops_in_one_line_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("predictor_conftest", ROOT / "tests/predictor/conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    run = conftest.make_run(tmp_path, {"decoder": conftest.PLUGINS["decoder"]}, steps=1)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 32)).save(images / "a.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": [{"box": [2, 2, 30, 20]}]}))
    hide(monkeypatch, "pycocotools")
    out = tmp_path / "out"
    args = prompted_predict_args(prompts, run, images, out)
    assert main(args) == 1
    one_line(capsys.readouterr().err, "coco")
    assert not out.exists()  # nothing written


# ---- wsi: samflow predict-slide ----
@pytest.mark.parametrize("package", ["tiffslide", "skimage", "shapely", "tifffile"])
def test_predict_slide_stops_in_one_line_before_reading_a_slide(tmp_path, monkeypatch, capsys, package):
    """Only tiffslide was checked first: without scikit-image the slides were read and the model built before
    tissue detection failed; without tifffile every tile was predicted before the mask could be written."""
    import samflow.wsi_predict as wsi_predict

    def read(*args, **kwargs):
        raise AssertionError("a slide was read before the extra was checked")

    monkeypatch.setattr(wsi_predict, "Slide", read)
    hide(monkeypatch, package)
    out = tmp_path / "out"
    args = ["predict-slide", str(tmp_path / "a.tiff"), "--experiment", "x.yaml", "--out", str(out)]
    assert main(args) == 1
    assert "samflow predict-slide needs" in one_line(capsys.readouterr().err, "wsi")
    assert not out.exists()
