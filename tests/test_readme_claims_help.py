"""README ("Choosing components"): ``--data.init_args.prompt.help BoxPrompt`` shows the arguments of one
component class (``--model.plugins.help HQSam`` those of a plugin: ``tests/test_cli.py``), as the flags
that set them.

jsonargparse writes a nested class's options under the class's own key only (``--prompt.jitter``,
``--augment.hflip``), flags that ``samflow fit`` refuses; samflow writes the full flag. The flag the
help shows is then given to ``samflow fit --print_config``, which must take it and set that option.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from samflow.cli import main

CASES = [  # (data option, class, an option of the class, a value for it, the value in the config)
    ("prompt", "BoxPrompt", "jitter", "0.25", 0.25),
    ("eval_prompt", "PointPrompt", "positive", "3", 3),
    ("augment", "GpuAugment", "hflip", "0.25", 0.25),
]


def samflow(args: list[str], capsys) -> tuple[int, str, str]:
    """``samflow ARGS`` in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    argv = sys.argv
    try:
        code = main(args)
    except SystemExit as done:  # --print_config ends the parse
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("key", "cls", "option", "value", "parsed"), CASES, ids=[c[0] for c in CASES])
def test_a_data_components_help_shows_flags_that_fit_takes(
    tmp_path, monkeypatch, capsys, key, cls, option, value, parsed
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code, out, err = samflow(
        ["fit", "--experiment", "quickstart", f"--data.init_args.{key}.help", cls], capsys
    )
    assert code == 0, err[-2000:]
    flag = f"--data.init_args.{key}.init_args.{option}"
    assert flag in out, out[:2000]
    assert not re.search(rf"--{key}\.\w", out), "a flag without its path: fit refuses it"
    assert f"Help for --data.init_args.{key}.help=" in out

    shown = [
        "fit",
        "--experiment",
        "quickstart",
        f"--data.init_args.{key}",
        cls,
        flag,
        value,
        "--print_config",
    ]
    code, out, err = samflow(shown, capsys)
    assert code == 0, err[-2000:]
    component = yaml.safe_load(out)["data"]["init_args"][key]
    assert component["class_path"].endswith(f".{cls}")
    assert component["init_args"][option] == parsed
