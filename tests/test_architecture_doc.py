"""docs/architecture.md against the code: the claims that drift when either changes.

Each test reads the doc's own words (the Layout and Layers blocks, the hook list, the context fields,
the command list, the backticked paths and names) and compares them with the code, so changing one
without the other fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()


def section(title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## ``."""
    start = DOC.index(f"\n## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else None]


def code_block(text: str) -> str:
    """The first fenced block of ``text``."""
    return re.search(r"```\n(.*?)```", text, re.DOTALL).group(1)


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


# ---- Layout: every module of samflow/ is described ----
def samflow_files() -> list[Path]:
    return sorted(p for p in (ROOT / "samflow").rglob("*.py") if "__pycache__" not in p.parts)


def test_layout_names_every_module_and_package():
    layout = code_block(section("Layout"))
    words = set(re.findall(r"[\w.]+/?", layout))
    missing = []
    for path in (ROOT / "samflow").iterdir():
        if path.suffix == ".py" and path.stem not in ("__init__", "__main__") and path.name not in words:
            missing.append(f"samflow/{path.name}")
        if path.is_dir() and (path / "__init__.py").is_file() and f"{path.name}/" not in words:
            missing.append(f"samflow/{path.name}/")
    # packages whose Layout entry names its files: every file must be there
    for package in ("sam", "sam/backbones", "embed", "plugins", "sweep", "callbacks", "data", "instance"):
        for path in sorted((ROOT / "samflow" / package).glob("*.py")):
            if path.stem != "__init__" and path.name not in words:
                missing.append(f"samflow/{package}/{path.name}")
    assert not missing, f"docs/architecture.md's Layout does not name {missing}"


# ---- Layers: imports go one way ----
def layer_rows() -> list[list[str]]:
    """The Layers table's left column: rows of module names, bottom row first (a row goes on over the
    next line while its last name ends with a comma)."""
    rows: list[list[str]] = []
    going_on = False
    for line in code_block(section("Layers")).splitlines():
        names, rest, comma = [], line, False
        while found := re.match(r"(samflow[\w.]*)(,?)\s*", rest):
            names.append(found.group(1))
            rest, comma = rest[found.end() :], bool(found.group(2))
            if not comma:
                break
        if not names:
            continue
        if going_on:
            rows[-1] += names
        else:
            rows.append(names)
        going_on = comma
    return rows


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in samflow_files()}


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The row of the most specific listed name that is ``module`` or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in layers:
            return layers[".".join(parts[:n])]
    return None


def imported_modules(path: Path) -> set[str]:
    """samflow modules ``path`` imports, anywhere (functions too), except under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("samflow"):
            for alias in node.names:  # ``from samflow import tiled_predict`` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "samflow"}
    return found


def test_layers_table_covers_every_module():
    listed = [name for row in layer_rows() for name in row]
    assert len(listed) == len(set(listed)), f"the Layers table names a module twice: {listed}"
    layers = {name: i for i, row in enumerate(layer_rows()) for name in row}
    assert len(layers) > 20, "the Layers table was not read"
    for name in layers:
        assert name in MODULES, f"the Layers table names {name}, which is not a samflow module"
    unplaced = [
        m for m in MODULES if m not in ("samflow", "samflow.__main__") and layer_of(m, layers) is None
    ]
    assert not unplaced, f"docs/architecture.md's Layers table places no row for {unplaced}"


def test_no_module_imports_a_row_above_its_own():
    layers = {name: i for i, row in enumerate(layer_rows()) for name in row}
    # the package ``samflow`` re-exports samflow.batch, samflow.sam and samflow.plugins
    layers_with_root = {**layers, "samflow": layers["samflow.plugins"]}
    wrong = []
    for module, path in MODULES.items():
        own = layer_of(module, layers)
        if own is None:
            continue
        for target in imported_modules(path):
            theirs = layers_with_root.get(target) if target == "samflow" else layer_of(target, layers)
            if theirs is not None and theirs > own:
                wrong.append(f"{module} imports {target}")
    assert not wrong, f"imports against docs/architecture.md's Layers: {sorted(wrong)}"


# ---- hooks: names, order, signatures, contexts ----
def hook_list() -> dict[str, list[tuple[str, list[str]]]]:
    """The Plugins section's hook list: part ("encoder side", ...) -> [(hook, argument names)]."""
    text = section("Plugins")
    start = text.index("- **Hooks**")
    end = text.index("\n- **", start + 1)
    parts = {}
    for part in re.split(r"\n  - ", text[start:end])[1:]:
        label = part.split(",")[0].split(":")[0].strip()
        parts[label] = [
            (name, [a.strip() for a in args.split(",") if a.strip()])
            for name, args in re.findall(r"`(\w+)\(([^)]*)\)`", part)
        ]
    return parts


def test_hook_list_matches_the_plugin_contract():
    from samflow.plugins.base import SamPlugin
    from samflow.plugins.checks import HOOKS
    from samflow.sam.types import DecoderContext, ForwardContext

    parts = hook_list()
    assert list(parts) == ["encoder side", "decoder side", "beside the pass"]
    listed = [name for hooks in parts.values() for name, _ in hooks]
    assert listed == list(HOOKS), (
        "the doc's hook list and samflow.plugins.checks.HOOKS differ (names or order)"
    )
    contexts = {"encoder side": ForwardContext, "decoder side": DecoderContext}
    for part, hooks in parts.items():
        for name, args in hooks:
            signature = inspect.signature(getattr(SamPlugin, name))
            assert args == [p for p in signature.parameters if p != "self"], f"{name}'s arguments"
            if part in contexts:
                hints = inspect.get_annotations(getattr(SamPlugin, name), eval_str=True)
                assert hints["ctx"] is contexts[part], f"{name} receives {hints['ctx']}, the doc says {part}"


def test_hooks_run_in_the_listed_order(tiny_sam):
    """A plugin that fills every site records its calls: their first calls come in the doc's order, and
    each block's and layer's hooks in the doc's sequence."""
    from samflow.plugins import PluginStack, SamPlugin
    from samflow.sam import HookedSam
    from samflow.testing import random_batch

    calls: list[tuple[str, int | None]] = []

    class Recorder(SamPlugin):
        def setup(self, sam):
            self.token = torch.nn.Parameter(torch.zeros(1, sam.mask_decoder.transformer_dim))

        def output_tokens(self):
            calls.append(("output_tokens", None))
            return self.token

        def on_image(self, image, tokens, ctx):
            calls.append(("on_image", None))

        def block_input(self, i, x, ctx):
            calls.append(("block_input", i))
            return x

        def attn_logits(self, i, scale, bias, q, ctx):
            calls.append(("attn_logits", i))
            return scale, bias

        def block_output(self, i, x, ctx):
            calls.append(("block_output", i))
            return x

        def prompts(self, prompts, ctx):
            calls.append(("prompts", None))
            return prompts

        def decoder_layer(self, i, state, ctx):
            calls.append(("decoder_layer", i))
            return state

        def decode_token(self, tokens, feats, ctx):
            calls.append(("decode_token", None))
            return {}

        def select(self, out, ctx):
            calls.append(("select", None))

        def losses(self, out, batch, ctx):
            calls.append(("losses", None))
            return {}

    model = HookedSam(tiny_sam, PluginStack({"rec": Recorder()}))
    batch = random_batch(2, size=128)
    calls.clear()  # ``attach`` reads output_tokens once
    with torch.no_grad():
        out, ctx = model.run(batch)
        model.plugins.losses(out, batch, ctx)
    forward = [name for name, _ in hook_list()["encoder side"] + hook_list()["decoder side"]]
    first = list(dict.fromkeys(name for name, _ in calls if name in forward))
    assert first == forward
    depth = len(tiny_sam.image_encoder.blocks)
    encoder = [c for c in calls if c[0] in ("block_input", "attn_logits", "block_output")]
    assert encoder == [(h, i) for i in range(depth) for h in ("block_input", "attn_logits", "block_output")]
    layers = len(tiny_sam.mask_decoder.transformer.layers)
    assert [c for c in calls if c[0] == "decoder_layer"] == [("decoder_layer", i) for i in range(layers)]


def test_hooked_sam_docstring_lists_the_sites_in_the_same_order():
    from samflow.sam import hooked

    sites = re.search(r"Hook sites, in order:(.*?)\"\"\"", inspect.getsource(hooked), re.DOTALL).group(1)
    named = [n for n in re.findall(r"``(\w+)", sites)]
    forward = [name for name, _ in hook_list()["encoder side"] + hook_list()["decoder side"]]
    assert [n for n in named if n != "losses"] == [n for n in forward if n != "losses"]


def test_context_fields():
    from samflow.sam.types import DecoderContext, ForwardContext

    text = section("Plugins")
    claim = re.search(
        r"\*\*Contexts\.\*\* `ForwardContext`: (.*?)\. `DecoderContext` adds\s+(.*?)\.", text, re.DOTALL
    )
    listed = re.findall(r"`(\w+)`", claim.group(1).replace("state[key]", "state"))
    assert listed == [f.name for f in dataclasses.fields(ForwardContext)]
    added = re.findall(r"`(\w+)`", claim.group(2))[0]
    assert [f.name for f in dataclasses.fields(DecoderContext)] == [*listed, added]


def test_batch_docstring_table_lists_every_field():
    """``samflow/batch.py``'s table, which the doc points to for every field, names exactly the fields."""
    import samflow.batch
    from samflow.batch import SamBatch

    lines = samflow.batch.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    body = "\n".join(lines[rules[1] + 1 : rules[2]])  # the table's rows, below its header
    table = re.findall(r"^((?:``\w+``,? ?)+)", body, re.MULTILINE)
    documented = [name for row in table for name in re.findall(r"``(\w+)``", row)]
    assert documented == [f.name for f in dataclasses.fields(SamBatch)]


def members(cls: type) -> set[str]:
    """Public attributes of ``cls``, dataclass fields included."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return fields | {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}


def test_batch_fields_the_doc_names_exist():
    """``batch.<field>`` in the doc: a field of ``SamBatch`` or of COCO's ``CocoBatch`` (a subclass)."""
    from samflow.batch import SamBatch
    from samflow.data.coco_batch import CocoBatch

    assert issubclass(CocoBatch, SamBatch)
    fields = members(CocoBatch)
    named = set(re.findall(r"\b(?:batch|SamBatch|CocoBatch)\.(\w+)\b(?!\.py)", DOC)) - {"py"}
    assert named and named <= fields, f"the doc names SamBatch members that do not exist: {named - fields}"


# ---- commands, entry points, ONNX inputs, the tiny variant ----
def test_cli_commands_in_layout():
    from samflow.cli import COMMANDS, SUBCOMMANDS

    line = re.search(r"cli\.py\s+`samflow` command: (.*?); every user error", DOC, re.DOTALL).group(1)
    line = " ".join(line.split())
    lightning, rest = line.split(" (LightningCLI), ")
    assert lightning.split("|") == list(SUBCOMMANDS)
    assert rest.startswith("experiments, plugins, and the argparse commands of `COMMANDS`: ")
    listed = rest.split(": ", 1)[1].split(", ")
    assert listed == list(COMMANDS)


def test_entry_point_group():
    import tomllib

    from samflow.plugins.registry import GROUP

    assert f"`{GROUP}` entry-point group" in " ".join(DOC.split())
    assert f'entry_points(group="{GROUP}")' in DOC
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert GROUP in pyproject["project"]["entry-points"]


def test_packaged_experiments_mapping():
    """The doc: pyproject.toml maps the package ``samflow.experiments`` to the top-level experiments/."""
    import tomllib

    assert "(pyproject.toml maps the package `samflow.experiments` to this folder)" in " ".join(DOC.split())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"]["samflow.experiments"] == "experiments"


def test_onnx_inputs():
    from samflow.onnx_export import INPUTS, block_input_name

    claim = re.search(r"segment-anything's ONNX inputs \((.*?)\)\s+plus\s+`(\w+)<i>`", DOC, re.DOTALL)
    assert tuple(re.findall(r"`(\w+)`", claim.group(1))) == INPUTS
    assert block_input_name(7) == f"{claim.group(2)}7"


def test_tiny_variant():
    from samflow.sam.build import VARIANTS

    tiny = VARIANTS["tiny"]
    text = " ".join(section("Decisions (differences from the target design)").split())
    claim = re.search(
        r"embedding (\d+), depth (\d+), global blocks (\d+) and (\d+); - (\d+) px, window (\d+); - decoder dim (\d+)",
        text,
    )
    assert claim, "the tiny variant's line was not found"
    values = [int(v) for v in claim.groups()]
    assert values == [
        tiny.embed_dim,
        tiny.depth,
        *tiny.global_attn_indexes,
        tiny.img_size,
        tiny.window_size,
        tiny.prompt_dim,
    ]


# ---- every backticked path and samflow name exists ----
def test_backticked_paths_exist():
    missing = []
    for text in set(ticked(DOC)) - ELSEWHERE:
        if " " in text or "<" in text or text.startswith(("./", "runs/")):
            continue
        if re.search(r"\.(py|md|toml|yaml)$", text) or text.startswith(("tests/", "samflow/", "benchmarks/")):
            roots = [ROOT, ROOT / "samflow", ROOT / "tests", ROOT / "tests" / "reliability"]
            bare = "/" not in text.rstrip("/")  # a file name alone: anywhere in the repository
            if not any((r / text).exists() for r in roots) and not (bare and any(ROOT.glob(f"*/**/{text}"))):
                missing.append(text)
    assert not missing, f"docs/architecture.md names paths that do not exist: {sorted(missing)}"


#: names the doc gives of files outside this repository or made by a run or an install
ELSEWHERE = {
    "ARCHITECTURE.md",  # the founding design, and its file names the code does not use
    "sam/output.py",
    "data/slides.py",
    "efficient_sam_decoder.py",  # yformer/EfficientSAM's files
    "two_way_transformer.py",
    "config.yaml",  # a run's resolved config
    "samflow/experiments/",  # experiments/ as a wheel installs it
    "samflow.experiments",
}


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` (``samflow.x.y`` or ``Class.attr``) is a module or an attribute of one."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            if isinstance(obj, type) and attr in members(obj) and not hasattr(obj, attr):
                return True  # a dataclass field without a class-level default
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_backticked_samflow_names_resolve():
    bad = []
    for text in set(ticked(DOC)):
        name = text.split("(")[0]
        if (
            re.fullmatch(r"samflow(\.\w+)+", name)
            and name not in ELSEWHERE
            and not name.endswith(".json")
            and not resolves(name)
        ):
            bad.append(text)
    assert not bad, f"docs/architecture.md names samflow objects that do not exist: {sorted(bad)}"


CLASSES = {
    "HookedSam": "samflow.sam.HookedSam",
    "SamflowModule": "samflow.module.SamflowModule",
    "SamflowCLI": "samflow.lightning_cli.SamflowCLI",
    "PluginStack": "samflow.plugins.PluginStack",
    "SamPlugin": "samflow.plugins.SamPlugin",
    "SegmentationDataModule": "samflow.data.datamodule.SegmentationDataModule",
    "CocoDataModule": "samflow.data.coco.CocoDataModule",
    "Predictor": "samflow.predictor.Predictor",
    "DecoderState": "samflow.sam.types.DecoderState",
    "DecoderFeatures": "samflow.sam.types.DecoderFeatures",
    "ForwardContext": "samflow.sam.types.ForwardContext",
    "PromptEmbeddings": "samflow.sam.types.PromptEmbeddings",
    "SamBatch": "samflow.batch.SamBatch",
    "CocoBatch": "samflow.data.coco_batch.CocoBatch",
    "rel_pos": "samflow.sam.rel_pos",
    "ops": "samflow.sam.ops",
    "encoder_block": "samflow.sam.encoder_block",
    "predictor": "samflow.predictor",
    "rebuild": "samflow.rebuild",
    "storage": "samflow.sweep.storage",
}


def test_backticked_members_of_known_classes_exist():
    """``HookedSam.encode``, ``ops.window_partition``, ``SamflowModule.setup`` ...: the class or module
    the doc names has that member."""
    bad = []
    for text in set(ticked(DOC)):
        found = re.fullmatch(r"(\w+)\.(?!py$)(\w+)(\(.*\))?", text)
        if (
            found
            and found.group(1) in CLASSES
            and not resolves(f"{CLASSES[found.group(1)]}.{found.group(2)}")
        ):
            bad.append(text)
    assert not bad, f"docs/architecture.md names members that do not exist: {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_known_class_paths_resolve(name):
    assert resolves(CLASSES[name]), CLASSES[name]
