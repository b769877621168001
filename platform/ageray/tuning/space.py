"""Search spaces: the space file, its distributions, expressions over ``r``, and the
resolution of one trial's sampled values into a validated :class:`~ageray.config.Config`.

Space file (YAML; ``tuning/spaces/*.yaml``)::

    search:                        # every key optional; the CLI overrides any of them
      algorithm: grid              # grid | random | optuna
      num_samples: 1               # grid: repeats of the grid; random/optuna: trials
      metric: mae                  # mae | cmae | aar | mae+cmae
      metric_weight: 0.5           # MAE's weight w in mae+cmae = w*MAE + (1-w)*CMAE
      epochs: 4                    # train.stage1.epochs of every trial (null: the recipe's)
      stage2: false                # also train stage 2 in every trial
      evaluate: false              # also evaluate every trial's model on the test split
      scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or fifo
      max_concurrent: null         # null: derived from the cluster's resources
      seed: 0
    fixed:                         # config values every trial gets (like --set)
      model.proj_depth: 0
    params:                        # dotted config key -> one distribution
      data.batch_size: {grid: [16, 32, 64, 128]}
      model.fr_kernel,model.fr_stride: {grid: [[r, r/2], [r, r], [2r, r/2], [2r, r]]}
      train.stage1.optim.lr: {loguniform: [1.0e-3, 1.0]}

Distributions: ``grid`` (enumerated by grid search, sampled uniformly by random/Optuna),
``choice`` (always sampled), ``loguniform`` and ``uniform`` ``[low, high]``. A key naming
several config keys joined by commas takes tuples of values (paired values: GLAE's
(kernel, stride) pairs are not a cross product). Values of numeric config keys may be
expressions over ``r`` (``model.fr_r`` of the trial's config): ``r``, ``r/2``, ``2r``,
``2*r``.

Why every check here: a typo in a space file must fail before any trial starts, naming the
file, the key and the fix, not hours later as a silently searched default.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import operator
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from ageray.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_keys,
    get_dotted,
    set_dotted,
    to_dict,
)
from ageray.tuning.metric import MetricSpec, TuningError, parse_metric

__all__ = [
    "ALGORITHMS",
    "BINDINGS",
    "SECTIONS",
    "ParamSpec",
    "SchedulerSettings",
    "SearchSettings",
    "SearchSpace",
    "check_settings",
    "check_space_values",
    "eval_expression",
    "grid_size",
    "load_space",
    "parse_space",
    "resolve_sample",
    "trial_config",
]


#: Names an expression may use, and the config key each one reads.
BINDINGS: dict[str, str] = {"r": "model.fr_r"}
#: Config sections a search must not vary: they say where and how the search itself runs.
FORBIDDEN_PREFIXES = ("run.", "ray.", "tracking.")

_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}


def _is_numeric(tp: Any) -> bool:
    """int / float / ``int | None`` ...: values of such keys may be expressions."""
    if tp in (int, float):
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return any(a in (int, float) for a in get_args(tp))
    return False


def _check_key(key: str, known: Mapping[str, Any], where: str) -> None:
    if key in known:
        if key.startswith(FORBIDDEN_PREFIXES):
            raise TuningError(
                f"{where}: '{key}' cannot be searched or fixed by a space: run.*, ray.* and "
                "tracking.* say where the search runs; set them with --set instead"
            )
        return
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    sections = sorted({k.split(".")[0] for k in known})
    raise TuningError(
        f"{where}: unknown config key '{key}'{hint} (keys are dotted config paths such as "
        f"model.fr_kernel; sections: {', '.join(sections)})"
    )


def eval_expression(text: str, bindings: Mapping[str, float]) -> int | float:
    """Evaluate ``r/2``, ``2r``, ``2*r + 1`` ... with numbers, the names in ``bindings``,
    ``+ - * / //`` and parentheses only (no calls, no attributes: a space file is data).
    Integral results are returned as ``int`` (a kernel size of ``r/2`` is 8, not 8.0)."""
    names = "|".join(sorted(map(re.escape, bindings), key=len, reverse=True))
    src = text.strip()
    if names:  # implicit multiplication as the papers write it: 2r -> 2*r
        src = re.sub(rf"(\d)\s*(?=(?:{names})\b)", r"\1*", src)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise TuningError(f"expression {text!r} is not valid: {exc.msg}") from exc

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in bindings:
                return bindings[node.id]
            raise TuningError(
                f"expression {text!r} uses '{node.id}'; known names: "
                + ", ".join(f"{k} (= {v})" for k, v in BINDINGS.items())
            )
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div | ast.FloorDiv) and right == 0:
                raise TuningError(f"expression {text!r} divides by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise TuningError(
            f"expression {text!r}: only numbers, {', '.join(BINDINGS)}, + - * / // and "
            "parentheses are allowed"
        )

    value = ev(tree)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


SECTIONS = ("search", "fixed", "params")
KINDS = ("grid", "choice", "loguniform", "uniform")
ALGORITHMS = ("grid", "random", "optuna")


@dataclass(frozen=True)
class ParamSpec:
    """One entry of ``params``: the config key(s) and their distribution.

    ``values`` holds the discrete values (tuples when ``keys`` has several entries) as
    written in the file, expressions unresolved; ``low``/``high`` bound continuous ones.
    """

    name: str
    keys: tuple[str, ...]
    kind: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def paired(self) -> bool:
        return len(self.keys) > 1

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def tune_values(self) -> list[Any]:
        """What Tune samples: the values, or for paired keys a label per tuple (Optuna's
        categorical values must be scalars, and labels read well in trial tables)."""
        if self.paired:
            return [_label(v) for v in self.values]
        return list(self.values)

    def decode(self, sampled: Any) -> dict[str, Any]:
        """Tune's sampled value -> ``{config key: value as written}``."""
        if not self.paired:
            return {self.keys[0]: sampled}
        labels = self.tune_values()
        if sampled not in labels:
            raise TuningError(
                f"{self.name}: sampled value {sampled!r} is not one of {labels}; was the space "
                "file changed after the search started?"
            )
        return dict(zip(self.keys, self.values[labels.index(sampled)]))

    def describe(self) -> str:
        if self.discrete:
            shown = ", ".join(f"({v})" if self.paired else str(v) for v in self.tune_values())
            return f"{self.kind} [{shown}]"
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


def _label(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(_label(v) for v in value)
    return str(value)


@dataclass
class SchedulerSettings:
    """Trial scheduler: ``asha`` stops trials early at rungs ``grace_period *
    reduction_factor**k`` epochs (never at the last epoch; see :func:`asha_rungs`); ``fifo``
    runs every trial to the end."""

    name: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SearchSettings:
    """The ``search:`` section (every field overridable from the CLI)."""

    algorithm: str = "grid"
    num_samples: int = 1
    metric: str = "mae"
    metric_weight: float = 0.5
    epochs: int | None = None
    stage2: bool = False
    evaluate: bool = False
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    max_concurrent: int | None = None
    seed: int = 0
    driver_cpus: float = 0.1  # the Tune trial driver's own CPU share (Train workers have theirs)

    def metric_spec(self) -> MetricSpec:
        return parse_metric(self.metric, self.metric_weight)


@dataclass
class SearchSpace:
    """A parsed space file: distributions, fixed values and search settings."""

    params: list[ParamSpec]
    settings: SearchSettings = field(default_factory=SearchSettings)
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = "<space>"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def searched_keys(self) -> list[str]:
        return [k for p in self.params for k in p.keys]

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def label(self, sample: Mapping[str, Any]) -> str:
        """A short description of one trial's values: ``fr_kernel,fr_stride=r,r/2 lr=0.01``."""
        parts = []
        for p in self.params:
            if p.name not in sample:
                continue
            short = ",".join(k.rsplit(".", 1)[-1] for k in p.keys)
            v = sample[p.name]
            parts.append(f"{short}={v:.4g}" if isinstance(v, float) else f"{short}={v}")
        return " ".join(parts)


_SETTING_KEYS = {f.name for f in dataclasses.fields(SearchSettings)}
_SCHEDULER_KEYS = {f.name for f in dataclasses.fields(SchedulerSettings)}


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and check a space file (errors name the file, the key and the fix)."""
    p = Path(path)
    if not p.is_file():
        here = Path("tuning/spaces")
        known = sorted(x.name for x in here.glob("*.yaml")) if here.is_dir() else []
        hint = f" (shipped spaces: {', '.join(known)})" if known else ""
        raise TuningError(f"space file {str(p)!r} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise TuningError(f"space file {p}: not valid YAML: {exc}") from exc
    return parse_space(data, source=str(p))


def _reject_unknown(
    raw: Mapping[str, Any],
    known: Sequence[str],
    what: str,
    source: str,
    known_label: str = "known",
    hint: str = "",
) -> None:
    """Fail on keys of ``raw`` outside ``known``, naming them all and listing what is known:
    a typo in a space file must not be ignored and silently searched with defaults."""
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise TuningError(
            f"{source}: unknown {what}(s) {', '.join(map(repr, unknown))}; {known_label}: "
            f"{', '.join(known)}{hint}"
        )


def parse_space(data: Any, source: str = "<space>") -> SearchSpace:
    """Check a space mapping (the YAML's content) and return a :class:`SearchSpace`."""
    if not isinstance(data, Mapping):
        raise TuningError(f"{source}: the top level must be a mapping with {', '.join(SECTIONS)}")
    _reject_unknown(
        data,
        SECTIONS,
        "section",
        source,
        "known sections",
        " (distributions go under params:)",
    )
    known = config_keys()
    settings = _parse_settings(data.get("search") or {}, source)
    fixed_raw = data.get("fixed") or {}
    if not isinstance(fixed_raw, Mapping):
        raise TuningError(f"{source}: fixed: must map dotted config keys to values")
    fixed: dict[str, Any] = {}
    for key, value in fixed_raw.items():
        _check_key(str(key), known, f"{source}: fixed")
        fixed[str(key)] = value
    params_raw = data.get("params") or {}
    if not isinstance(params_raw, Mapping):
        raise TuningError(f"{source}: params: must map dotted config keys to distributions")
    params = [_parse_param(str(k), v, known, source) for k, v in params_raw.items()]
    seen: dict[str, str] = {}
    for p in params:
        for key in p.keys:
            if key in seen:
                raise TuningError(f"{source}: '{key}' appears in both '{seen[key]}' and '{p.name}'")
            if key in fixed:
                raise TuningError(f"{source}: '{key}' is both searched (params) and fixed")
            seen[key] = p.name
    if "train.stage1.epochs" in seen:
        raise TuningError(
            f"{source}: train.stage1.epochs cannot be searched: ASHA needs the same epoch "
            "budget for every trial; set search.epochs instead"
        )
    return SearchSpace(
        params=params,
        settings=settings,
        fixed=fixed,
        source=source,
        raw=json.loads(json.dumps(dict(data), default=str)),
    )


def _parse_settings(raw: Any, source: str) -> SearchSettings:
    if not isinstance(raw, Mapping):
        raise TuningError(f"{source}: search: must be a mapping of settings")
    _reject_unknown(raw, sorted(_SETTING_KEYS), "search setting", source)
    s = SearchSettings()
    for key, value in raw.items():
        if key == "scheduler":
            s.scheduler = _parse_scheduler(value, source)
        else:
            setattr(s, key, value)
    return check_settings(s, source)


def _parse_scheduler(raw: Any, source: str) -> SchedulerSettings:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise TuningError(f"{source}: search.scheduler must be asha, fifo or a mapping")
    _reject_unknown(raw, sorted(_SCHEDULER_KEYS), "scheduler setting", source)
    return SchedulerSettings(**dict(raw))


def check_settings(s: SearchSettings, source: str = "search settings") -> SearchSettings:
    """Validate and coerce settings in place (also after CLI overrides); returns ``s``."""

    def integer(name: str, value: Any, low: int, allow_none: bool = False) -> int | None:
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise TuningError(f"{source}: {name}={value!r} must be an integer >= {low}")
        if int(value) < low:
            raise TuningError(f"{source}: {name}={value!r} must be >= {low}")
        return int(value)

    if s.algorithm not in ALGORITHMS:
        raise TuningError(
            f"{source}: algorithm={s.algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    s.num_samples = integer("num_samples", s.num_samples, 1)  # type: ignore[assignment]
    s.epochs = integer("epochs", s.epochs, 1, allow_none=True)
    s.max_concurrent = integer("max_concurrent", s.max_concurrent, 1, allow_none=True)
    s.seed = integer("seed", s.seed, 0)  # type: ignore[assignment]
    for name in ("stage2", "evaluate"):
        if not isinstance(getattr(s, name), bool):
            raise TuningError(f"{source}: {name}={getattr(s, name)!r} must be true or false")
    parse_metric(s.metric, s.metric_weight)
    s.metric_weight = float(s.metric_weight)
    if not isinstance(s.driver_cpus, int | float) or not 0 <= s.driver_cpus <= 64:
        raise TuningError(f"{source}: driver_cpus={s.driver_cpus!r} must be a number >= 0")
    sch = s.scheduler
    if sch.name not in ("asha", "fifo"):
        raise TuningError(f"{source}: scheduler name={sch.name!r} is not asha or fifo")
    sch.grace_period = integer("scheduler.grace_period", sch.grace_period, 1)  # type: ignore
    if not isinstance(sch.reduction_factor, int | float) or sch.reduction_factor <= 1:
        raise TuningError(
            f"{source}: scheduler.reduction_factor={sch.reduction_factor!r} must be > 1"
        )
    sch.reduction_factor = float(sch.reduction_factor)
    return s


def _parse_param(name: str, spec: Any, known: Mapping[str, Any], source: str) -> ParamSpec:
    where = f"{source}: params.{name}"
    keys = tuple(k.strip() for k in name.split(",") if k.strip())
    if not keys:
        raise TuningError(f"{where}: empty key")
    for key in keys:
        _check_key(key, known, where)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise TuningError(
            f"{where}: give exactly one distribution, e.g. {{grid: [16, 32]}}, "
            f"{{loguniform: [1.0e-4, 1.0e-1]}}; known: {', '.join(KINDS)}"
        )
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        raise TuningError(f"{where}: unknown distribution {kind!r}; known: {', '.join(KINDS)}")
    numeric = [_is_numeric(known[k]) for k in keys]
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise TuningError(f"{where}: {kind} needs a non-empty list of values")
        values: list[Any] = []
        for i, v in enumerate(arg):
            if len(keys) > 1:
                if not isinstance(v, list | tuple) or len(v) != len(keys):
                    raise TuningError(
                        f"{where}: value #{i + 1} {v!r} must be a list of {len(keys)} values "
                        f"(one per key: {', '.join(keys)})"
                    )
                values.append(tuple(_check_value(x, num, where) for x, num in zip(v, numeric)))
            else:
                values.append(_check_value(v, numeric[0], where))
        labels = [_label(v) for v in values]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise TuningError(f"{where}: duplicate value(s) {dupes}")
        return ParamSpec(name, keys, kind, tuple(values))
    # continuous
    if len(keys) > 1:
        raise TuningError(f"{where}: paired keys need grid or choice of tuples, not {kind}")
    if not numeric[0]:
        raise TuningError(f"{where}: {kind} needs a numeric config key; {keys[0]} is not")
    if not isinstance(arg, list) or len(arg) != 2:
        raise TuningError(f"{where}: {kind} needs [low, high]")
    try:
        low, high = (float(x) for x in arg)
    except (TypeError, ValueError) as exc:
        raise TuningError(f"{where}: {kind} bounds {arg!r} must be numbers") from exc
    if not low < high:
        raise TuningError(f"{where}: {kind} needs low < high, got {arg!r}")
    if kind == "loguniform" and low <= 0:
        raise TuningError(f"{where}: loguniform needs low > 0, got {low:g}")
    return ParamSpec(name, keys, kind, (), low, high)


def _check_value(value: Any, numeric: bool, where: str) -> Any:
    """Numbers stay; on numeric keys a string is either a number YAML left as text
    (``1e-3``) or an expression (checked now, resolved per trial)."""
    if numeric and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            eval_expression(value, {k: 16 for k in BINDINGS})  # syntax and names only
        except TuningError as exc:
            raise TuningError(f"{where}: {exc}") from exc
        return value
    if isinstance(value, Mapping):
        raise TuningError(f"{where}: value {value!r} is a mapping; use a scalar or a list")
    return value


def grid_size(space: SearchSpace, algorithm: str | None = None) -> int:
    """Number of trials the search will run (grid points x num_samples, or num_samples)."""
    algorithm = algorithm or space.settings.algorithm
    n = space.settings.num_samples
    if algorithm == "grid":
        for p in space.params:
            if p.kind == "grid":
                n *= len(p.values)
    return n


def resolve_sample(
    space: SearchSpace, sample: Mapping[str, Any], base: Mapping[str, Any]
) -> dict[str, Any]:
    """One trial's sampled values -> ``{dotted config key: concrete value}``.

    Expressions are evaluated against the trial's own config (``r`` is ``model.fr_r``
    after the trial's other values are applied, so a space may search ``model.fr_r`` too).
    """
    raw: dict[str, Any] = {}
    for p in space.params:
        if p.name not in sample:
            raise TuningError(
                f"trial values {dict(sample)} lack '{p.name}'; was the space file changed "
                "after the search started?"
            )
        raw.update(p.decode(sample[p.name]))
    merged = copy.deepcopy(dict(base))
    for key, value in raw.items():
        if not isinstance(value, str):
            set_dotted(merged, key, value)
    bindings = {}
    for name, key in BINDINGS.items():
        v = get_dotted(merged, key)
        if isinstance(v, str):
            v = eval_expression(v, {})
        bindings[name] = v if v is not None else get_dotted(to_dict(Config()), key)
    known = config_keys()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and _is_numeric(known[key]):
            value = eval_expression(value, bindings)
        if isinstance(value, float) and known[key] is int and value.is_integer():
            value = int(value)
        out[key] = value
    return out


def trial_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Config:
    """The validated Config of a trial: ``base`` (nested dict) with dotted ``overrides``."""
    data = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_dotted(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
        raise TuningError(f"trial values {shown} give an invalid config: {exc}") from exc


def check_space_values(space: SearchSpace, base: Mapping[str, Any]) -> None:
    """Build the config of every discrete value of every parameter (the others at the
    base's values) so a typo in a space fails before any trial starts."""
    for p in space.params:
        if not p.discrete:
            continue
        for v in p.tune_values():
            sample = {q.name: q.tune_values()[0] if q.discrete else q.low for q in space.params}
            sample[p.name] = v
            try:
                trial_config(base, resolve_sample(space, sample, base))
            except TuningError as exc:
                raise TuningError(f"{space.source}: params.{p.name} value {v!r}: {exc}") from exc
