"""A checked sweep (``SweepSpec``): its search space as Optuna distributions, its sampler and pruner.

``samflow.sweep.load`` reads a W&B sweep file into it; ``parse_param`` here reads one parameter's spec.

Each W&B distribution becomes one Optuna distribution and, where Optuna has no such distribution, a
transform of the sampled value (``Param.value``):

=====================================  ==============================================================
W&B                                    Optuna (sampled) -> value used
=====================================  ==============================================================
value / constant                       fixed, not sampled
values / categorical                   CategoricalDistribution(values)
int_uniform                            IntDistribution(min, max)
uniform                                FloatDistribution(min, max)
q_uniform                              FloatDistribution(min, max, step=q) (IntDistribution when
                                       min, max and q are integers)
log_uniform_values                     FloatDistribution(min, max, log=True)
log_uniform                            FloatDistribution(e^min, e^max, log=True)
inv_log_uniform_values                 FloatDistribution(min, max, log=True) (ln 1/X uniform is X
                                       log-uniform)
inv_log_uniform                        FloatDistribution(e^-max, e^-min, log=True)
q_log_uniform(_values)                 as log_uniform(_values) -> round(X / q) * q
normal, log_normal, beta (and q_)      FloatDistribution(1e-6, 1 - 1e-6): the quantile u -> the
                                       inverse CDF at u (mu, sigma / a, b), exp() for log_normal,
                                       then round(X / q) * q for the q_ forms
=====================================  ==============================================================

Grid sweeps take ``values``, ``value``, ``int_uniform`` and ``q_uniform`` (every value between min and
max); W&B refuses other distributions in a grid, and so does samflow.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samflow.experiment_files import ExperimentError

QUANTILE = (1e-6, 1 - 1e-6)  # the quantile range of normal, log_normal and beta (about +-4.75 sigma)
_PRIMITIVE = (type(None), bool, int, float, str)
_SPEC_KEYS = {"value", "values", "distribution", "min", "max", "q", "mu", "sigma", "a", "b", "probabilities"}


class SweepError(ExperimentError):
    """A sweep file that cannot be read or names something unusable (one line naming the key)."""


@dataclass(frozen=True)
class Param:
    """One parameter: its Optuna distribution (None for a constant) and how a sample becomes a value."""

    key: str
    distribution: Any = None  # optuna.distributions.BaseDistribution, or None for a constant
    constant: Any = None
    kind: str = (
        "plain"  # plain | json (a categorical choice Optuna cannot store) | normal | log_normal | beta
    )
    q: float | None = None
    args: tuple[float, ...] = ()  # (mu, sigma) or (a, b)

    def value(self, sampled: Any) -> Any:
        """The option value for Optuna's sample (``sampled`` is ignored for a constant)."""
        if self.distribution is None:
            return self.constant
        if self.kind == "json":
            return _decode(sampled)
        value = sampled
        if self.kind in ("normal", "log_normal"):
            from scipy.stats import norm

            value = float(norm.ppf(sampled, loc=self.args[0], scale=self.args[1]))
            value = math.exp(value) if self.kind == "log_normal" else value
        elif self.kind == "beta":
            from scipy.stats import beta

            value = float(beta.ppf(sampled, self.args[0], self.args[1]))
        if self.q is not None:
            value = round(value / self.q) * self.q
            value = int(value) if float(self.q).is_integer() else value
        return value


def _encode(choice: Any) -> Any:
    """A categorical choice as Optuna stores it: a primitive as is, anything else as ``json:...``."""
    return choice if isinstance(choice, _PRIMITIVE) else "json:" + json.dumps(choice, sort_keys=True)


def _decode(stored: Any) -> Any:
    return json.loads(stored[5:]) if isinstance(stored, str) and stored.startswith("json:") else stored


@dataclass
class SweepSpec:
    """A sweep file, checked: what to run, what to optimise, and the search space."""

    path: Path
    method: str
    metric: str
    goal: str  # "minimize" | "maximize"
    params: dict[str, Param]
    experiment: str
    args: list[str] = field(default_factory=list)  # fixed flags of ``command`` besides the experiment
    target: float | None = None
    early_terminate: dict[str, Any] | None = None
    run_cap: int | None = None
    name: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def sampled(self) -> dict[str, Param]:
        return {k: p for k, p in self.params.items() if p.distribution is not None}

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's option value for one trial, from Optuna's ``trial.params``."""
        return {key: p.value(sampled.get(key)) for key, p in self.params.items()}

    def search_space(self) -> dict[str, str]:
        """Every parameter's name and distribution (or constant value), as the study records them."""

        def text(p: Param) -> str:
            if p.distribution is None:
                return f"value {p.constant!r}"
            choices = getattr(p.distribution, "choices", None)
            return f"values {list(choices)}" if choices is not None else str(p.distribution)

        return {k: text(p) for k, p in self.params.items()}

    def grid(self) -> dict[str, list[Any]]:
        """The grid's search space (the stored choices of every sampled parameter)."""
        return {k: list(p.distribution.choices) for k, p in self.sampled.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def sampler(self, seed: int | None = None) -> Any:
        import optuna

        if self.method == "grid":  # one seed for every worker: it orders the grid, place n takes point n
            return _grid_sampler(self.grid(), seed=0 if seed is None else seed)
        if self.method == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def pruner(self) -> Any:
        """Optuna's pruner for ``early_terminate`` (none: NopPruner)."""
        import optuna

        et = self.early_terminate
        if not et:
            return optuna.pruners.NopPruner()
        if et["type"] == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=int(et.get("n_startup_trials", 5)),
                n_warmup_steps=int(et.get("n_warmup_steps", 0)),
            )
        eta = int(et.get("eta", 3))
        if "min_iter" in et:
            low, high = int(et["min_iter"]), et.get("max_iter", "auto")
        else:  # max_iter with s brackets: W&B's lowest bracket is max_iter / eta^s
            high = int(et["max_iter"])
            low = max(1, round(high / eta ** int(et.get("s", 0))))
        return _hyperband_class()(min_resource=low, max_resource=high, reduction_factor=eta)


def _hyperband_class() -> Any:
    import optuna

    from samflow.sweep.storage import PLACE

    class Hyperband(optuna.pruners.HyperbandPruner):
        """Optuna's HyperbandPruner with a trial's bracket chosen by its place in the sweep (Optuna: by
        its number), so that a trial run again after an interruption keeps its bracket, and so do the
        trials after it (``samflow.sweep.storage.places``)."""

        def _get_bracket_id(self, study: Any, trial: Any) -> int:
            placed = copy.copy(trial)  # Optuna's choice reads the number only
            placed.number = trial.system_attrs.get(PLACE, trial.number)
            return int(super()._get_bracket_id(study, placed))

    return Hyperband


def _grid_class() -> Any:
    import optuna

    from samflow.sweep.storage import place_of

    class Grid(optuna.samplers.GridSampler):
        """Optuna's GridSampler with a trial's point chosen by its place in the sweep (Optuna: point n
        for trial number n, so a trial run again after an interruption shifted the points after it),
        and which leaves stopping to samflow's trial loop (it calls ``study.stop()``, valid only inside
        ``study.optimize``, once the grid is covered)."""

        def before_trial(self, study: Any, trial: Any) -> None:
            if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
                return  # a trial that runs another's values again
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
            place = place_of(study, trial, trials)  # kept: the trial loop's ask reads it
            taken = {t.system_attrs.get("grid_id") for t in trials if t.number != trial.number}
            if place >= self._n_min_trials or place in taken:  # past the grid: Optuna's unvisited point
                super().before_trial(study, trial)
                return
            study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            study._storage.set_trial_system_attr(trial._trial_id, "grid_id", place)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return Grid


def _grid_sampler(space: dict[str, list[Any]], seed: int) -> Any:
    return _grid_class()(space, seed=seed)


def _number(where: str, spec: dict[str, Any], key: str, default: float | None = None) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where}: {key} must be a number, got {value!r}.")
    return value


def parse_param(where: str, key: str, spec: Any, method: str) -> Param:
    """One parameter's spec -> ``Param`` (``where`` names it in errors)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not isinstance(spec, dict):
        raise SweepError(
            f"{where}: expected a mapping such as {{values: [...]}} or {{min: 0, max: 1}}, got {spec!r}."
        )
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise SweepError(
            f"{where}: unknown key {unknown[0]!r} (a parameter has {', '.join(sorted(_SPEC_KEYS))})."
        )
    kind = spec.get("distribution") or _infer(where, spec)
    if "probabilities" in spec:
        raise SweepError(
            f"{where}: probabilities (weighted categories) have no Optuna counterpart; list values."
        )
    _refuse_unused_keys(where, spec, kind)
    if kind == "constant":
        if "value" not in spec:
            raise SweepError(f"{where}: distribution constant needs value.")
        return Param(key, constant=spec["value"])
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: values must be a non-empty list, got {values!r}.")
        encoded = [_encode(v) for v in values]
        if len(set(map(repr, encoded))) != len(encoded):
            raise SweepError(f"{where}: values has a duplicate: {values!r}.")
        json_kind = any(not isinstance(v, _PRIMITIVE) for v in values)
        return Param(key, CategoricalDistribution(encoded), kind="json" if json_kind else "plain")
    if kind in ("normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta"):
        base = kind.removeprefix("q_")
        names = ("a", "b") if base == "beta" else ("mu", "sigma")
        args = tuple(float(_number(where, spec, n, 1.0 if n in ("sigma", "a", "b") else 0.0)) for n in names)
        if args[1] <= 0 or (base == "beta" and args[0] <= 0):
            raise SweepError(f"{where}: {names[1] if args[1] <= 0 else names[0]} must be positive.")
        if method == "grid":
            raise SweepError(f"{where}: a grid needs values (or int_uniform / q_uniform), not {kind}.")
        q = float(_number(where, spec, "q", 1.0)) if kind.startswith("q_") else None
        return Param(key, FloatDistribution(*QUANTILE), kind=base, q=q, args=args)
    known = (
        "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform",
        "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values",
    )  # fmt: skip
    if kind not in known:
        every = [
            "constant",
            "categorical",
            *known,
            "normal",
            "q_normal",
            "log_normal",
            "q_log_normal",
            "beta",
            "q_beta",
        ]
        raise SweepError(f"{where}: unknown distribution {kind!r}; W&B's are {', '.join(every)}.")
    low, high = _number(where, spec, "min"), _number(where, spec, "max")
    if low >= high:
        raise SweepError(f"{where}: min must be below max, got min {low} and max {high}.")
    q = _number(where, spec, "q", 1) if kind.startswith("q_") else None
    if q is not None and q <= 0:
        raise SweepError(f"{where}: q must be positive, got {q}.")
    if kind == "int_uniform" and not (float(low).is_integer() and float(high).is_integer()):
        raise SweepError(f"{where}: int_uniform needs integer min and max, got {low} and {high}.")
    if method == "grid":
        return _grid_param(where, key, kind, low, high, q)
    if kind == "int_uniform":
        return Param(key, IntDistribution(int(low), int(high)))
    if kind == "uniform":
        return Param(key, FloatDistribution(float(low), float(high)))
    if kind == "q_uniform":
        assert q is not None
        if all(float(v).is_integer() for v in (low, high, q)):
            return Param(key, IntDistribution(int(low), int(high), step=int(q)))
        return Param(key, FloatDistribution(float(low), float(high), step=float(q)))
    if kind.endswith("_values"):  # log_uniform_values, q_log_uniform_values, inv_log_uniform_values
        if low <= 0:
            raise SweepError(f"{where}: {kind} needs min > 0 (the values themselves), got {low}.")
        bounds = (float(low), float(high))
    elif kind.startswith("inv_"):  # ln(1/X) uniform in [min, max]
        bounds = (math.exp(-high), math.exp(-low))
    else:  # ln(X) uniform in [min, max]
        bounds = (math.exp(low), math.exp(high))
    return Param(key, FloatDistribution(*bounds, log=True), q=float(q) if q is not None else None)


def _grid_param(where: str, key: str, kind: str, low: float, high: float, q: float | None) -> Param:
    from optuna.distributions import CategoricalDistribution

    if kind == "int_uniform":
        values: list[Any] = list(range(int(low), int(high) + 1))
    elif kind == "q_uniform":
        assert q is not None
        count = math.floor((high - low) / q + 1e-9) + 1
        values = [low + i * q for i in range(count)]
        values = [int(v) if all(float(x).is_integer() for x in (low, q)) else round(v, 12) for v in values]
    else:
        raise SweepError(f"{where}: a grid needs values (or int_uniform / q_uniform), not {kind}.")
    return Param(key, CategoricalDistribution(values))


def _refuse_unused_keys(where: str, spec: dict[str, Any], kind: str) -> None:
    """A key the distribution does not read (``q`` of ``uniform``, ``min`` beside ``values``) is an error,
    not ignored: the user meant something by it."""
    base = kind.removeprefix("q_")
    takes = (
        {"value"} if kind == "constant"
        else {"values"} if kind == "categorical"
        else {"mu", "sigma"} if base in ("normal", "log_normal")
        else {"a", "b"} if base == "beta"
        else {"min", "max"}
    )  # fmt: skip
    takes |= {"distribution", "q"} if kind.startswith("q_") else {"distribution"}
    unused = sorted(set(spec) - takes)
    if unused:
        raise SweepError(
            f"{where}: {unused[0]} is not read by distribution {kind} (it takes "
            f"{', '.join(sorted(takes - {'distribution'}))}); remove it or choose another distribution."
        )


def _infer(where: str, spec: dict[str, Any]) -> str:
    """W&B's distribution when none is named: value -> constant, values -> categorical, min/max by type."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        ints = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if ints else "uniform"
    raise SweepError(f"{where}: give value, values, min and max, or a distribution.")
