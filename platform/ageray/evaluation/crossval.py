"""Cross-validation: the folds of a protocol (k-fold, leave one person out) as runs, and the
mean and spread of their evaluation reports.

Why a summary of its own: papers report a k-fold or LOPO number as the mean over folds
(Xing's 5-fold, FG-NET's 82 persons), and a single fold's table says little about how much
of a difference between two rules is noise. ``summarize_folds`` turns the folds'
``report.json`` dicts into one table: per row and metric the mean, the standard deviation
over folds (ddof 1) and the number of folds that had the row. Leave-one-person-out test
splits are tiny (one person), so for LOPO the pooled numbers -- every fold's test samples
scored together, as FG-NET papers do -- are the ones to quote: ``pooled`` holds every
row's MAE and CMAE over all folds' test samples, exact from each report's per-age MAE and
age histogram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["FOLD_METRICS", "fold_run_name", "summarize_folds", "summary_markdown"]

#: The per-row numbers summarised over folds (``report.json`` row keys; nested ones dotted).
FOLD_METRICS = (
    "mae",
    "cmae",
    "aar",
    "group_mae.0-17",
    "group_mae.18-65",
    "group_mae.66-100",
    "group_cmae.0-17",
    "group_cmae.18-65",
    "group_cmae.66-100",
    "shot_mae.many",
    "shot_mae.medium",
    "shot_mae.few",
)


def fold_run_name(name: str, fold: int) -> str:
    """The run name of one fold: ``<name>-fold<i>`` (its checkpoints and MLflow runs)."""
    return f"{name}-fold{fold}"


def _get(row: Mapping[str, Any], dotted: str) -> float | None:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, int | float) and math.isfinite(node):
        return float(node)
    return None


def summarize_folds(
    reports: Sequence[Mapping[str, Any]], *, protocol: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Mean and spread over folds of every row's metrics.

    Returns ``{"folds": n, "protocol": ..., "row_order": [...], "rows": {row: {metric:
    {"mean", "std", "n"}}}, "gap_closed": {row: {"mae": {...}, "cmae": {...}}},
    "samples": [test samples per fold]}``. ``std`` is NaN with one fold. A row missing in a
    fold (e.g. a rule one fold's model lacked) is summarised over the folds that have it.
    """
    if not reports:
        raise ValueError("summarize_folds needs at least one fold's report")
    order: list[str] = []
    for r in reports:
        for name in r.get("row_order") or list(r.get("rows") or {}):
            if name not in order:
                order.append(name)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for name in order:
        metrics: dict[str, dict[str, float]] = {}
        for key in FOLD_METRICS:
            values = [
                v
                for r in reports
                if name in (r.get("rows") or {})
                for v in [_get(r["rows"][name], key)]
                if v is not None
            ]
            if values:
                metrics[key] = _stats(values)
        rows[name] = metrics
    gaps: dict[str, dict[str, dict[str, float]]] = {}
    for name in order:
        for k in ("mae", "cmae"):
            values = [
                float(v)
                for r in reports
                for v in [((r.get("gap_closed") or {}).get(name) or {}).get(k)]
                if isinstance(v, int | float) and math.isfinite(v)
            ]
            if values:
                gaps.setdefault(name, {})[k] = _stats(values)
    return {
        "folds": len(reports),
        "pooled": {name: _pooled(reports, name) for name in order},
        "protocol": dict(protocol or {}),
        "row_order": order,
        "rows": rows,
        "gap_closed": gaps,
        "samples": [int(r.get("num_samples") or 0) for r in reports],
        "bounds": sorted({b for r in reports for b in (r.get("bounds") or [])}),
    }


def _pooled(reports: Sequence[Mapping[str, Any]], name: str) -> dict[str, float]:
    """MAE and CMAE of one row over the union of the folds' test samples: per age, the
    count-weighted mean of the folds' per-age MAE; MAE weights ages by count, CMAE not."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in reports:
        per_age = (r.get("per_age_mae") or {}).get(name)
        hist = r.get("age_hist") or {}
        if not per_age:
            continue
        for age, err in per_age.items():
            n = int(hist.get(age, hist.get(str(age), 0)) or 0)
            if n and isinstance(err, int | float) and math.isfinite(err):
                a = int(age)
                sums[a] = sums.get(a, 0.0) + n * float(err)
                counts[a] = counts.get(a, 0) + n
    if not counts:
        return {}
    per_age_mean = {a: sums[a] / counts[a] for a in counts}
    total = sum(counts.values())
    return {
        "mae": sum(sums.values()) / total,
        "cmae": float(np.mean(list(per_age_mean.values()))),
        "n": total,
    }


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def summary_markdown(summary: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The fold summary as a Markdown table: mean ± std over folds per row."""
    labels = labels or {}
    proto = summary.get("protocol") or {}
    desc = ", ".join(f"{k}={v}" for k, v in proto.items()) or "protocol not recorded"
    shown = ("mae", "cmae", "group_cmae.0-17", "group_cmae.18-65", "group_cmae.66-100")
    shots = ("shot_mae.many", "shot_mae.medium", "shot_mae.few")
    has_shots = any(s in m for m in summary["rows"].values() for s in shots)
    head = ["row", "MAE", "CMAE", "CMAE 0-17", "CMAE 18-65", "CMAE 66-100"]
    head += ["MAE many", "MAE medium", "MAE few"] if has_shots else []
    head += ["closes CMAE gap", "pooled MAE", "pooled CMAE"]
    lines = [
        f"{summary['folds']} folds ({desc}); test samples per fold: {summary['samples']}. "
        "Mean ± standard deviation over folds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    bounds = set(summary.get("bounds") or [])
    for name in summary["row_order"]:
        m = summary["rows"][name]
        cells = [labels.get(name, name)]
        for key in shown + (shots if has_shots else ()):
            cells.append(_pm(m.get(key)))
        gap = (summary["gap_closed"].get(name) or {}).get("cmae")
        cells.append("bound" if name in bounds else _pm(gap, percent=True))
        pooled = (summary.get("pooled") or {}).get(name) or {}
        cells += [_num(pooled.get("mae")), _num(pooled.get("cmae"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) and math.isfinite(v) else "–"


def _pm(stats: Mapping[str, float] | None, percent: bool = False) -> str:
    if not stats:
        return "–"
    mean, std = stats["mean"], stats["std"]
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if not math.isfinite(std):
        return f"{scale * mean:.2f}{unit}"
    return f"{scale * mean:.2f} ± {scale * std:.2f}{unit}"
