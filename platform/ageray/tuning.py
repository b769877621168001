"""Hyperparameter search with Ray Tune: search spaces, the metric a search optimises, how
many trials fit the cluster, the trial driver, and the search's results (a GLAE Table III /
IV style table, plots and the best configuration as a recipe).

Why one module with two halves: the rules (space files, the derived metric, the concurrency
rule, the results table, the best recipe) are plain Python and unit-tested without Ray; the
Ray half (the Tune trial driver, the report callback, the search loop) imports Ray lazily,
inside functions, so ``import ageray.tuning`` stays cheap and Ray-free.

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

Metric: every Tune report carries the stage-1 validation metrics of one epoch (``val_mae``,
``val_cmae``, ``val_aar``); ``mae+cmae`` adds the derived ``val_mae_cmae``. The derived value
and the epoch counter ``tune_epoch`` are added on the Ray Train controller by
:class:`TrialReportCallback` (a ``TuneReportCallback`` that enriches each report before Tune
sees it), so the worker loop stays search-agnostic.
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import difflib
import json
import math
import operator
import os
import re
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from ageray.config import Config, ConfigError, config_from_dict, dump_yaml, flatten, to_dict

__all__ = [
    "ALGORITHMS",
    "BINDINGS",
    "METRICS",
    "SECTIONS",
    "MetricSpec",
    "ParamSpec",
    "SchedulerSettings",
    "SearchOptions",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "Table",
    "TrialContext",
    "TrialRecord",
    "TuningError",
    "asha_rungs",
    "best_recipe",
    "best_record",
    "build_table",
    "config_keys",
    "enrich_report",
    "eval_expression",
    "grid_size",
    "load_space",
    "max_concurrent_trials",
    "parse_metric",
    "parse_space",
    "plot_curves",
    "plot_metric_vs_params",
    "release_orphaned_placement_groups",
    "replay_asha",
    "resolve_sample",
    "run_search",
    "set_dotted",
    "trial_config",
    "trial_driver",
    "trial_resources",
    "write_best_recipe",
    "write_csv",
]


class TuningError(ValueError):
    """A search space, metric or search setting is invalid; the message names it and the fix."""


# ======================================================================================
# Metric
# ======================================================================================

#: Short metric names -> (key in the per-epoch reports, optimisation mode).
METRICS: dict[str, tuple[str, str]] = {
    "mae": ("val_mae", "min"),
    "cmae": ("val_cmae", "min"),
    "aar": ("val_aar", "max"),
    "mae+cmae": ("val_mae_cmae", "min"),
}
DERIVED_KEY = "val_mae_cmae"
EPOCH_KEY = "tune_epoch"  # 1-based count of stage-1 epochs done; ASHA's time attribute
FINAL_KEY = "tune_final"  # 1 on the trial's last report (after stage 2 / evaluation)


@dataclass(frozen=True)
class MetricSpec:
    """The quantity a search optimises.

    ``name`` is one of :data:`METRICS`. ``mae+cmae`` is ``weight * MAE + (1 - weight) *
    CMAE`` of the same epoch: GLAE reports both and trades one for the other (Table III),
    so a search may want a point between the two.
    """

    name: str = "mae"
    weight: float = 0.5

    @property
    def key(self) -> str:
        """The metric's name in Tune results and MLflow."""
        return METRICS[self.name][0]

    @property
    def mode(self) -> str:
        return METRICS[self.name][1]

    @property
    def derived(self) -> bool:
        return self.name == "mae+cmae"

    @property
    def label(self) -> str:
        """Human-readable, for tables and plots."""
        if self.derived:
            return f"{self.weight:g}*MAE + {1 - self.weight:g}*CMAE"
        return {"mae": "MAE", "cmae": "CMAE", "aar": "AAR"}[self.name]

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """The metric from one report (None when it cannot be computed from it)."""
        if self.derived:
            mae, cmae = _num(metrics.get("val_mae")), _num(metrics.get("val_cmae"))
            if mae is None or cmae is None:
                return _num(metrics.get(self.key))
            return self.weight * mae + (1.0 - self.weight) * cmae
        return _num(metrics.get(self.key))

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` beats ``b``."""
        return a < b if self.mode == "min" else a > b


def parse_metric(name: str, weight: float | None = None) -> MetricSpec:
    """``mae``, ``cmae``, ``aar``, ``mae+cmae`` (also ``val_mae`` ...) -> MetricSpec."""
    text = str(name).strip().lower().replace(" ", "")
    aliases = {v[0]: k for k, v in METRICS.items()}
    aliases.update({"cmae+mae": "mae+cmae", "val_mae+cmae": "mae+cmae"})
    text = aliases.get(text, text)
    if text not in METRICS:
        raise TuningError(
            f"metric {name!r} is not one of {', '.join(METRICS)} (val MAE, CMAE, AAR, or the "
            "weighted sum of MAE and CMAE; set the weight with --metric-weight)"
        )
    w = 0.5 if weight is None else float(weight)
    if not 0.0 <= w <= 1.0 or math.isnan(w):
        raise TuningError(f"metric_weight={weight!r} must be in [0, 1] (MAE's share in mae+cmae)")
    return MetricSpec(text, w)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def enrich_report(
    metrics: Mapping[str, Any], spec: MetricSpec, constants: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One stage-1 report as Tune should see it: ``tune_epoch`` (1-based, from the loop's
    0-based ``epoch``), the derived metric when the search optimises one, and per-trial
    constants (the parameter count)."""
    out = dict(metrics)
    epoch = _num(out.get("epoch"))
    if epoch is not None:
        out[EPOCH_KEY] = int(epoch) + 1
    if spec.derived:
        value = spec.value(out)
        if value is not None:
            out[spec.key] = value
    out.update(constants or {})
    return out


# ======================================================================================
# Config keys and expressions
# ======================================================================================

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


def config_keys() -> dict[str, Any]:
    """Every leaf config key (``model.fr_kernel`` ...) -> its annotated type."""
    out: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
            else:
                out[key] = tp

    walk(Config, "")
    return out


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


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "model.fr_kernel", 16)`` on a nested config dict."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


def get_dotted(data: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# ======================================================================================
# Space files
# ======================================================================================

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
        data, SECTIONS, "section", source, "known sections", " (distributions go under params:)"
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


# ======================================================================================
# Concurrency
# ======================================================================================


def trial_resources(ray_cfg: Any, driver_cpus: float = 0.1) -> dict[str, float]:
    """What one trial holds while it runs: its Train workers (``num_workers`` x
    ``cpus_per_worker``, and GPUs when ``use_gpu``) plus its Tune driver function's own small
    CPU share (the function only waits on Train's controller, so 0.1 CPU is plenty and does
    not starve a 2-core machine)."""
    need = {"CPU": ray_cfg.num_workers * float(ray_cfg.cpus_per_worker) + float(driver_cpus)}
    if ray_cfg.use_gpu:
        need["GPU"] = ray_cfg.num_workers * float(ray_cfg.gpus_per_worker)
    return need


def max_concurrent_trials(
    cluster: Mapping[str, float],
    need: Mapping[str, float],
    *,
    override: int | None = None,
    autoscaling: bool = False,
) -> tuple[int, str]:
    """How many trials run at once: ``min over resources of floor(cluster / need)``.

    Tune only reserves the drivers' CPU share; Train reserves the workers later. Without this
    limit Tune would start every trial's driver at once and their worker groups would queue
    for resources (and time out). Returns ``(n, why)``. With nothing fitting, a fixed
    cluster is an error; a cluster that autoscales (``autoscaling=True``) runs one trial at a
    time and lets the autoscaler add nodes. ``override`` wins (e.g. the autoscaler's maximum).
    """
    parts = []
    n = None
    for res, amount in need.items():
        if amount <= 0:
            continue
        have = float(cluster.get(res, 0.0))
        fit = math.floor(have / amount + 1e-9)
        parts.append(f"{res}: {have:g} / {amount:g} per trial = {fit}")
        n = fit if n is None else min(n, fit)
    n = 1 if n is None else n
    why = "; ".join(parts) or "trials need no resources"
    if override is not None:
        if override < 1:
            raise TuningError(f"max_concurrent={override} must be at least 1")
        return override, f"{override} (set explicitly; cluster would fit {n}: {why})"
    if n >= 1:
        return n, f"{n} ({why})"
    if autoscaling:
        return 1, f"1 (the cluster fits none now: {why}; waiting for the autoscaler)"
    raise TuningError(
        f"one trial needs {dict(need)} but the cluster has {dict(cluster)} ({why}): lower "
        "ray.num_workers / ray.cpus_per_worker (or ray.use_gpu) with --set, or run on a "
        "bigger cluster"
    )


def asha_rungs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs at which ASHA compares trials: ``grace * rf**k`` strictly below ``epochs``.

    Why not at the last epoch: a cut there saves nothing, and Tune stops a trial by ending
    its actor, which would kill the trial's driver before it hands over its result (stage 2,
    evaluation, MLflow). So ASHA gets ``max_t = epochs - 1`` and ``stop_last_trials=False``.
    """
    max_t = epochs - 1
    if max_t < grace_period:
        return []
    # Ray's _Bracket: int(log(max_t / grace) / log(rf) + 1) rungs at grace * rf**k.
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [round(grace_period * reduction_factor**k) for k in range(count)]


# ======================================================================================
# Results
# ======================================================================================


@dataclass
class TrialRecord:
    """One trial as the search saw it: Tune's status, its sampled values and every report."""

    trial_id: str
    tune_status: str  # TERMINATED | ERROR | PENDING | RUNNING | PAUSED
    config: dict[str, Any]  # Tune's sampled values, keyed by the space's param names
    rows: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # resolved dotted-key values
    failures: int = 0
    error: str | None = None
    run_id: str | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The per-epoch stage-1 reports (not the closing one)."""
        return [r for r in self.rows if not r.get(FINAL_KEY) and _num(r.get(EPOCH_KEY))]

    @property
    def final(self) -> dict[str, Any] | None:
        for r in reversed(self.rows):
            if r.get(FINAL_KEY):
                return r
        return None

    @property
    def epochs_run(self) -> int:
        epochs = [int(r[EPOCH_KEY]) for r in self.history]
        if self.final and _num(self.final.get(EPOCH_KEY)):
            epochs.append(int(self.final[EPOCH_KEY]))
        return max(epochs, default=0)

    @property
    def num_params(self) -> int | None:
        for r in reversed(self.rows):
            v = _num(r.get("num_params"))
            if v is not None:
                return int(v)
        return None

    def status(self, epochs: int) -> str:
        """``completed``, ``stopped`` (early, by ASHA), ``failed`` or ``unfinished``."""
        if self.tune_status == "ERROR":
            return "failed"
        if self.tune_status != "TERMINATED":
            return "unfinished"
        if self.final is not None:
            return "completed"
        return "stopped" if self.epochs_run < epochs else "completed"

    def best_row(self, spec: MetricSpec) -> dict[str, Any] | None:
        """The epoch whose metric is best (the final report when there are no epochs)."""
        best, best_v = None, None
        for r in self.history or ([self.final] if self.final else []):
            v = spec.value(r)
            if v is not None and (best_v is None or spec.better(v, best_v)):
                best, best_v = r, v
        return best

    def best_value(self, spec: MetricSpec) -> float | None:
        row = self.best_row(spec)
        return spec.value(row) if row is not None else None


def best_record(records: Sequence[TrialRecord], spec: MetricSpec) -> TrialRecord | None:
    """The trial with the best metric at its best epoch (failed trials never win)."""
    best, best_v = None, None
    for rec in records:
        if rec.tune_status == "ERROR":
            continue
        v = rec.best_value(spec)
        if v is not None and (best_v is None or spec.better(v, best_v)):
            best, best_v = rec, v
    return best


@dataclass
class Column:
    key: str
    header: str
    kind: str = "text"  # text | metric | params | int


@dataclass
class Table:
    """Rows of plain values; ``columns`` say how to show them."""

    columns: list[Column]
    rows: list[dict[str, Any]]
    best_trial: str | None = None
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table; the best value of each metric column in bold
        (as GLAE's tables)."""
        best: dict[str, float] = {}
        for c in self.columns:
            if c.kind != "metric":
                continue
            vals = [r[c.key] for r in self.rows if _num(r.get(c.key)) is not None]
            if vals:
                best[c.key] = max(vals) if c.key.endswith("aar") else min(vals)
        lines = []
        if self.title:
            lines += [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(c.header for c in self.columns) + " |")
        lines.append(
            "| " + " | ".join("---:" if c.kind != "text" else "---" for c in self.columns) + " |"
        )
        for r in self.rows:
            cells = []
            for c in self.columns:
                text = _fmt(r.get(c.key), c.kind)
                if c.key in best and _num(r.get(c.key)) == best[c.key]:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "metric" and _num(value) is not None:
        return f"{float(value):.3f}"
    if kind == "params" and _num(value) is not None:
        return f"{float(value) / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_table(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    epochs: int,
    bindings: Mapping[str, Any] | None = None,
) -> Table:
    """GLAE Table III / IV style: the searched values -> MAE, CMAE (at each trial's best
    epoch by the search metric), parameter count, epochs run, status.

    Paired parameters written as expressions get a label column (``(r, r/2)``) beside the
    concrete values, and the bindings they used (``r``) a column of their own, as Table III
    shows r, kernel size and stride.
    """
    cols: list[Column] = [Column("trial", "trial")]
    used_bindings: list[str] = []
    for p in space.params:
        has_expr = p.discrete and any(
            isinstance(x, str) for v in p.values for x in (v if p.paired else (v,))
        )
        if p.paired and has_expr:
            short = ", ".join(k.rsplit(".", 1)[-1] for k in p.keys)
            cols.append(Column(f"label:{p.name}", f"({short})"))
        if has_expr:
            for name in BINDINGS:
                if name not in used_bindings:
                    used_bindings.append(name)
        for k in p.keys:
            cols.append(Column(k, k.rsplit(".", 1)[-1], "text"))
    bind_cols = [Column(f"bind:{n}", n) for n in used_bindings]
    cols = cols[:1] + bind_cols + cols[1:]
    cols += [Column("val_mae", "MAE", "metric"), Column("val_cmae", "CMAE", "metric")]
    if spec.name == "aar":
        cols.append(Column("val_aar", "AAR", "metric"))
    if spec.derived:
        cols.append(Column(spec.key, spec.label, "metric"))
    # Stage 2 and the test evaluation (when the search ran them): the routed answer, as
    # GLAE reports it; the CSV and summary.json carry the same columns.
    # (A model without a balanced head has no routed answer: then its vanilla one.)
    finals = [rec.final for rec in records if rec.final]
    extra_keys = []
    for prefix in ("stage2_val", "test"):
        for row in ("routed", "vanilla"):
            keys = [f"{prefix}_{row}_mae", f"{prefix}_{row}_cmae"]
            if any(keys[0] in f for f in finals):
                extra_keys += keys
                break
    cols += [Column(k, k, "metric") for k in extra_keys]
    cols += [
        Column("num_params", "params", "params"),
        Column("epochs_run", f"epochs (of {epochs})", "int"),
        Column("status", "status"),
    ]
    best = best_record(records, spec)
    rows = []
    for rec in records:
        row: dict[str, Any] = {"trial": rec.trial_id, "trial_id": rec.trial_id}
        for p in space.params:
            if p.name in rec.config:
                row[f"label:{p.name}"] = "(" + str(rec.config[p.name]).replace(",", ", ") + ")"
        for n in used_bindings:
            row[f"bind:{n}"] = (bindings or {}).get(n)
        row.update(rec.overrides)
        b = rec.best_row(spec)
        if b is not None:
            for k in ("val_mae", "val_cmae", "val_aar"):
                row[k] = _num(b.get(k))
            row[spec.key] = spec.value(b)
            row["best_epoch"] = int(b[EPOCH_KEY]) if _num(b.get(EPOCH_KEY)) else None
        if rec.final:
            for k in extra_keys:
                row[k] = _num(rec.final.get(k))
        row["num_params"] = rec.num_params
        row["epochs_run"] = rec.epochs_run
        row["status"] = rec.status(epochs)
        row["failures"] = rec.failures
        row["error"] = rec.error
        row["run_id"] = rec.run_id
        if best is not None and rec.trial_id == best.trial_id:
            row["trial"] = f"{rec.trial_id} (best)"
        rows.append(row)
    return Table(cols, rows, best.trial_id if best else None)


def write_csv(path: str | os.PathLike[str], table: Table) -> Path:
    """Every column of ``table`` plus raw extras (best epoch, failures, error, MLflow run)."""
    keys = [c.key for c in table.columns if c.key != "trial"]
    keys = ["trial_id", *keys, "best_epoch", "failures", "error", "run_id"]
    seen: list[str] = []
    for k in keys:
        if k not in seen:
            seen.append(k)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([k.replace("label:", "label_").replace("bind:", "") for k in seen])
        for r in table.rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in seen])
    return out


def plot_metric_vs_params(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    epochs: int,
    path: str | os.PathLike[str],
) -> Path:
    """One panel per searched parameter: each trial's best metric against its value
    (categorical axis for discrete values, log axis for log-uniform ones); early-stopped
    trials are drawn hollow, so a reader sees what ASHA cut."""
    from ageray.report import pyplot, save_figure

    plt = pyplot()

    params = space.params or [ParamSpec("(none)", ("(none)",), "choice", ("-",))]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs, ys, hollow = [], [], []
        ticks = p.tune_values() if p.discrete else None
        for rec in records:
            v = rec.best_value(spec)
            if v is None or p.name not in rec.config:
                continue
            x = rec.config[p.name]
            xs.append(ticks.index(x) if ticks is not None and x in ticks else float(x))
            ys.append(v)
            hollow.append(rec.status(epochs) != "completed")
        for h, style in ((False, {"color": "C0"}), (True, {"facecolors": "none", "color": "C3"})):
            pts = [(x, y) for x, y, hh in zip(xs, ys, hollow) if hh == h]
            if pts:
                label = "stopped early" if h else "completed"
                ax.scatter([a for a, _ in pts], [b for _, b in pts], label=label, **style)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels([str(t) for t in ticks], rotation=30 if len(ticks) > 4 else 0)
        elif p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.name.replace(",", ",\n"))
        ax.set_ylabel(f"val {spec.label} ({spec.mode})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{spec.label} at each trial's best epoch")
    return save_figure(fig, path)


def plot_curves(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    path: str | os.PathLike[str],
) -> Path:
    """The metric per epoch, one line per trial: where ASHA cut trials is visible."""
    from ageray.report import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for rec in records:
        pts = [(int(r[EPOCH_KEY]), spec.value(r)) for r in rec.history]
        pts = [(e, v) for e, v in pts if v is not None]
        if not pts:
            continue
        ax.plot(*zip(*sorted(pts)), marker="o", label=space.label(rec.config) or rec.trial_id)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {spec.label}")
    ax.grid(alpha=0.3)
    if len(records) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def best_recipe(base: Mapping[str, Any], overrides: Mapping[str, Any], name: str) -> Config:
    """The search's base config (recipe + space ``fixed`` + ``--set``, paths as the user
    wrote them) with the best trial's values, named ``name``: what ``jobs.train`` should
    train next."""
    data = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_dotted(data, key, value)
    set_dotted(data, "run.name", name)
    return config_from_dict(data)


def write_best_recipe(path: str | os.PathLike[str], cfg: Config, header: Sequence[str]) -> Path:
    """``dump_yaml`` of ``cfg`` below ``# header`` lines; ``load_config`` reads it back."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header) + dump_yaml(cfg)
    out.write_text(text)
    return out


# ======================================================================================
# Ray half: the trial driver and its callbacks
# ======================================================================================


@dataclass
class TrialContext:
    """What every trial driver gets besides its sampled values (plain data)."""

    search: str  # the search's name
    base: dict[str, Any]  # runtime base config (absolute paths), nested dict
    space: dict[str, Any]  # the space file's content
    metric: str
    metric_weight: float
    tracking_uri: str | None
    parent_run_id: str | None
    stage2: bool = False
    evaluate: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_model_parameters(cfg: Config) -> int:
    """Parameters of the trial's model, built on the meta device (no memory, no weights):
    also checks its shapes before any worker starts (an FR kernel larger than the map fails
    here, in a second, not after Train has started)."""
    import torch

    from ageray.model import build_model, count_parameters

    cfg_meta = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    with torch.device("meta"):
        model = build_model(cfg_meta)
    return count_parameters(model)


def _trial_tags(search: str, trial_id: str) -> dict[str, str]:
    return {"ageray.search": search, "ageray.trial_id": trial_id, "ageray.kind": "tune-trial"}


def _tag_query(tags: Mapping[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def _open_trial_run(tracker: Any, ctx: TrialContext, trial_id: str, params: Mapping[str, Any]):
    """The trial's child run under the search's parent run; found again by tags when Tune
    retries the trial or a resumed search restarts it, so a trial has exactly one run."""
    if not tracker.enabled:
        return None
    from ageray.tracking import TAG_PIPELINE, TAG_STAGE

    tags = _trial_tags(ctx.search, trial_id)
    found = tracker.client.search_runs([tracker.experiment_id], _tag_query(tags), max_results=1)
    if found:
        run_id = found[0].info.run_id
        attempts = int(found[0].data.tags.get("ageray.tune.attempts", "1")) + 1
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.set_tags(run_id, {"ageray.tune.attempts": attempts})
        return run_id
    all_tags = {
        **tags,
        TAG_PIPELINE: tracker.cfg.run.name,
        TAG_STAGE: "trial",
        "ageray.tune.attempts": "1",
    }
    if ctx.parent_run_id:
        all_tags["mlflow.parentRunId"] = ctx.parent_run_id
    run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"{ctx.search}/{trial_id}", tags=all_tags
    )
    run_id = run.info.run_id
    tracker.log_config(run_id, extra=dict(params))
    return run_id


def trial_driver(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: build the trial's config, train stage 1 through Ray Train (every
    epoch's report reaches Tune through :class:`TrialReportCallback`, so ASHA can stop it),
    optionally stage 2 and the test evaluation, then one closing report.

    This is Ray's driver-function pattern: the function holds a sliver of CPU and waits on
    the ``TorchTrainer`` it builds (``run_stage_on_ray``); the workers hold the resources.
    ``run.name`` is ``<search>/<trial id>``, stable across Tune's retry and a resumed
    search, so a restarted trial resumes from its last Train checkpoint.
    """
    from ray import tune

    from ageray.evaluation import evaluate_for_config
    from ageray.tracking import Tracker
    from ageray.training.driver import local_run_dir, run_stage_on_ray

    c = TrialContext(**ctx)
    space = parse_space(c.space, source=f"search {c.search}")
    spec = parse_metric(c.metric, c.metric_weight)
    trial_id = tune.get_context().get_trial_id()
    overrides = resolve_sample(space, config, c.base)
    invalid: TuningError | None = None
    try:
        cfg = trial_config(c.base, overrides)
    except TuningError as exc:  # reported through the trial's MLflow run, then raised
        cfg, invalid = config_from_dict(c.base), exc
    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"{c.search}/{trial_id}"),
        tracking=dataclasses.replace(cfg.tracking, uri=c.tracking_uri),
    )
    epochs = cfg.train.stage1.epochs
    tracker = Tracker(cfg, enabled=bool(c.tracking_uri))
    params = {f"tune.{k}": v for k, v in overrides.items()}
    params.update({"tune.trial_id": trial_id, "tune.label": space.label(config)})
    run_id = _open_trial_run(tracker, c, trial_id, params)
    uri = tracker.uri if tracker.enabled else None
    try:
        if invalid is not None:
            raise invalid
        num_params = count_model_parameters(cfg)
        tracker.log_metrics(run_id, {"num_params": num_params})
        callback = _lazy("TrialReportCallback")(
            metric=spec.name,
            weight=spec.weight,
            constants={"num_params": num_params},
            tracking_uri=uri,
            run_id=run_id,
        )
        r1 = run_stage_on_ray(
            cfg,
            "stage1",
            tracking_uri=uri,
            mlflow_run_id=run_id,
            init_backbone=cfg.train.init_from,
            callbacks=[callback],
        )
        final: dict[str, Any] = {
            FINAL_KEY: 1,
            EPOCH_KEY: epochs,
            "num_params": num_params,
            **{k: v for k, v in r1.metrics.items() if k.startswith("val_")},
        }
        objective = spec.value(r1.metrics)
        if objective is not None:
            final[spec.key] = objective
        tracker.log_metrics(run_id, {f"best_{k}": v for k, v in r1.metrics.items()})
        model_dir = r1.model_dir
        if c.stage2:
            tracker.parent_id = run_id
            with tracker.stage("stage2") as rid2:
                r2 = run_stage_on_ray(
                    cfg,
                    "stage2",
                    tracking_uri=uri,
                    mlflow_run_id=rid2,
                    init_model=str(r1.model_dir),
                    mae_ref=r1.metrics.get("val_mae"),
                )
            model_dir = r2.model_dir
            stage2 = {f"stage2_{k}": v for k, v in r2.metrics.items() if k.startswith("val_")}
            final.update(stage2)
            tracker.log_metrics(run_id, stage2)
        if c.evaluate:
            out = local_run_dir(cfg) / "eval"
            report = evaluate_for_config(model_dir, cfg, out)
            test = {
                k: v
                for k, v in report["flat_metrics"].items()
                if re.fullmatch(r"test_[a-z_]+?_(mae|cmae|aar)", k)
            }
            final.update(test)
            tracker.log_metrics(run_id, report["flat_metrics"])
            tracker.log_artifact(run_id, out, "evaluation")
        tracker.log_metrics(run_id, {"epochs_run": epochs})
        tracker.set_tags(run_id, {"ageray.tune.outcome": "completed"})
        tracker.end(run_id, "FINISHED")
    except Exception as exc:
        tracker.set_tags(
            run_id, {"ageray.tune.outcome": "failed", "ageray.tune.error": _short_error(exc)}
        )
        tracker.end(run_id, "FAILED")
        raise
    tune.report(final)


def _short_error(exc: BaseException | str | None, limit: int = 300) -> str:
    if exc is None:
        return ""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    # Ray wraps errors in long tracebacks; the last line names the real cause.
    picked = next(
        (ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]+(Error|Exception)", ln)),
        lines[-1] if lines else "",
    )
    return picked[:limit]


def release_orphaned_placement_groups() -> list[str]:
    """Remove this job's placement groups whose creating actor is dead; return their ids.

    Why: Tune stops a trial (ASHA's early stop, an interrupted search) by ending its actor;
    the Ray Train controller that actor created dies with it, but the controller's placement
    group belongs to the job and outlives it. Train V2 has a watcher for this, which asks
    the dashboard's state API; where that API is unavailable (a local Ray started without the
    dashboard, or several Ray instances on one machine) the reserved CPUs leak and the next
    trial's workers wait for them forever. This reads the GCS placement-group table (a Ray
    internal, guarded) and removes exactly those groups: created by an actor of this job,
    that actor dead, not detached.
    """
    import ray

    if not ray.is_initialized():
        return []
    try:
        from ray._private.state import state as global_state
        from ray._raylet import ActorID, PlacementGroupID
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        table = global_state._connect_and_get_accessor().get_placement_group_table()
    except (ImportError, AttributeError, RuntimeError) as exc:
        _warn_once(f"cannot inspect placement groups ({exc}); stopped trials may hold CPUs")
        return []
    removed = []
    for raw in table:
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if info.state == gcs_pb2.PlacementGroupTableData.REMOVED or info.is_detached:
            continue
        if not info.creator_actor_dead or ActorID(info.creator_actor_id).is_nil():
            continue
        if info.creator_job_id.hex() != job:
            continue
        pg_id = PlacementGroupID(info.placement_group_id)
        try:
            remove_placement_group(PlacementGroup(pg_id))
        except Exception as exc:  # already removed by Train's own watcher: nothing to do
            _warn_once(f"placement group {pg_id.hex()} could not be removed: {exc}")
            continue
        removed.append(pg_id.hex())
    return removed


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"[tune] warning: {message}", flush=True)


def _build_trial_report_callback() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        """Forward each epoch's Train report to Tune with ``tune_epoch``, the derived metric
        and the trial's constants added (:func:`enrich_report`); log the derived metric to
        the trial's MLflow run per epoch, beside the worker's own metrics.

        Runs on the Ray Train controller (the trial's driver side), once per report: the
        workers' loop stays search-agnostic and the weight stays a search setting.
        """

        def __init__(
            self,
            metric: str,
            weight: float,
            constants: Mapping[str, Any] | None = None,
            tracking_uri: str | None = None,
            run_id: str | None = None,
        ) -> None:
            super().__init__()
            self.metric = metric
            self.weight = weight
            self.constants = dict(constants or {})
            self.tracking_uri = tracking_uri
            self.run_id = run_id

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            spec = parse_metric(self.metric, self.weight)
            rows = [dict(m) for m in metrics] or [{}]
            rows[0] = enrich_report(rows[0], spec, self.constants)
            if spec.derived and spec.key in rows[0] and self.run_id:
                from ageray.tracking import RunLogger

                step = int(rows[0].get(EPOCH_KEY, 1)) - 1
                RunLogger(self.tracking_uri, self.run_id).log_metrics(
                    {spec.key: rows[0][spec.key]}, step=step
                )
            super().after_report(run_context, rows, checkpoint)

    return TrialReportCallback


def _build_search_monitor() -> type:
    from ray import tune

    class SearchMonitor(tune.Callback):
        """Progress a person can follow (one line per epoch and per trial event) and the
        placement-group janitor (:func:`release_orphaned_placement_groups`)."""

        def __init__(
            self,
            space: dict[str, Any],
            metric: str,
            weight: float,
            epochs: int,
            total: int,
            max_failures: int = 1,
        ) -> None:
            self.space_raw = space
            self.metric = metric
            self.weight = weight
            self.epochs = epochs
            self.total = total
            self.max_failures = max_failures
            self.t0 = time.time()
            self.best: tuple[float, str] | None = None
            self.last_sweep = 0.0
            self.ended: dict[str, str] = {}
            self.epochs_seen: dict[str, int] = {}

        def seed(self, records: Sequence[TrialRecord]) -> None:
            """Count a resumed search's ended trials and best value."""
            spec = parse_metric(self.metric, self.weight)
            for rec in records:
                status = rec.status(self.epochs)
                if status != "unfinished":
                    self.ended[rec.trial_id] = status
                v = rec.best_value(spec)
                if v is not None and (self.best is None or spec.better(v, self.best[0])):
                    self.best = (v, rec.trial_id)

        def _space(self) -> SearchSpace:
            return parse_space(self.space_raw, source="search")

        def _say(self, text: str) -> None:
            m, s = divmod(int(time.time() - self.t0), 60)
            print(f"[tune {m:d}m{s:02d}s] {text}", flush=True)

        def _sweep(self, force: bool = False) -> None:
            if not force and time.time() - self.last_sweep < 2.0:
                return
            self.last_sweep = time.time()
            for pg in release_orphaned_placement_groups():
                self._say(f"released placement group {pg[:12]} left by a stopped trial")

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._sweep()

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info):
            running = sum(1 for t in trials if t.status == "RUNNING")
            self._say(
                f"trial {trial.trial_id} started: {self._space().label(trial.config)} "
                f"({len(self.ended)}/{self.total} done, {running} running)"
            )

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result, **info):
            spec = parse_metric(self.metric, self.weight)
            value = spec.value(result)
            if result.get(FINAL_KEY) or value is None:
                return
            epoch = int(result.get(EPOCH_KEY, 0))
            self.epochs_seen[trial.trial_id] = epoch
            if self.best is None or spec.better(value, self.best[0]):
                self.best = (value, trial.trial_id)
            extra = " ".join(
                f"{k} {result[k]:.3f}"
                for k in ("val_mae", "val_cmae")
                if k != spec.key and _num(result.get(k)) is not None
            )
            self._say(
                f"trial {trial.trial_id} epoch {epoch}/{self.epochs}: {spec.key} {value:.3f} "
                f"{extra} (best so far {self.best[0]:.3f}, trial {self.best[1]})"
            )

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info):
            seen = self.epochs_seen.get(trial.trial_id, 0)
            final = bool((trial.last_result or {}).get(FINAL_KEY))
            if final or seen >= self.epochs:
                what = "completed"
            else:
                what = f"stopped early by ASHA after {seen}/{self.epochs} epochs"
            self.ended[trial.trial_id] = what
            self._say(f"trial {trial.trial_id} {what} ({len(self.ended)}/{self.total} done)")
            self._sweep(force=True)

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info):
            self._say(
                f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying once: "
                f"{_short_error(_read_error(trial))}"
            )
            self._sweep(force=True)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info):
            self.ended[trial.trial_id] = "failed"
            self._say(
                f"trial {trial.trial_id} FAILED after {trial.num_failures} attempt(s): "
                f"{_short_error(_read_error(trial))} ({len(self.ended)}/{self.total} done)"
            )
            self._sweep(force=True)

    return SearchMonitor


def _read_error(trial: Any) -> str:
    """The text of a Tune trial's error, or ''. The local error file first: Tune calls the
    callbacks before it syncs that file to the experiment's storage."""
    local = getattr(trial, "error_file", None)
    if local and os.path.isfile(local):
        try:
            return Path(local).read_text()
        except OSError:
            pass
    for attr in ("get_error", "get_pickled_error"):
        fn = getattr(trial, attr, None)
        if callable(fn):
            try:
                err = fn()
            except (OSError, ValueError, TypeError, EOFError):
                err = None
            if err is not None:
                return str(err)
    return ""


_LAZY: dict[str, Callable[[], type]] = {
    "TrialReportCallback": _build_trial_report_callback,
    "SearchMonitor": _build_search_monitor,
}


def _lazy(name: str) -> type:
    """A lazily built class by name (bare names inside this module bypass ``__getattr__``)."""
    return globals()[name] if name in globals() else __getattr__(name)


def __getattr__(name: str) -> Any:
    """Classes that subclass Ray's are built on first use (PEP 562), so importing this
    module does not import Ray; pickles name them ``ageray.tuning.<Name>`` and any process
    (the Train controller, a restored search) rebuilds them the same way."""
    if name in _LAZY:
        cls = _LAZY[name]()
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ======================================================================================
# The search
# ======================================================================================


@dataclass
class SearchOptions:
    """Everything ``python -m tuning.search`` takes (None: the space file's value)."""

    space: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    resume: bool = False
    retry_errored: bool = False
    num_samples: int | None = None
    metric: str | None = None
    metric_weight: float | None = None
    algorithm: str | None = None
    epochs: int | None = None
    stage2: bool | None = None
    evaluate: bool | None = None
    scheduler: str | None = None
    grace_period: int | None = None
    reduction_factor: float | None = None
    max_concurrent: int | None = None
    driver_cpus: float | None = None
    tracking: bool = True
    dry_run: bool = False


@dataclass
class SearchOutcome:
    name: str
    experiment_path: str
    results_dir: Path
    records: list[TrialRecord]
    table: Table | None
    metric: MetricSpec
    epochs: int
    best: TrialRecord | None = None
    best_recipe: Path | None = None
    interrupted: bool = False
    resumed: bool = False
    elapsed_s: float = 0.0
    concurrency: str = ""
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"completed": 0, "stopped": 0, "failed": 0, "unfinished": 0}
        for r in self.records:
            out[r.status(self.epochs)] += 1
        out["retried"] = sum(1 for r in self.records if r.failures > 0)
        return out


def _apply_cli(space: SearchSpace, o: SearchOptions) -> SearchSpace:
    s = copy.deepcopy(space.settings)
    for attr, value in (
        ("num_samples", o.num_samples),
        ("metric", o.metric),
        ("metric_weight", o.metric_weight),
        ("algorithm", o.algorithm),
        ("epochs", o.epochs),
        ("stage2", o.stage2),
        ("evaluate", o.evaluate),
        ("max_concurrent", o.max_concurrent),
        ("driver_cpus", o.driver_cpus),
    ):
        if value is not None:
            setattr(s, attr, value)
    if o.scheduler is not None:
        s.scheduler.name = o.scheduler
    if o.grace_period is not None:
        s.scheduler.grace_period = o.grace_period
    if o.reduction_factor is not None:
        s.scheduler.reduction_factor = o.reduction_factor
    check_settings(s, "command line")
    return dataclasses.replace(space, settings=s)


def _base_config(o: SearchOptions, space: SearchSpace) -> Config:
    """Recipe, then the space's ``fixed`` values and ``epochs``, then ``--set`` (the
    command line has the last word, as in every job)."""
    from ageray.config import load_config

    for item in o.overrides:
        key = item.split("=", 1)[0].strip()
        if key in space.searched_keys:
            raise TuningError(
                f"--set {item}: '{key}' is searched by {space.source}; remove it from the "
                "space (params) or from the command line"
            )
    early = [f"{k}={json.dumps(v)}" for k, v in space.fixed.items()]
    if space.settings.epochs is not None:
        early.append(f"train.stage1.epochs={space.settings.epochs}")
    try:
        return load_config(o.config, [*early, *o.overrides])
    except ConfigError as exc:
        raise TuningError(f"config: {exc}") from exc


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _definition(base: Mapping[str, Any], space: SearchSpace, spec: MetricSpec) -> dict[str, Any]:
    """What makes a search itself (compared on --resume): not how wide it runs."""
    settings = dataclasses.asdict(space.settings)
    for key in ("max_concurrent", "driver_cpus"):
        settings.pop(key)
    return {
        "format": "ageray-search/1",
        "config": json.loads(json.dumps(base, default=str)),
        "space": {k: v for k, v in space.raw.items() if k != "search"},
        "settings": json.loads(json.dumps(settings, default=str)),
        "metric": {"name": spec.name, "weight": spec.weight},
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix]


@dataclass
class _Plan:
    """A search resolved from its options: what runs, where, and with which base config."""

    space: SearchSpace
    spec: MetricSpec
    name: str
    epochs: int
    total: int
    rungs: list[int]
    user_base: dict[str, Any]  # recipe + fixed + --set, paths as written: the best recipe's base
    runtime_cfg: Config  # the same with absolute paths: what trials start from
    search_root: str
    experiment_path: str
    results_dir: Path

    @property
    def settings(self) -> SearchSettings:
        return self.space.settings

    @property
    def use_asha(self) -> bool:
        return self.settings.scheduler.name == "asha" and bool(self.rungs)

    @property
    def runtime_base(self) -> dict[str, Any]:
        return to_dict(self.runtime_cfg)


def _plan(o: SearchOptions) -> _Plan:
    from ageray.training.driver import absolutize_paths, local_run_dir

    space = _apply_cli(load_space(o.space), o)
    cfg = _base_config(o, space)
    name = o.name or f"{cfg.run.name}-{Path(o.space).stem}"
    if not _NAME.match(name):
        raise TuningError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    runtime_cfg = absolutize_paths(cfg)
    check_space_values(space, to_dict(runtime_cfg))
    search_root = f"{runtime_cfg.run.storage_path.rstrip('/')}/{name}"
    named = dataclasses.replace(runtime_cfg, run=dataclasses.replace(runtime_cfg.run, name=name))
    sch = space.settings.scheduler
    epochs = cfg.train.stage1.epochs
    return _Plan(
        space=space,
        spec=space.settings.metric_spec(),
        name=name,
        epochs=epochs,
        total=grid_size(space),
        rungs=asha_rungs(epochs, sch.grace_period, sch.reduction_factor),
        user_base=to_dict(cfg),
        runtime_cfg=runtime_cfg,
        search_root=search_root,
        experiment_path=f"{search_root}/tune",
        results_dir=local_run_dir(named) / "results",
    )


def _print_plan(p: _Plan, need: Mapping[str, float], why: str) -> None:
    s = p.settings
    _say(
        f"search {p.name!r}: {p.total} trial(s), {s.algorithm} search over "
        f"{len(p.space.params)} parameter(s) from {p.space.source}"
    )
    for param in p.space.params:
        _say(f"  {param.name}: {param.describe()}")
    _say(
        f"  metric: {p.spec.key} ({p.spec.label}, {p.spec.mode}) on the validation split, "
        f"per stage-1 epoch; {p.epochs} epoch(s) per trial"
        + (", then stage 2" if s.stage2 else "")
        + (", then test evaluation" if s.evaluate else "")
    )
    if p.use_asha:
        _say(
            f"  scheduler: ASHA, cuts at epoch(s) {p.rungs}, reduction factor "
            f"{s.scheduler.reduction_factor:g}"
        )
    else:
        _say("  scheduler: FIFO (no early stopping)")
    _say(f"  concurrency: {why}; each trial: {dict(need)}")
    _say(f"  storage: {p.search_root}")


def _check_resume(p: _Plan, o: SearchOptions, tune_path: str, fs: Any) -> bool:
    """Whether the search exists (and may be resumed); records its definition."""
    from ray import tune

    from ageray.data import storage

    exists = tune.Tuner.can_restore(tune_path, storage_filesystem=fs)
    if exists and not o.resume:
        raise TuningError(
            f"search {p.name!r} already exists at {p.experiment_path}: pass --resume to "
            "continue it (finished trials are kept) or --name for a new search"
        )
    definition = _definition(p.user_base, p.space, p.spec)
    definition_path = storage.join(p.search_root, "search.json")
    if exists and storage.exists(definition_path):
        changed = _diff(storage.read_json(definition_path), definition)
        if changed:
            raise TuningError(
                f"--resume {p.name!r}: the recipe, --set values or space differ from the ones "
                f"the search started with ({', '.join(changed[:8])}); resume with the same "
                "arguments, or start a new search with --name"
            )
    if o.resume and not exists:
        _say(f"no earlier search {p.name!r} at {p.experiment_path}: starting a new one")
    storage.write_json(definition_path, definition)
    return exists


def _open_parent_run(p: _Plan, enabled: bool, resume: bool, concurrency: int) -> tuple[Any, Any]:
    """The search's parent MLflow run (found again by tags on resume)."""
    from ageray.tracking import Tracker

    cfg = dataclasses.replace(
        p.runtime_cfg, run=dataclasses.replace(p.runtime_cfg.run, name=p.name)
    )
    tracker = Tracker(cfg, enabled=enabled)
    parent = tracker.start_pipeline("tune-search", resume=resume)
    if parent:
        settings = flatten(dataclasses.asdict(p.settings))
        tracker.set_tags(parent, {"ageray.search": p.name})
        tracker.log_params(
            parent,
            {
                **{f"search.{k}": v for k, v in settings.items()},
                **{f"space.{q.name.replace(',', '/')}": q.describe() for q in p.space.params},
                "search.metric_key": p.spec.key,
                "search.concurrency": concurrency,
            },
        )
        tracker.log_dict(parent, p.space.raw, "search/space.json")
        _say(f"  MLflow: {tracker.run_url(parent)}")
    return tracker, parent


def _make_tuner(
    p: _Plan,
    o: SearchOptions,
    trainable: Any,
    callbacks: list[Any],
    monitor: Any,
    concurrency: int,
    resume: bool,
    tune_path: str,
    fs: Any,
) -> Any:
    """A new Tuner, or the saved one restored with this process's callbacks and ASHA's
    rungs refilled."""
    from ray import tune

    if not resume:
        return tune.Tuner(
            trainable,
            param_space=tune_param_space(p.space),
            tune_config=tune.TuneConfig(
                metric=p.spec.key,
                mode=p.spec.mode,
                search_alg=_searcher(p.space, concurrency),
                scheduler=_scheduler(p.settings, p.epochs) if p.use_asha else None,
                num_samples=p.settings.num_samples,
                max_concurrent_trials=concurrency if p.settings.algorithm == "optuna" else None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=tune_path.rsplit("/", 1)[0],
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=1),
                callbacks=callbacks,
                verbose=1,
            ),
        )
    _say(
        f"resuming search {p.name!r}: finished trials are kept, unfinished ones restart "
        "from their last Train checkpoint" + ("; errored trials restart" if o.retry_errored else "")
    )
    tuner = tune.Tuner.restore(
        tune_path,
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=o.retry_errored,
        storage_filesystem=fs,
    )
    # The pickled RunConfig brings the first run's callbacks; progress and the janitor must
    # be this process's own. The pickled scheduler has empty rungs: refill them.
    previous = collect_records(_saved_analysis(tune_path, fs), p.space, p.runtime_base)
    monitor.seed(previous)
    internal = getattr(tuner, "_local_tuner", None)
    if internal is not None and hasattr(internal, "get_run_config"):
        internal.get_run_config().callbacks = callbacks
    tune_cfg = getattr(internal, "_tune_config", None)
    if p.use_asha and replay_asha(getattr(tune_cfg, "scheduler", None), previous, p.spec):
        _say(f"ASHA rungs refilled from {len(previous)} earlier trial(s)")
    return tuner


def run_search(o: SearchOptions, extra_callbacks: Sequence[Any] | None = None) -> SearchOutcome:
    """Run (or resume) a search and write its results; see ``python -m tuning.search``.

    ``extra_callbacks`` are Tune callbacks added to the search's own (progress, janitor).
    """
    import ray
    from ray import tune

    from ageray.training.driver import init_ray, storage_args

    t0 = time.time()
    p = _plan(o)
    init_ray(p.runtime_cfg)
    autoscaling = bool(p.runtime_cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    need = trial_resources(p.runtime_cfg.ray, p.settings.driver_cpus)
    n_conc, why = max_concurrent_trials(
        ray.cluster_resources(), need, override=p.settings.max_concurrent, autoscaling=autoscaling
    )
    _print_plan(p, need, why)
    if o.dry_run:
        return SearchOutcome(
            p.name, p.experiment_path, p.results_dir, [], None, p.spec, p.epochs, concurrency=why
        )

    fs_args = storage_args(p.search_root)
    fs = fs_args.get("storage_filesystem")
    tune_path = f"{fs_args['storage_path']}/tune" if fs else p.experiment_path
    exists = _check_resume(p, o, tune_path, fs)
    tracker, parent = _open_parent_run(p, o.tracking, exists, n_conc)
    ctx = TrialContext(
        search=p.name,
        base=p.runtime_base,
        space=p.space.raw,
        metric=p.spec.name,
        metric_weight=p.spec.weight,
        tracking_uri=tracker.uri if tracker.enabled else None,
        parent_run_id=parent,
        stage2=p.settings.stage2,
        evaluate=p.settings.evaluate,
    )
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx.to_dict()), {"cpu": p.settings.driver_cpus}
    )
    monitor = _lazy("SearchMonitor")(p.space.raw, p.spec.name, p.spec.weight, p.epochs, p.total)
    callbacks = [monitor, *(extra_callbacks or [])]
    release_orphaned_placement_groups()  # leftovers of an interrupted search in this job
    tuner = _make_tuner(p, o, trainable, callbacks, monitor, n_conc, exists, tune_path, fs)
    # fit's ResultGrid holds in-memory statuses (there an interrupted trial reads
    # TERMINATED, like one ASHA stopped); the saved experiment state tells them apart.
    tuner.fit()
    release_orphaned_placement_groups()
    records = collect_records(_saved_analysis(tune_path, fs), p.space, p.runtime_base)
    # Interrupted: a trial did not end, or the searcher had not yet made every trial.
    unfinished = any(r.status(p.epochs) == "unfinished" for r in records)
    outcome = SearchOutcome(
        name=p.name,
        experiment_path=p.experiment_path,
        results_dir=p.results_dir,
        records=records,
        table=None,
        metric=p.spec,
        epochs=p.epochs,
        interrupted=unfinished or len(records) < p.total,
        resumed=exists,
        concurrency=why,
        parent_run_id=parent,
        tracking_uri=tracker.uri if tracker.enabled else None,
    )
    _finish_mlflow_children(tracker, p.name, records, p.epochs)
    write_results(outcome, p.space, p.user_base, p.runtime_base)
    outcome.elapsed_s = time.time() - t0
    _close_parent_run(tracker, parent, outcome)
    return outcome


def _close_parent_run(tracker: Any, parent: str | None, outcome: SearchOutcome) -> None:
    """Counts, the best value and trial, the results folder; KILLED when interrupted."""
    if not parent:
        return
    spec = outcome.metric
    tracker.log_metrics(parent, {f"trials_{k}": v for k, v in outcome.counts().items()})
    if outcome.best is not None:
        v = outcome.best.best_value(spec)
        if v is not None:
            tracker.log_metrics(parent, {f"best_{spec.key}": v})
        tracker.set_tags(
            parent,
            {
                "ageray.tune.best_trial": outcome.best.trial_id,
                "ageray.tune.best_run": outcome.best.run_id or "",
            },
        )
    tracker.log_artifact(parent, outcome.results_dir, "results")
    tracker.end(parent, "KILLED" if outcome.interrupted else "FINISHED")


def _say(text: str) -> None:
    print(f"[tune] {text}", flush=True)


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's ``param_space``: grid values as ``grid_search`` under grid search, else every
    discrete parameter as ``choice`` (Optuna cannot take ``grid_search``)."""
    from ray import tune

    algorithm = space.settings.algorithm
    out: dict[str, Any] = {}
    for p in space.params:
        if p.discrete:
            vals = p.tune_values()
            grid = p.kind == "grid" and algorithm == "grid"
            out[p.name] = tune.grid_search(vals) if grid else tune.choice(vals)
        elif p.kind == "loguniform":
            out[p.name] = tune.loguniform(p.low, p.high)
        else:
            out[p.name] = tune.uniform(p.low, p.high)
    return out


def _searcher(space: SearchSpace, max_concurrent: int) -> Any:
    """Optuna's TPE (Tune wraps it in a ConcurrencyLimiter from ``max_concurrent_trials``)
    or the grid/random generator, which must get the limit itself: Tune ignores
    ``max_concurrent_trials`` for a generator passed in."""
    s = space.settings
    if s.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=s.seed)


def replay_asha(scheduler: Any, records: Sequence[TrialRecord], spec: MetricSpec) -> int:
    """Put earlier trials' per-epoch results back into a restored ASHA scheduler's rungs;
    return how many trials were replayed.

    Why: Tune saves the searcher's state with the experiment but not the scheduler's; a
    resumed search would start with empty rungs, and the first trial to reach a rung after
    the resume would pass unopposed. Replaying each finished trial's reports (the rung values
    are the first report at or past each rung, whatever the order) restores the cutoffs.
    Uses ASHA's bracket internals (guarded: other schedulers are left alone).
    """
    brackets = getattr(scheduler, "_brackets", None)
    if not brackets or not hasattr(brackets[0], "on_result"):
        return 0
    sign = -1.0 if spec.mode == "min" else 1.0
    replayed = 0
    for rec in records:
        rows = [(int(r[EPOCH_KEY]), spec.value(r)) for r in rec.history]
        rows = [(e, v) for e, v in rows if v is not None]
        if not rows:
            continue
        stub = types.SimpleNamespace(trial_id=rec.trial_id)
        for epoch, value in rows:
            brackets[0].on_result(stub, epoch, sign * value)
        replayed += 1
    return replayed


def _scheduler(settings: SearchSettings, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=EPOCH_KEY,
        max_t=epochs - 1,
        grace_period=settings.scheduler.grace_period,
        reduction_factor=settings.scheduler.reduction_factor,
        stop_last_trials=False,
    )


def _saved_analysis(path: str, fs: Any) -> Any:
    """The experiment as Tune saved it (statuses included: RUNNING for a trial an
    interruption cut off, which a resume restarts)."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(path, storage_filesystem=fs)


def collect_records(
    analysis: Any, space: SearchSpace, base: Mapping[str, Any]
) -> list[TrialRecord]:
    """Tune's trials (an ``ExperimentAnalysis``) -> :class:`TrialRecord` (status, failures,
    every report), in trial order."""
    trials = list(getattr(analysis, "trials", None) or [])
    frames = getattr(analysis, "trial_dataframes", None) or {}
    records = []
    for t in sorted(trials, key=lambda t: t.trial_id):
        df = frames.get(t.trial_id)
        rows = df.to_dict("records") if df is not None and len(df) else []
        rows = [{k: v for k, v in r.items() if not _is_nan(v)} for r in rows]
        config = {k: v for k, v in (t.config or {}).items() if not k.startswith("__")}
        try:
            overrides = resolve_sample(space, config, base) if config else {}
        except TuningError:
            overrides = {}
        records.append(
            TrialRecord(
                trial_id=t.trial_id,
                tune_status=str(t.status),
                config=config,
                rows=rows,
                overrides=overrides,
                failures=int(getattr(t, "num_failures", 0) or 0),
                error=_short_error(_read_error(t)) if t.status == "ERROR" else None,
            )
        )
    return records


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


_RUN_STATUS = {
    "completed": "FINISHED",
    "stopped": "KILLED",
    "unfinished": "KILLED",
    "failed": "FAILED",
}


def _finish_mlflow_children(tracker: Any, name: str, records: list[TrialRecord], epochs: int):
    """Give every trial's child run the search's verdict: outcome, failures, epochs run, any
    epochs it missed (:func:`_backfill_epochs`) and the matching run status.

    Why the driver and not the trials: Tune ends a trial's actor when ASHA stops it or the
    search is interrupted, so its driver cannot close its run, and an actor being torn down
    may still write (an interrupted attempt catching its controller's death marks the run
    FAILED, possibly after a resumed attempt reopened it). Tune's record is the truth.
    """
    if not tracker.enabled:
        return
    for rec in records:
        found = tracker.client.search_runs(
            [tracker.experiment_id], _tag_query(_trial_tags(name, rec.trial_id)), max_results=1
        )
        if not found:
            continue
        run = found[0]
        rec.run_id = run.info.run_id
        status = rec.status(epochs)
        tags = {"ageray.tune.outcome": status, "ageray.tune.failures": rec.failures}
        if rec.error:
            tags["ageray.tune.error"] = rec.error
        elif "ageray.tune.error" in run.data.tags:
            tracker.client.delete_tag(rec.run_id, "ageray.tune.error")
        tracker.set_tags(rec.run_id, tags)
        tracker.log_metrics(rec.run_id, {"epochs_run": rec.epochs_run})
        _backfill_epochs(tracker, rec)
        if run.info.status != _RUN_STATUS[status]:
            tracker.end(rec.run_id, _RUN_STATUS[status])


#: Keys Tune adds to every result; not the worker's metrics.
_TUNE_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_path",
    "experiment_tag",
    "should_checkpoint",
    EPOCH_KEY,
    FINAL_KEY,
    "num_params",
    DERIVED_KEY,
}


def _backfill_epochs(tracker: Any, rec: TrialRecord) -> int:
    """Log the epochs Tune received but the trial's MLflow run lacks; return how many.

    Why: rank 0 logs an epoch's metrics after ``ray.train.report``, and ASHA's stop decision
    on that very report ends the trial's actors, so a stopped trial's last epoch can miss
    MLflow. Tune has it; the driver writes it at the same step (epoch), once.
    """
    if not rec.run_id or not rec.history:
        return 0
    logged = {m.step for m in tracker.client.get_metric_history(rec.run_id, "epoch")}
    added = 0
    for row in rec.history:
        epoch = int(row[EPOCH_KEY]) - 1
        if epoch in logged:
            continue
        metrics = {
            k: float(v)
            for k, v in row.items()
            if k not in _TUNE_KEYS and not k.startswith("config/") and _num(v) is not None
        }
        metrics["epoch"] = float(epoch)
        tracker.log_metrics(rec.run_id, metrics, step=epoch)
        added += 1
    return added


def write_results(
    outcome: SearchOutcome,
    space: SearchSpace,
    user_base: Mapping[str, Any],
    runtime_base: Mapping[str, Any],
) -> None:
    """Table (Markdown, CSV), plots, the best recipe and ``summary.json`` in
    ``results_dir``; fills ``outcome.table``, ``best``, ``best_recipe`` and ``files``."""
    spec, epochs, out = outcome.metric, outcome.epochs, outcome.results_dir
    out.mkdir(parents=True, exist_ok=True)
    bindings = {n: get_dotted(runtime_base, k) for n, k in BINDINGS.items()}
    table = build_table(outcome.records, space, spec, epochs, bindings)
    c = outcome.counts()
    table.title = (
        f"Search {outcome.name}: {spec.label} on the validation split at each trial's best "
        f"epoch ({spec.mode}); {len(outcome.records)} trials"
    )
    table.notes = [
        f"{c['completed']} completed, {c['stopped']} stopped early by ASHA, {c['failed']} "
        f"failed, {c['unfinished']} unfinished; {c['retried']} retried after a failure. "
        "params: parameter count of the stage-1 model."
    ]
    files = {
        "table_md": out / "table.md",
        "table_csv": out / "table.csv",
        "plot": out / "metric_vs_params.png",
        "curves": out / "curves.png",
        "summary": out / "summary.json",
        "space": out / "space.yaml",
    }
    files["table_md"].write_text(table.markdown())
    write_csv(files["table_csv"], table)
    plot_metric_vs_params(outcome.records, space, spec, epochs, files["plot"])
    plot_curves(outcome.records, space, spec, files["curves"])
    files["space"].write_text(yaml.safe_dump(space.raw, sort_keys=False))
    best = best_record(outcome.records, spec)
    if best is not None:
        recipe = best_recipe(user_base, best.overrides, f"{outcome.name}-best")
        value = best.best_value(spec)
        files["best_recipe"] = write_best_recipe(
            out / "best_recipe.yaml",
            recipe,
            [
                f"Best configuration of search '{outcome.name}' (trial {best.trial_id}):",
                "  " + ", ".join(f"{k}={v}" for k, v in best.overrides.items()),
                f"  {spec.key} {value:.4f} at epoch "
                f"{(best.best_row(spec) or {}).get(EPOCH_KEY, '?')} of {epochs}",
                "Train it: python -m jobs.train --config <this file>",
            ],
        )
    summary = {
        "name": outcome.name,
        "metric": {"key": spec.key, "mode": spec.mode, "label": spec.label},
        "epochs": epochs,
        "counts": c,
        "best_trial": best.trial_id if best else None,
        "interrupted": outcome.interrupted,
        "trials": [
            {k: v for k, v in row.items() if not k.startswith(("label:", "bind:"))}
            for row in table.rows
        ],
    }
    files["summary"].write_text(json.dumps(summary, indent=2, default=str))
    outcome.table, outcome.best, outcome.files = table, best, files
    outcome.best_recipe = files.get("best_recipe")


def format_summary(o: SearchOutcome, command: str = "python -m tuning.search") -> str:
    """The closing lines of a search."""
    c = o.counts()
    m, s = divmod(int(o.elapsed_s), 60)
    lines = []
    if o.table is not None:
        lines += ["", o.table.markdown()]
    head = "interrupted" if o.interrupted else "finished"
    lines.append(
        f"[tune] search {o.name!r} {head} in {m}m{s:02d}s: {len(o.records)} trials "
        f"({c['completed']} completed, {c['stopped']} stopped early by ASHA, {c['failed']} "
        f"failed, {c['unfinished']} unfinished; {c['retried']} retried)"
    )
    lines.append(f"  metric:  {o.metric.key} = {o.metric.label} ({o.metric.mode})")
    if o.best is not None:
        row = o.best.best_row(o.metric) or {}
        values = ", ".join(f"{k}={v}" for k, v in o.best.overrides.items())
        lines.append(
            f"  best:    trial {o.best.trial_id}: {values} -> {o.metric.key} "
            f"{o.best.best_value(o.metric):.4f} (epoch {row.get(EPOCH_KEY, '?')}/{o.epochs})"
        )
    for rec in o.records:
        if rec.status(o.epochs) == "failed":
            lines.append(
                f"  FAILED:  trial {rec.trial_id} ({rec.failures} attempts): {rec.error or '?'}"
            )
    if o.files:
        lines.append(f"  table:   {o.files['table_md']} (+ table.csv)")
        lines.append(f"  plots:   {o.files['plot']}, {o.files['curves'].name}")
    if o.best_recipe:
        lines.append(f"  recipe:  {o.best_recipe}")
        lines.append(f"           python -m jobs.train --config {o.best_recipe}")
    if o.parent_run_id:
        lines.append(f"  MLflow:  parent run {o.parent_run_id} ({o.tracking_uri})")
    lines.append(f"  Tune:    {o.experiment_path}")
    if o.interrupted:
        lines.append(f"  resume:  {command} ... --name {o.name} --resume")
    return "\n".join(lines)
