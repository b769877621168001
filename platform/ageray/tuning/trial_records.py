"""One record per trial: Tune's status, the sampled values and every report, read from
Tune's saved experiment (duck-typed: no Ray here), and the rules over them (a trial's
outcome, its best epoch, the best trial, a one-line error).

The plots, the results table and the callbacks all read these records; this module reads
none of them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ageray.tuning.metric import EPOCH_KEY, FINAL_KEY, MetricSpec, TuningError, finite_number
from ageray.tuning.space import SearchSpace, resolve_sample

__all__ = [
    "TrialRecord",
    "best_record",
    "collect_records",
    "read_error",
    "short_error",
]


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
        return [r for r in self.rows if not r.get(FINAL_KEY) and finite_number(r.get(EPOCH_KEY))]

    @property
    def final(self) -> dict[str, Any] | None:
        for r in reversed(self.rows):
            if r.get(FINAL_KEY):
                return r
        return None

    @property
    def epochs_run(self) -> int:
        epochs = [int(r[EPOCH_KEY]) for r in self.history]
        if self.final and finite_number(self.final.get(EPOCH_KEY)):
            epochs.append(int(self.final[EPOCH_KEY]))
        return max(epochs, default=0)

    @property
    def num_params(self) -> int | None:
        for r in reversed(self.rows):
            v = finite_number(r.get("num_params"))
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
                error=short_error(read_error(t)) if t.status == "ERROR" else None,
            )
        )
    return records


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def read_error(trial: Any) -> str:
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


def short_error(exc: BaseException | str | None, limit: int = 300) -> str:
    """One line that names an error's cause, for tables, tags and progress lines."""
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
