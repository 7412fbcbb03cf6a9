"""Write docs/options.md, the reference of every user-visible option, from the code.

    python docs/make_options.py          # rewrite docs/options.md
    python docs/make_options.py --check  # exit 1 with a diff when docs/options.md is stale

Nothing here is written by hand but the headings and the short introductions. The options come from:

- ``samflow fit/validate/test/predict``: the parser ``SamflowCLI`` builds (LightningCLI + jsonargparse),
  with samflow's defaults; the classes behind ``model.sam``, the data modules in ``samflow.data``, the
  prompt samplers and batch augmentations, the loss and metric registries, and the callback groups
  ``SamflowCLI.add_arguments_to_parser`` adds (recorded as it adds them);
- the built-in plugins: the entry points ``samflow.plugins`` of pyproject.toml;
- the other subcommands: the argparse parser each ``samflow.cli.COMMANDS`` function builds (caught when
  it parses, before it runs);
- the Python API: ``samflow.predictor.Predictor``.

A description is jsonargparse's (the ``Args:`` / ``Attributes:`` entry of the docstring) or argparse's
help; when jsonargparse finds none, an ``Args:`` entry naming several parameters (``a, b: ...``) or
saying ``see ``Other`` `` (another class's entry of the same name) is used. ``undocumented`` lists the
options still without one (``tests/test_options_doc.py`` fails on them).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import json
import os
import pkgutil
import re
import sys
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "options.md"
LIGHTNING_TRAINER_DOCS = "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags"
LIGHTNING_CLI_DOCS = "https://lightning.ai/docs/pytorch/stable/cli/lightning_cli.html"
TORCHMETRICS_DOCS = "https://lightning.ai/docs/torchmetrics/stable/pages/overview.html#metric-kwargs"
EXPERIMENT = "<experiment>"  # the run name the defaults are shown with (runs/<experiment>)


@dataclass
class Option:
    """One option: how it is written, its type, default and description, and whose parameter it is."""

    name: str
    type: str
    default: str
    description: str
    owner: str  # the class (module.Class) or command whose parameter this is
    param: str


@dataclass
class Section:
    level: int
    title: str
    intro: str = ""
    options: list[Option] = field(default_factory=list)


# ---- rendering values ----
def _plain(value: Any) -> Any:
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        return {key: _plain(item) for key, item in value.as_dict().items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def show_value(value: Any) -> str:
    """A default as YAML / JSON writes it (``null``, ``true``, ``"box"``, ``[1, 2]``)."""
    value = _plain(value)
    if isinstance(value, type):
        return value.__name__
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def show_type(hint: Any) -> str:
    """A type hint without module paths: ``int``, ``str | None``, ``Literal['sobel', 'canny']``."""
    if hint is None or hint is inspect.Parameter.empty:
        return ""
    if hint is type(None):
        return "None"
    if hint is Ellipsis:
        return "..."
    if isinstance(hint, list):  # Callable's parameters
        return "[" + ", ".join(show_type(item) for item in hint) + "]"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(show_type(arg) for arg in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(arg) for arg in args) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", None) or str(origin).replace("typing.", "")
        return f"{name}[{', '.join(show_type(arg) for arg in args)}]" if args else name
    if isinstance(hint, type):
        return hint.__name__
    text = str(hint).replace("typing.", "")
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)


def clean(text: str | None, summary: bool = False) -> str:
    """One line of Markdown: reST literals become code spans, whitespace is collapsed.

    ``summary`` (third-party help, e.g. Lightning's): the first two sentences of the first paragraph,
    without ``Default: ...`` sentences (the table shows samflow's default) and examples.
    """
    if not text:
        return ""
    text = inspect.cleandoc(text)
    if summary:
        text = text.split("\n\n")[0].split("::")[0]
        sentences = re.split(r"(?<=\.)\s+(?=[A-Z`])", " ".join(text.split()))
        kept = [s for s in sentences if not re.match(r"Defaults?(:| to )|Example", s)]
        text = " ".join(kept[:2])
    text = re.sub(r":(?:class|func|meth|attr|ref|mod):`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"`([^`<]+?) <[^>]+>`_", r"\1", text)  # reST links: their text
    text = text.replace("``", "`")
    return " ".join(text.split())


def first_line(obj: Any) -> str:
    return clean((inspect.getdoc(obj) or "").split("\n\n")[0])


# ---- descriptions that jsonargparse does not find ----
def _args_entries(cls: type) -> dict[str, str]:
    """``Args:`` / ``Attributes:`` entries of ``cls``'s docstrings, an entry ``a, b: ...`` for each name."""
    import docstring_parser

    entries: dict[str, str] = {}
    for doc in (inspect.getdoc(cls), inspect.getdoc(cls.__init__) if "__init__" in vars(cls) else None):
        for item in docstring_parser.parse(doc or "").params:
            for name in item.arg_name.split(","):
                if item.description:
                    entries.setdefault(name.strip(), item.description)
    return entries


def docstring_description(cls: type, param: str, seen: tuple[type, ...] = ()) -> str:
    """The docstring's entry of ``param``, with ``see ``Other``\u200b`` followed (``follow_see``)."""
    return follow_see(cls, param, _args_entries(cls).get(param, ""), seen)


def follow_see(cls: type, param: str, text: str, seen: tuple[type, ...] = ()) -> str:
    """``see ``Other``[; more]`` becomes ``Other``'s entry of ``param`` [; more]."""
    match = re.match(r"see\s+``(\w+)``[.;]?\s*", text.strip())
    if match:
        other = vars(sys.modules[cls.__module__]).get(match.group(1))
        if isinstance(other, type) and other not in seen:
            found = docstring_description(other, param, (*seen, cls)).rstrip(".")
            rest = text.strip()[match.end() :]
            if found:
                return f"{found}; {rest}" if rest else found
    return text


def effective_default(cls: type, param: str) -> str | None:
    """What ``__init__`` uses for ``param=None``: ``x if x is not None else E``, ``E if x is None else x``,
    ``x or E``; ``E`` as written in the code (``self.`` dropped)."""
    init = vars(cls).get("__init__")
    if init is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return None

    def named(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == param

    for node in ast.walk(tree):
        found = None
        if isinstance(node, ast.IfExp) and isinstance(node.test, ast.Compare):
            test = node.test
            if named(test.left) and isinstance(test.comparators[0], ast.Constant):
                if (
                    test.comparators[0].value is None
                    and isinstance(test.ops[0], ast.IsNot)
                    and named(node.body)
                ):
                    found = node.orelse
                elif (
                    test.comparators[0].value is None
                    and isinstance(test.ops[0], ast.Is)
                    and named(node.orelse)
                ):
                    found = node.body
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and named(node.values[0]):
            found = node.values[1]
        if found is not None:
            return _value_of(found, cls) or ast.unparse(found).replace("self.", "")
    return None


def _value_of(node: ast.expr, cls: type) -> str | None:
    """The value of a default written with the module's constants (``list(DEFAULT_METRICS)``), so the
    table shows the values; None for anything but names, literals and list / tuple / dict of them."""
    for part in ast.walk(node):
        if isinstance(part, ast.Call) and not (
            isinstance(part.func, ast.Name) and part.func.id in ("list", "tuple", "dict")
        ):
            return None
        if isinstance(part, ast.Attribute):
            return None
    try:
        value = eval(compile(ast.Expression(node), "<default>", "eval"), dict(vars(inspect.getmodule(cls))))
    except Exception:
        return None
    return repr(value) if isinstance(value, (list, tuple, dict, str, int, float, bool)) else None


# ---- options of a class, through jsonargparse ----
def _is_samflow(owner: str) -> bool:
    return owner.startswith(("samflow", "samflow_plugins"))


def owner_of(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def public_path(cls: type) -> str:
    """The shortest import path of ``cls`` (``samflow.data.SegmentationDataModule``)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = importlib.import_module(".".join(parts[:end]))
        if getattr(module, cls.__name__, None) is cls:
            return f"{module.__name__}.{cls.__name__}"
    return owner_of(cls)


def _value_actions(parser: Any) -> list[Any]:
    from jsonargparse._typehints import ActionTypeHint

    return [a for a in parser._actions if isinstance(a, ActionTypeHint)]


def _excluded(base: type) -> set[str]:
    """Parameters that jsonargparse finds for ``base`` itself (e.g. torchmetrics' ``Metric`` kwargs)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(base, "x", fail_untyped=False)
    return {a.dest.split(".", 1)[1] for a in _value_actions(parser)}


def action_option(action: Any, name: str, owner: str, param: str, cls: type | None = None) -> Option:
    third_party = not _is_samflow(owner)
    description = action.help or ""
    if cls is not None:
        description = follow_see(cls, param, description) or docstring_description(cls, param)
    description = clean(description, summary=third_party)
    default = "required" if action.required else show_value(action.default)
    if action.default is None and not action.required and cls is not None:
        used = effective_default(cls, param)
        if used is not None and used != param:
            default += f" (uses `{used}`)"
    return Option(name, show_type(getattr(action, "_typehint", None)), default, description, owner, param)


def class_options(cls: type, prefix: str = "", skip: set[str] = frozenset()) -> list[Option]:  # type: ignore[assignment]
    """The constructor options of ``cls`` as jsonargparse reads them, named ``prefix + param``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False)
    options = []
    for action in _value_actions(parser):
        param = action.dest.split(".", 1)[1]
        if param not in skip:
            options.append(action_option(action, prefix + param, owner_of(cls), param, cls))
    return options


def _dataclass_in(hint: Any) -> type | None:
    for option in typing.get_args(hint) or (hint,):
        if isinstance(option, type) and is_dataclass(option):
            return option
    return None


# ---- samflow fit / validate / test / predict ----
class _Captured(Exception):
    def __init__(self, parser: Any) -> None:
        super().__init__("parser captured")
        self.parser = parser


def lightning_parsers() -> tuple[dict[str, Any], dict[str, type]]:
    """The parsers of fit / validate / test / predict as ``SamflowCLI`` builds them, and the callback
    groups ``add_arguments_to_parser`` adds (key -> class)."""
    from samflow.lightning_cli import SamflowCLI

    groups: dict[str, type] = {}

    class Capture(SamflowCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            add = parser.add_lightning_class_args

            def record(cls: Any, key: str, *args: Any, **kwargs: Any) -> Any:
                groups[key] = cls
                return add(cls, key, *args, **kwargs)

            parser.add_lightning_class_args = record
            try:
                super().add_arguments_to_parser(parser)
            finally:
                del parser.add_lightning_class_args

        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Captured(parser)

    try:
        Capture(run_name=EXPERIMENT, args=[])
    except _Captured as captured:
        main = captured.parser
    else:  # pragma: no cover - parse_arguments always raises
        raise RuntimeError("SamflowCLI did not parse")
    return dict(main._subcommands_action._name_parser_map), groups


def _commands_note(dest: str, parsers: dict[str, Any]) -> str:
    having = [name for name, parser in parsers.items() if any(a.dest == dest for a in parser._actions)]
    return "" if len(having) == len(parsers) else f"({', '.join(having)} only) "


def cli_flag_descriptions() -> dict[str, str]:
    """``--experiment``, ``--quiet`` and ``--verbose``: read by ``samflow.cli`` before LightningCLI."""
    from samflow import cli

    found: dict[str, str] = {}
    module = inspect.getdoc(cli) or ""
    match = re.search(r"``--experiment NAME``(.*?)(?:\n\n|$)", module, re.DOTALL)
    if match:
        found["--experiment"] = clean("`--experiment NAME`" + match.group(1))
    doc = inspect.getdoc(cli._verbosity_from_argv) or ""
    for flag in cli.VERBOSITY_FLAGS:
        match = re.search(rf"^``{flag}``: (.*?)(?:\n``--|\n\n|\Z)", doc, re.DOTALL | re.MULTILINE)
        found[flag] = clean(match.group(1)) if match else ""
    return found


def lightning_sections() -> list[Section]:
    from lightning.pytorch import Trainer
    from torchmetrics import Metric

    from samflow.lightning_cli import SamflowCLI
    from samflow.losses import LOSSES
    from samflow.metrics.registry import METRICS

    parsers, groups = lightning_parsers()
    fit = parsers["fit"]
    actions = _value_actions(fit)
    sections = [
        Section(
            2,
            "samflow fit / validate / test / predict",
            "LightningCLI commands ([LightningCLI](" + LIGHTNING_CLI_DOCS + ")): every option is a "
            "flag (`--model.threshold 0.6`) or a key of the experiment's YAML (`model: {threshold: 0.6}`). "
            "Defaults are samflow's; `<experiment>` is the experiment's name.",
        )
    ]

    # top-level flags
    top = Section(3, "Top-level flags")
    flags = cli_flag_descriptions()
    from samflow import cli

    for flag in ["--experiment", *cli.VERBOSITY_FLAGS]:
        kind = "str" if flag == "--experiment" else "flag"
        top.options.append(Option(f"`{flag}`", kind, "", flags.get(flag, ""), "samflow.cli", flag))
    known = {"trainer", "model", "data", *groups}
    for action in fit._actions:
        if action.dest.split(".")[0] in known or action.dest in ("help",):
            continue
        if type(action).__name__ in ("_HelpAction", "_ActionHelpClassPath", "_ActionConfigLoad"):
            continue
        owner = "samflow.lightning_cli.SamflowCLI" if action.dest in ("config", "resume") else "LightningCLI"
        option = Option(
            ", ".join(f"`{s}`" for s in action.option_strings),
            show_type(getattr(action, "_typehint", None)) or ("path" if action.dest == "config" else "flag"),
            "" if action.default in (None, argparse.SUPPRESS) else show_value(action.default),
            _commands_note(action.dest, parsers) + clean(action.help, summary=owner == "LightningCLI"),
            owner,
            action.dest,
        )
        top.options.append(option)
    sections.append(top)

    # trainer
    trainer = Section(
        3,
        "Trainer (`trainer.*`)",
        f"Lightning's `Trainer` options, as in [Lightning's documentation]({LIGHTNING_TRAINER_DOCS}). "
        + clean((inspect.getdoc(SamflowCLI.before_instantiate_classes) or "").split("\n\n")[0])
        + " samflow sets these defaults:",
    )
    signature = inspect.signature(Trainer.__init__).parameters
    for action in actions:
        if not action.dest.startswith("trainer."):
            continue
        param = action.dest.split(".", 1)[1]
        lightning_default = signature[param].default if param in signature else None
        if _plain(action.default) != lightning_default:
            option = action_option(action, f"`{action.dest}`", "lightning.pytorch.Trainer", param)
            option.description += f" (Lightning's default: `{show_value(lightning_default)}`.)"
            trainer.options.append(option)
    sections.append(trainer)

    # model
    from samflow.module import SamflowModule

    model = Section(3, "Model (`model.*`)", first_line(SamflowModule))
    for action in actions:
        if not action.dest.startswith("model."):
            continue
        param = action.dest.split(".", 1)[1]
        model.options.append(
            action_option(action, f"`{action.dest}`", owner_of(SamflowModule), param, SamflowModule)
        )
        spec = _dataclass_in(action._typehint)
        if spec is not None:
            model.options += [
                Option(f"`{action.dest}.{o.name}`", o.type, o.default, o.description, o.owner, o.param)
                for o in class_options(spec)
            ]
    sections.append(model)

    base_metric = _excluded(Metric)
    losses = Section(
        4,
        "Loss terms (`model.losses`)",
        "`model.losses` maps a term's name to its weight, or to `{weight: W, OPTION: VALUE, ...}` (weight "
        "1 when left out), or to `{class_path: ..., init_args: {...}, weight: W}` for any loss module. "
        "The built-in names and their options:",
    )
    without = []
    for name, cls in LOSSES.items():
        options = class_options(cls, f"{name}.")
        losses.options += [_code(o) for o in options]
        if not options:
            without.append(f"`{name}` ({cls.__name__})")
    if without:
        losses.intro += " " + ", ".join(without) + " take no options."
    sections.append(losses)

    metrics = Section(
        4,
        "Metrics (`model.metrics`)",
        "`model.metrics` lists short names, or maps a log name to `{class_path: NAME_OR_CLASS, init_args: "
        "{...}}`. The built-in names and their options; every metric also takes torchmetrics' "
        f"[`Metric` options]({TORCHMETRICS_DOCS}) (`compute_on_cpu`, `sync_on_compute`, ...).",
    )
    for name, cls in METRICS.items():
        metrics.options += [_code(o) for o in class_options(cls, f"{name}.", skip=base_metric)]
    sections.append(metrics)

    # data
    data = Section(
        3,
        "Data (`data.*`)",
        "`data.class_path` chooses the data module; its options are `data.init_args.*` "
        "(`--data.init_args.batch_size 8`).",
    )
    sections.append(data)
    for cls in data_modules():
        section = Section(4, f"{cls.__name__}", f"`class_path: {public_path(cls)}`. {first_line(cls)}")
        section.options = [_code(o) for o in class_options(cls)]
        sections.append(section)
    sections += data_component_sections()

    # callbacks
    callbacks = Section(
        3,
        "Callbacks",
        "Callbacks every run has, configured under their own keys (`--samples.num_samples 4`).",
    )
    sections.append(callbacks)
    for key, cls in groups.items():
        title = f"`{key}.*`: {cls.__name__}"
        intro = first_line(cls)
        if not _is_samflow(owner_of(cls)):
            intro = f"Lightning's `{cls.__name__}`: {intro}"
            if key == "checkpoint":
                intro += " " + clean(inspect.getdoc(SamflowCLI._monitor_main_metric))
        section = Section(4, title, intro)
        for action in actions:
            if action.dest.startswith(f"{key}."):
                param = action.dest.split(".", 1)[1]
                section.options.append(action_option(action, f"`{action.dest}`", owner_of(cls), param, cls))
        if not section.options:
            section.intro += " No options."
        sections.append(section)
    return sections


def _code(option: Option) -> Option:
    option.name = f"`{option.name}`"
    return option


def _submodules(package: str) -> list[Any]:
    root = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.walk_packages(root.__path__, f"{package}."))
    return [root, *(importlib.import_module(name) for name in names)]


def _defined_in(package: str, base: type) -> list[type]:
    found: dict[str, type] = {}
    for module in _submodules(package):
        for name, obj in sorted(vars(module).items()):
            if (
                isinstance(obj, type)
                and issubclass(obj, base)
                and obj is not base
                and not name.startswith("_")
                and obj.__module__.startswith(package)
                and not inspect.isabstract(obj)
            ):
                found.setdefault(owner_of(obj), obj)
    return sorted(found.values(), key=lambda c: (c.__module__, c.__name__))


def data_modules() -> list[type]:
    from lightning.pytorch import LightningDataModule

    return _defined_in("samflow.data", LightningDataModule)


def data_component_sections() -> list[Section]:
    from samflow.data.augment import BatchAugment
    from samflow.data.prompts import PROMPTS, PromptSampler

    aliases = {cls: name for name, cls in PROMPTS.items()}
    sections = [
        Section(
            4,
            "Prompt samplers (`prompt`, `eval_prompt`)",
            "`{class_path: NAME, init_args: {...}}`, or a short alias (`box`, `{name: points, positive: 2}`).",
        )
    ]
    for cls in _defined_in("samflow.data", PromptSampler):
        alias = f" Alias `{aliases[cls]}`." if cls in aliases else ""
        section = Section(5, cls.__name__, f"`class_path: {public_path(cls)}`.{alias} {first_line(cls)}")
        section.options = [_code(o) for o in class_options(cls)]
        if not section.options:
            section.intro += " No options."
        sections.append(section)
    sections.append(Section(4, "Batch augmentations (`augment`)", first_line(BatchAugment)))
    for cls in _defined_in("samflow.data", BatchAugment):
        section = Section(5, cls.__name__, f"`class_path: {public_path(cls)}`. {first_line(cls)}")
        section.options = [_code(o) for o in class_options(cls)]
        sections.append(section)
    return sections


# ---- plugins ----
def builtin_plugins() -> dict[str, str]:
    """Entry point name -> ``module:Class`` of the group ``samflow.plugins`` in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(project["project"]["entry-points"]["samflow.plugins"])


def plugin_sections() -> list[Section]:
    sections = [
        Section(
            2,
            "Plugins",
            "Plugins go under `model.plugins.<key>` with `class_path` (the plugin's class: its full import path, "
            "or its class name when no other installed plugin shares it; not the entry point name) and "
            "`init_args` (`--model.plugins.<key>.init_args.lr 1e-4`). `samflow plugins` lists the installed "
            "ones.",
        )
    ]
    for name, target in sorted(builtin_plugins().items()):
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        full = target.replace(":", ".")  # the class path `samflow plugins` lists
        summary = f"`class_path: {cls.__name__}` (or `{full}`). {first_line(cls)}"
        section = Section(3, f"{name}: {cls.__name__}", summary)
        section.options = [_code(o) for o in class_options(cls)]
        sections.append(section)
    return sections


# ---- argparse subcommands ----
def command_parser(target: str) -> tuple[argparse.ArgumentParser, bool]:
    """The parser a ``COMMANDS`` function builds, caught when it parses; and whether it passes the
    arguments it does not know on (LightningCLI overrides of the experiment)."""
    module, _, function = target.partition(":")
    original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def parse_args(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured((self, False))

    def parse_known_args(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured((self, True))

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    try:
        getattr(importlib.import_module(module), function)([])
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
    raise RuntimeError(f"{target} returned without parsing its arguments")


def argparse_option(action: argparse.Action, owner: str) -> Option:
    if action.option_strings:
        name = ", ".join(f"`{s}`" for s in action.option_strings)
    else:
        name = f"`{(action.metavar or action.dest).upper()}`" + (" ..." if action.nargs in ("+", "*") else "")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kind, default = "flag", ""
    else:
        kind = "{" + ", ".join(map(str, action.choices)) + "}" if action.choices else ""
        kind = kind or (action.type.__name__ if isinstance(action.type, type) else "str")
        if action.nargs in ("+", "*"):
            kind += " ..."
        default = (
            "required" if action.required else ("" if action.default is None else show_value(action.default))
        )
    return Option(name, kind, default, clean(action.help), owner, action.dest)


def command_sections() -> list[Section]:
    from samflow.cli import COMMANDS

    sections = [
        Section(
            2,
            "Other commands",
            "`samflow experiments` lists the experiments, `samflow plugins` the plugins, `samflow --version` "
            "the version; they take no options. The commands below read their own flags; those marked "
            "*overrides* pass every other argument to the experiment, as `samflow fit` reads it "
            "(`--model.sam.checkpoint PATH`).",
        )
    ]
    for name, (target, usage) in COMMANDS.items():
        parser, overrides = command_parser(target)
        intro = f"`samflow {name} {usage}`" + (" (*overrides*)" if overrides else "") + ". "
        section = Section(3, f"samflow {name}", intro + clean(parser.description))
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                section.options.append(argparse_option(action, f"samflow {name}"))
        sections.append(section)
    return sections


# ---- Python API ----
def api_sections() -> list[Section]:
    from samflow.predictor import Predictor

    section = Section(
        2,
        "Python API: Predictor",
        "`Predictor(model, **options)`, `Predictor.from_run(run_dir, **options)`, "
        "`Predictor.from_checkpoint(ckpt, **options)`, `Predictor.from_export(folder, **options)`. "
        + first_line(Predictor),
    )
    section.options = [_code(o) for o in class_options(Predictor, skip={"model"})]
    return [section]


# ---- the document ----
def collect() -> list[Section]:
    """Every section of the document, read from the code now."""
    saved = dict(os.environ)
    os.environ.pop("SAMFLOW_VERBOSITY", None)  # the defaults of a plain run (no --quiet / --verbose)
    try:
        return [*lightning_sections(), *plugin_sections(), *command_sections(), *api_sections()]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


HEADER = (
    "<!-- Generated by docs/make_options.py from the code; do not edit. "
    "Run `python docs/make_options.py` after changing an option. -->"
)
SUMMARY = (
    "Every option a user can set, with its type, default and description, read from the code. "
    "`samflow fit --help` (with `--data.help CLASS`, `--model.plugins.help CLASS`) and each command's "
    "`--help` list the same options."
)


def render(sections: list[Section]) -> str:
    lines = [
        "# Options reference",
        "",
        HEADER,
        "",
        SUMMARY,
        "",
    ]
    toc = [s for s in sections if s.level == 2]
    lines += [f"- [{s.title}](#{_anchor(s.title)})" for s in toc] + [""]
    for section in sections:
        lines += ["#" * section.level + " " + section.title, ""]
        if section.intro:
            lines += [section.intro, ""]
        if section.options:
            lines += ["| option | type | default | description |", "| --- | --- | --- | --- |"]
            for o in section.options:
                typ = f"`{_cell(o.type)}`" if o.type else ""
                default = _cell(o.default) if o.default in ("required", "") else _default_cell(o.default)
                lines.append(f"| {_cell(o.name)} | {typ} | {default} | {_cell(o.description)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _default_cell(default: str) -> str:
    value, sep, note = default.partition(" (uses ")
    return f"`{_cell(value)}`" + (f" (uses {_cell(note[:-1])})" if sep else "")


def _anchor(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def all_options(sections: list[Section]) -> list[Option]:
    return [option for section in sections for option in section.options]


def undocumented(sections: list[Section]) -> list[str]:
    """``file: Class.param`` (or ``samflow cmd: --flag``) of every option without a description."""
    missing = []
    for option in all_options(sections):
        if option.description.strip():
            continue
        where = option.owner
        module, _, name = option.owner.rpartition(".")
        if module in sys.modules:
            try:
                where = f"{Path(inspect.getfile(sys.modules[module])).relative_to(ROOT)}: {name}"
            except (TypeError, ValueError):
                pass
        missing.append(
            f"{where}.{option.param}"
            if not option.owner.startswith("samflow ")
            else f"{where}: {option.name}"
        )
    return sorted(set(missing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/options.md from the code.")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 with a diff when docs/options.md is stale"
    )
    args = parser.parse_args(argv)
    sections = collect()
    text = render(sections)
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), str(OUTPUT), "generated"
            )
            sys.stdout.writelines(diff)
            print(
                f"\n{OUTPUT.relative_to(ROOT)} is stale: run `python docs/make_options.py`.", file=sys.stderr
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    missing = undocumented(sections)
    print(f"wrote {OUTPUT.relative_to(ROOT)}: {len(all_options(sections))} options")
    if missing:
        print(f"{len(missing)} without a description:\n  " + "\n  ".join(missing), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
