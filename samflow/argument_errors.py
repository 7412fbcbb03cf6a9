"""jsonargparse's errors, made readable: ``one_line_argument_error`` writes its message tree as one line
naming the full option key; ``_first_not_from_jsonargparse`` finds, in its exception chain, the error a
constructor or samflow raised.
"""

from __future__ import annotations

import re

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


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _first_not_from_jsonargparse(err: BaseException) -> BaseException:
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
