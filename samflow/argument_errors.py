"""jsonargparse's errors, made readable: ``one_line_argument_error`` writes its message tree as one line
naming the full option key; ``first_not_from_jsonargparse`` finds, in its exception chain, the error a
constructor or samflow raised.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
)


def one_line_argument_error(message: str, args: list[str], hint: str | None = None) -> str:
    """The most specific part of a jsonargparse error, as one line naming the full option key.

    jsonargparse reports ``--model.plugins.tokens.init_args.num_tokens abc`` as a tree: the outer key
    (``model.plugins``), the union alternatives it tried (``dict[...]``, ``None``), the class it loaded
    and the inner key (``num_tokens``) with the reason. The user needs the full key, the value and the
    innermost reason. ``hint`` says where the options are listed (default: ``samflow ARGS[0] --help``).
    """
    raw = [line for line in message.splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    outer = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
    nested = re.search(r"NestedArg\(key='([^']*)', val='([^']*)'\)", message)
    start = 1 if outer else 0
    problems = [i for i, line in enumerate(raw) if "Problem with given class_path" in line]
    if problems:  # only the reasons under the last class jsonargparse tried, not the other alternatives
        indent = len(raw[problems[-1]]) - len(raw[problems[-1]].lstrip())
        end = next(
            (j for j in range(problems[-1] + 1, len(raw)) if len(raw[j]) - len(raw[j].lstrip()) <= indent),
            len(raw),
        )
        lines, start = lines[problems[-1] + 1 : end], 0
    inner = [line for line in lines[start:] if not line.startswith(_NOISE)]
    detail = " ".join(line.lstrip("- ") for line in inner) or (lines[0] if lines else message)
    detail = re.sub(r"Expected a <class '(?:[\w.]+\.)?(\w+)'>\.?", r"expected \1;", detail)
    detail = detail.replace("; Got value:", ", got")
    detail = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", detail)
    detail = re.sub(r'Parser key "([^"]+)": ', "", detail)
    hint = hint or f"(`samflow {args[0]} --help` lists the options)"
    if outer is None:
        return f"{detail} {hint}"
    key = outer.group(1) + (f".{nested.group(1)}" if nested else "")
    flags = [a.split("=", 1)[0] for a in args if a.startswith(f"--{outer.group(1)}.")]
    key = next((f[2:] for f in flags if nested and f.endswith(f".{nested.group(1)}")), key)
    named = re.findall(r'Parser key "([^"]+)":', message)[1:]
    key = next((f[2:] for f in flags if not nested and any(f.endswith(f".{n}") for n in named)), key)
    value = f" {nested.group(2)!r}" if nested else ""
    return f"--{key}{value}: {detail} {hint}"


_UNKNOWN = re.compile(
    r"(Group|Subcommand) '([^']+)' does not accept option '([^']+)'|Option '([^']+)' is not accepted"
)


def unknown_option(message: str, args: list[str], options: list[str]) -> str | None:
    """``FILE: full.key: unknown option; did you mean 'x'?`` for an option jsonargparse refused that a
    ``--config`` file sets (its message names neither the file nor the full key), ``--full.key 'value':
    ...`` for one a flag sets; None for other errors.

    ``options``: the parser's option keys, for the closest one in a group (``trainer.max_epoch``); in a
    class's ``init_args`` the closest is among the class's arguments.
    """
    flag = re.match(r"[Uu]nrecognized arguments: (--[^\s=]+)", message)
    if flag:  # a misspelt flag: the closest option
        close = difflib.get_close_matches(flag.group(1)[2:], options, n=1)
        return f"{flag.group(1)}: unknown option; did you mean --{close[0]}?" if close else None
    found = _UNKNOWN.search(message)
    if found is None:
        return None
    option = found.group(3) or found.group(4)
    outer = re.match(r'Parser key "([^"]+)":', message)
    prefix = found.group(2) if found.group(1) == "Group" else outer.group(1) if outer else ""
    if found.group(1) == "Subcommand":  # 'trainer.max_epoch': the group and the option
        prefix, _, option = option.rpartition(".")
    nested = re.search(r"NestedArg\(key='([^']*)', val='([^']*)'\)", message)
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    if nested:
        where = f"--{prefix}.{nested.group(1)} {nested.group(2)!r}"
    elif any(f == f"--{option}" or f.endswith(f".{option}") for f in flags):
        return None  # a flag's value (one_line_argument_error names it)
    else:
        found_in = _set_in(option, prefix, args)
        if found_in is None:
            return None
        where = found_in
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    accepted = _arguments(classes[-1]) if classes else _children(options, prefix)
    close = difflib.get_close_matches(option, accepted, n=1)
    owner = classes[-1].rpartition(".")[2] if classes else prefix
    hint = f"did you mean {close[0]!r}?" if close else f"{owner} takes {', '.join(accepted) or 'none'}."
    return f"{where}: unknown option {option!r}; {hint}"


def _set_in(option: str, prefix: str, args: list[str]) -> str | None:
    """``FILE: full.key``: the last ``--config`` file in ``args`` that sets ``option`` under ``prefix``."""
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for config in reversed(configs):  # the last file that sets it is the one read last
        try:
            keys = list(_keys_named(yaml.safe_load(Path(config).read_text()), option))
        except (OSError, yaml.YAMLError):
            continue
        keys = [k for k in keys if not prefix or k.startswith(f"{prefix}.")]
        if keys:
            return f"{config}: {keys[0]}"
    return None


def _keys_named(node: Any, name: str, prefix: str = "") -> Iterator[str]:
    """The dotted keys of ``node`` (a YAML document) whose last part is ``name``."""
    if isinstance(node, dict):
        for key, value in node.items():
            full = f"{prefix}{key}"
            if key == name:
                yield full
            yield from _keys_named(value, name, f"{full}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _keys_named(value, name, f"{prefix}{i}.")


def _children(options: list[str], prefix: str) -> list[str]:
    """The options directly under ``prefix`` (``trainer.max_epochs`` -> ``max_epochs`` for ``trainer``)."""
    start = f"{prefix}." if prefix else ""
    return sorted({o[len(start) :].split(".")[0] for o in options if o.startswith(start) and o != start})


def _arguments(class_path: str) -> list[str]:
    """The arguments a class's ``init_args`` take: its constructor's, and its bases' while it passes
    ``**kwargs`` on (as jsonargparse reads them)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    names: list[str] = []
    for base in inspect.getmro(cls) if inspect.isclass(cls) else []:
        if "__init__" not in vars(base):
            continue
        try:
            params = list(inspect.signature(vars(base)["__init__"]).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def first_not_from_jsonargparse(err: BaseException) -> BaseException:
    """The outermost error of ``err``'s chain that jsonargparse did not raise (its union-type wrappers)."""
    chain: BaseException | None = err
    while chain is not None:
        tb = chain.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or not str(tb.tb_frame.f_globals.get("__name__", "")).startswith("jsonargparse"):
            return chain
        chain = chain.__cause__
    return _root_cause(err)
