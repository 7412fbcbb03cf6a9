"""Every user-visible option does what docs/options.md says, and none is accepted without effect.

An option that only matters together with another one is refused when given without it, in one
line, rather than ignored: ``samflow predict --prompts --points N`` counts the points of
``--derive points`` (boxes have none), and ``samflow sweep``'s ``--summary`` / ``--storage`` /
``--study`` are Optuna's (with ``--backend wandb``, ``--summary`` would start W&B's agent).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from samflow.cli import main
from samflow.prompt_files import PromptFileError, read_prompts


# ---- samflow predict --prompts: --points without --derive points ----
@pytest.fixture
def mask_prompts(tmp_path):
    """An image folder, a mask folder with one instance on its image, and the same as COCO annotations."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(images / "a.png")
    label = np.zeros((30, 40), np.uint8)
    label[5:20, 8:30] = 1
    Image.fromarray(label).save(masks / "a.png")
    coco = tmp_path / "coco.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}],
                "annotations": [
                    {
                        "id": 7,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [8, 5, 22, 15],
                        "segmentation": [[8, 5, 30, 5, 30, 20, 8, 20]],
                        "area": 330,
                        "iscrowd": 0,
                    }
                ],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    return images, masks, coco


@pytest.mark.parametrize("source", ["masks", "coco"])
def test_points_without_derive_points_are_refused_not_ignored(mask_prompts, source):
    """Before, ``--points 3`` alone gave the box prompts of ``--derive box`` (the default), silently."""
    images, masks, coco = mask_prompts
    prompts = masks if source == "masks" else coco
    with pytest.raises(
        PromptFileError, match=r"--points 3 counts the points drawn with --derive points.*--derive box"
    ):
        read_prompts(prompts, images, points=3)
    with pytest.raises(PromptFileError, match=r"add --derive points, or drop --points"):
        read_prompts(prompts, images, derive="box", points=3)
    (entry,) = read_prompts(prompts, images, derive="points", points=3)
    (prompt,) = entry.prompts
    assert prompt.box is None and prompt.points.shape == (3, 2)
    (entry,) = read_prompts(prompts, images)  # the default: the box, no points
    assert entry.prompts[0].box is not None and entry.prompts[0].points is None


def test_points_without_derive_is_one_line_before_the_model_is_read(mask_prompts, tmp_path, capsys):
    images, masks, _ = mask_prompts
    args = ["predict", "--prompts", str(masks), "--model", str(tmp_path / "no-run"), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "out"), "--points", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--points 2 counts the points drawn with --derive points" in err
    assert not (tmp_path / "out").exists()


# ---- samflow sweep: Optuna's flags with --backend wandb ----
@pytest.mark.parametrize(
    "flags",
    [["--summary"], ["--storage", "sqlite:///x.db"], ["--study", "s1"], ["--study", "s1", "--summary"]],
)
def test_optuna_flags_with_the_wandb_backend_are_refused(flags, monkeypatch, capsys):
    """Before, they were ignored: ``--summary`` (print the study so far) started W&B's sweep agent."""
    pytest.importorskip("optuna")
    import samflow.sweep.agent

    started = []
    monkeypatch.setattr(samflow.sweep.agent, "run_wandb", lambda *a, **k: started.append(a) or 0)
    assert main(["sweep", "quickstart_lr", "--backend", "wandb", *flags]) == 1
    err = capsys.readouterr().err
    named = [f for f in ("--summary", "--storage", "--study") if f in flags]
    assert err.count("\n") == 1 and err.startswith("samflow: error: samflow sweep: " + " and ".join(named))
    assert "are for Optuna's study (--backend optuna)" in err
    assert started == []
    assert main(["sweep", "quickstart_lr", "--backend", "wandb"]) == 0  # the agent, as before
    assert len(started) == 1


# ---- every option of docs/options.md is read somewhere ----
ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "samflow").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")])

#: Data modules that take some options as ``**options`` and pass them to another class unread.
FORWARDED = {"samflow.data.coco.CocoDataModule": "samflow.data.coco_instances.CocoInstances"}


@pytest.fixture(scope="module")
def documented() -> list[Any]:
    """Every option docs/options.md lists (``docs/make_options.py``: the same code reads them)."""
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return list(module.all_options(module.collect()))


def _reads(paths: list[Path]) -> tuple[set[str], set[str]]:
    """(attribute names read, string constants) in ``paths``: ``x.NAME`` loads and ``"NAME"`` (getattr)."""
    attributes, strings = set(), set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                attributes.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return attributes, strings


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def _unread(cls: type, param: str, read: set[str]) -> str | None:
    """Why ``cls``'s option ``param`` does nothing: not used by ``__init__``, or only stored in an
    attribute that nothing reads; None when it is read."""
    init = next(vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k))
    if not init.__module__.startswith(("samflow", "samflow_plugins")):
        return None  # a third-party class's (Lightning's ModelCheckpoint): its own business
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    if param not in inspect.signature(init).parameters:
        forwarded = FORWARDED.get(f"{cls.__module__}.{cls.__qualname__}")
        if forwarded is None:
            return f"{cls.__qualname__}.__init__ has no parameter {param!r}"
        return _unread(_class(forwarded), param, read)
    used = [
        n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == param and isinstance(n.ctx, ast.Load)
    ]
    if not used:
        return f"{cls.__qualname__}.__init__ never uses {param!r}"
    stored = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        if any(isinstance(n, ast.Name) and n.id == param for n in ast.walk(node.value)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            stored |= {
                t.attr
                for target in targets
                for t in ast.walk(target)
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
            }
    never = sorted(a for a in stored if a not in read)
    return f"{cls.__qualname__}.{param} is kept as self.{never[0]}, which nothing reads" if never else None


def test_every_class_option_in_the_doc_is_read(documented):
    """A plugin, data module, prompt sampler, augmentation, metric, loss, callback, ``model.*`` or
    ``Predictor`` option that is accepted but never read would be documented and do nothing."""
    read, _ = _reads(SOURCES)
    problems, checked = [], 0
    for option in documented:
        owner = option.owner
        if owner.startswith("samflow ") or not owner.startswith(("samflow.", "samflow_plugins.")):
            continue  # commands: the next test; Lightning's own classes (trainer, optimizer)
        cls = _class(owner)
        if not isinstance(cls, type) or cls.__name__ == "SamflowCLI":
            continue  # the CLI's own flags (--experiment, --resume, ...): read by name, tested with the CLI
        checked += 1
        if dataclasses.is_dataclass(cls):
            problem = None if option.param in read else f"{cls.__qualname__}.{option.param} is never read"
        else:
            problem = _unread(cls, option.param, read)
        if problem:
            problems.append(f"{option.name}: {problem}")
    assert checked > 200  # the plugins', data modules', callbacks', metrics' ... options were all seen
    assert problems == []


def test_every_command_flag_in_the_doc_is_read(documented):
    """Each flag of ``samflow embed``, ``export``, ``predict --prompts``, ... is read by its command's
    module (``args.FLAG``, or by name)."""
    from samflow.cli import COMMANDS

    problems, checked = [], 0
    for name, (target, _) in COMMANDS.items():
        module = importlib.import_module(target.partition(":")[0])
        attributes, strings = _reads([Path(inspect.getfile(module))])
        for option in (o for o in documented if o.owner == f"samflow {name}"):
            checked += 1
            if option.param not in attributes | strings:
                problems.append(
                    f"samflow {name} {option.name}: {module.__name__} never reads {option.param!r}"
                )
    assert checked > 50
    assert problems == []


# ---- model.threshold in a rebuilt model (Predictor, predict --prompts, export) ----
@pytest.mark.parametrize(
    ("threshold", "logit"), [(0.0, float("-inf")), (0.3, -0.8472978603872037), (0.5, 0.0)]
)
def test_the_run_threshold_is_the_predictors_logit_threshold_zero_included(tmp_path, threshold, logit):
    """``model.threshold: 0`` is p > 0 in ``samflow predict`` and the metrics; a rebuilt run left SAM's
    logit 0 (p > 0.5) for it, as it took only 0 < t < 1."""
    import yaml

    from samflow.rebuild import read_run_config

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"threshold": threshold}}))
    assert read_run_config(config)["predictor"]["mask_threshold"] == pytest.approx(logit)
