"""A sweep file checked against its experiment before any trial runs.

Every trial is ``samflow fit --experiment X <fixed flags> <the trial's values>``; a misspelt option or
metric would fail every trial alike. So, once per sweep, ``samflow fit``'s own parser reads the
experiment with the file's fixed flags (the ``command`` key), then with each value of a list of values and
the low end of each range (a misspelt key, a misspelt plugin key or a value of the wrong type names
``parameters.<key>``), without building anything; and
the metric is compared with what the run logs where that is known (``val/<metric>`` for each of the
experiment's ``model.metrics`` on samflow's data modules, see ``samflow.main_metric.main_metric``).
What ``samflow fit`` refuses before SAM is built (``samflow.config_checks.check_before_build``) is asked
of the base and of the values known in advance (``_check_before_build``): a sweep each trial of which
would fail it, or a listed value each trial of which would, is refused before the first trial.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import re
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from samflow.sweep.spec import SweepError, SweepSpec


def experiment_path(spec: SweepSpec) -> Path:
    """The experiment file the sweep's ``command`` (or ``program``) names, its plugins checked."""
    from samflow.experiment_files import ExperimentError, resolve_experiment
    from samflow.plugin_check import check_plugins

    try:
        path = resolve_experiment(spec.experiment)
        check_plugins(path)
    except ExperimentError as err:
        key = "command" if "command" in spec.raw else "program"
        raise SweepError(f"{spec.path}: {key}: {err}") from None
    return path


def check_sweep(spec: SweepSpec, experiment: Path) -> None:
    """Raise ``SweepError`` (one line naming the sweep file and its key) for an option or metric that
    the experiment's ``samflow fit`` would refuse or never log."""
    from samflow.experiment_files import ExperimentError
    from samflow.lightning_cli import ConfigError, check_plugin_classes
    from samflow.plugin_check import check_plugin_args
    from samflow.sweep.run import flag

    where = str(spec.path)
    base = ["--config", str(experiment), *_as_fit_reads(spec.args)]
    try:
        check_plugin_args(spec.args)
        cli = _parse_only(experiment.stem, base)
        check_plugin_classes(cli.config["fit"])
    except (ArgumentError, ExperimentError, ConfigError) as err:
        raise SweepError(f"{where}: command: {_reason(err, base)}") from None
    # the configs of the base and of each value, for check_before_build
    parsed: dict[Any, Any] = {(): cli.config["fit"]}
    for key, sample in _samples(spec):
        value = spec.params[key].value(sample)
        args = [*base, *_as_fit_reads([flag(key, value)])]
        try:
            check_plugin_args([flag(key, value)])
            parsed[((key, flag(key, value)),)] = config = cli.parser.parse_args(["fit", *args])["fit"]
            check_plugin_classes(config)
        except (ArgumentError, ExperimentError, ConfigError) as err:
            raise SweepError(f"{where}: parameters.{key}: {_reason(err, args)}") from None
    _check_before_build(spec, cli, base, parsed)
    if not any(k.startswith(("model.metrics", "data")) for k in spec.params):
        _check_metric(where, spec.metric, cli.config["fit"], experiment.stem)


def _check_before_build(spec: SweepSpec, cli: Any, base: list[str], parsed: dict[Any, Any]) -> None:
    """Refuse a sweep whose trials would each fail ``check_before_build`` (what ``samflow fit`` refuses
    before SAM is built: data framed at another size than SAM's input, ``losses: {}`` with no plugin loss,
    a plateau scheduler ranking the checkpoint's metric the other way, ...).

    A trial takes one value of every parameter, so their values are checked together: one parameter's
    value may mend a fault of the base that hides another, mended by another parameter's. Each known
    value counts (each of a list, a constant) and, for a searched range, its two ends. With at most
    ``_MOST_COMBINED`` combinations, all are checked: the base is refused (``command``) when every one
    fails, else each listed value every combination with which fails (``parameters.<key>``). Nothing is
    refused when a range's two ends give different verdicts beside the same other values (a searched
    value decides: it cannot be known before the trials), nor when there are more combinations (each
    trial that fails says why, before SAM is built). ``parsed``: the configs parsed already, by their
    ``(key, flag)`` pairs (``()``, the base's)."""
    from samflow.sweep.run import flag

    known: dict[str, list[tuple[str, str]]] = {}  # key -> (shown value, flag) of each value checked
    searched: list[str] = []
    for key, p in spec.params.items():
        d = p.distribution
        enumerable = d is None or hasattr(d, "choices")
        samples = [None] if d is None else list(d.choices) if enumerable else [d.low, d.high]
        values = [p.value(sample) for sample in samples]
        known[key] = list(dict.fromkeys((json.dumps(v, default=str), flag(key, v)) for v in values))
        if not enumerable:
            searched.append(key)
    combos = [dict(zip(known, c)) for c in itertools.product(*known.values())]
    if len(combos) > _MOST_COMBINED:
        return

    def verdict(combo: dict[str, tuple[str, str]]) -> str | None:
        flags = tuple((k, f) for k, (_, f) in combo.items())
        args = [*base, *_as_fit_reads([f for _, f in flags])]
        try:
            config = parsed.get(flags) or cli.parser.parse_args(["fit", *args])["fit"]
        except ArgumentError as err:  # a range's high end: the trial that draws it says why
            return f"samflow fit refuses it: {err}"
        return _before_build_error(copy.deepcopy(config))

    failed = [verdict(c) for c in combos]
    for key in searched:  # do its two ends agree beside every combination of the other values?
        beside: dict[tuple, set[str | None]] = {}
        for combo, error in zip(combos, failed):
            others = tuple(f for k, (_, f) in combo.items() if k != key)
            beside.setdefault(others, set()).add(error)
        if any(len(errors) > 1 for errors in beside.values()):
            return
    where = str(spec.path)
    if all(failed):
        several = [key for key, values in known.items() if len(values) > 1]
        also = f" (with every value of parameters.{', parameters.'.join(several)} too)" if several else ""
        raise SweepError(f"{where}: command: every trial would fail before it starts{also}: {failed[0]}")
    for key, values in known.items():
        if key in searched or len(values) < 2:
            continue
        for shown, f in values:
            errors = [error for combo, error in zip(combos, failed) if combo[key][1] == f]
            if all(errors):
                raise SweepError(
                    f"{where}: parameters.{key}: every trial with the value {shown} would fail before it "
                    f"starts: {errors[0]}"
                )


_MOST_COMBINED = 64  # combinations of the parameters' values checked together (each parsed: ~0.3 s)


def _before_build_error(config: Any) -> str | None:
    """What ``samflow fit``'s ``check_before_build`` refuses in the parsed ``config``, or None."""
    from samflow.config_checks import ConfigError, check_before_build, optimizer_into_model
    from samflow.data.errors import DataError

    optimizer_into_model(config)
    try:
        check_before_build(config, "fit")
    except (ConfigError, DataError) as err:
        return str(err)
    return None


def _as_fit_reads(args: list[str]) -> list[str]:
    """``args`` as ``samflow fit``'s parser gets them from ``samflow.cli.main``: without the verbosity
    flags (``--quiet``, ``--verbose``), with W&B's value forms (``--a=None``) made JSON."""
    from samflow.cli import VERBOSITY_FLAGS
    from samflow.sweep.agent import agent_values

    return agent_values([a for a in args if a not in VERBOSITY_FLAGS])


def _parse_only(run_name: str, args: list[str]) -> Any:
    """``samflow fit ARGS``'s LightningCLI (its subcommand's options too, ``--ckpt_path``), parsed
    without seeding, building or running anything; its ``config["fit"]`` is the run's config."""
    from samflow.lightning_cli import SamflowCLI

    class ParseOnly(SamflowCLI):
        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    with warnings.catch_warnings():  # LightningCLI's "given args and a command line too"
        warnings.simplefilter("ignore")
        return ParseOnly(run_name, args=["fit", *args])


def _samples(spec: SweepSpec) -> list[tuple[str, Any]]:
    """(key, Optuna sample) pairs to check: every choice of a list of values (each may be a trial's),
    the low end of a range, a constant once."""
    pairs: list[tuple[str, Any]] = []
    for key, p in spec.params.items():
        d = p.distribution
        choices = [None] if d is None else list(d.choices) if hasattr(d, "choices") else [d.low]
        pairs += [(key, choice) for choice in choices]
    return pairs


def _reason(err: Exception, args: list[str]) -> str:
    """The parser's complaint in a few words (``Option 'lrr' is not accepted``), else its one line."""
    from samflow.argument_errors import one_line_argument_error

    text = str(err)
    if isinstance(err, ArgumentError):
        found = re.search(r"(Option|Key) '[^']+' is not accepted|[Uu]nrecognized arguments: .*", text)
        text = found.group(0) if found else one_line_argument_error(text, ["fit", *args])
    return f"samflow fit refuses it: {' '.join(text.split())}"


def _check_metric(where: str, metric: str, config: Any, experiment: str) -> None:
    """A ``val/...`` metric the experiment never logs (known for samflow's data modules) is an error."""
    from samflow.components import plain_config
    from samflow.main_metric import main_metric
    from samflow.metrics.registry import DEFAULT_METRICS, build_metrics

    metrics, data = config.get("model.metrics"), config.get("data")
    main = main_metric(metrics, data)
    if main is None or not metric.startswith("val/"):
        return  # what this experiment logs cannot be known before it runs
    try:
        built = build_metrics(plain_config(metrics) if metrics is not None else list(DEFAULT_METRICS))
    except Exception:  # noqa: BLE001 - a bad metrics spec is the trial's own error
        return
    if any("dict" in str(inspect.signature(type(m).compute).return_annotation) for m in built.values()):
        return  # a metric of several values logs names of its own
    several = main[0].count("/") > 1  # val/<metric>/<set>, one per validation set
    names = [*built, "loss", "encoder_cache_hit_rate"]
    if any(metric.startswith(f"val/{n}/") if several else metric == f"val/{n}" for n in names):
        return
    shown = ", ".join(f"val/{n}" + ("/<set>" if several else "") for n in built)
    raise SweepError(
        f"{where}: metric.name: experiment {experiment} does not log {metric!r} (its validation metrics: "
        f"{shown}); fix metric.name."
    )
