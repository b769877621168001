"""Cross-validation summaries: mean and spread over folds, pooled MAE / CMAE exactly as if
every fold's test samples had been scored together."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ageray import metrics as M
from ageray.evaluation.crossval import fold_run_name, summarize_folds, summary_markdown


def fold_report(y: np.ndarray, rows: dict[str, np.ndarray]) -> dict:
    """The parts of a report.json the summary reads, computed with ageray.metrics."""
    ages, counts = np.unique(np.floor(y + 0.5).astype(int), return_counts=True)
    out_rows = {}
    for name, yhat in rows.items():
        out_rows[name] = {
            "mae": M.mae(y, yhat),
            "cmae": M.cmae(y, yhat),
            "group_cmae": M.group_cmae(y, yhat),
            "shot_mae": M.shot_mae(y, yhat, {20: 500, 30: 50}),
        }
    return {
        "num_samples": len(y),
        "row_order": list(rows),
        "rows": out_rows,
        "per_age_mae": {name: M.per_age_mae(y, yhat) for name, yhat in rows.items()},
        "age_hist": {str(a): int(c) for a, c in zip(ages, counts)},
        "gap_closed": {"routed_learned": {"mae": 0.5, "cmae": 0.25}},
        "bounds": ["oracle"],
    }


def test_mean_spread_and_pooled_metrics() -> None:
    rng = np.random.default_rng(0)
    ys, rows = [], []
    for _ in range(3):
        y = rng.integers(1, 80, 50).astype(float)
        rows.append(
            {
                "routed": y + rng.normal(0, 3, 50),
                "routed_learned": y + rng.normal(0, 2, 50),
                "oracle": y + rng.normal(0, 1, 50),
            }
        )
        ys.append(y)
    reports = [fold_report(y, r) for y, r in zip(ys, rows)]
    s = summarize_folds(reports, protocol={"name": "k-fold", "folds": 3})
    assert s["folds"] == 3 and s["samples"] == [50, 50, 50]
    maes = [r["rows"]["routed"]["mae"] for r in reports]
    assert s["rows"]["routed"]["mae"]["mean"] == pytest.approx(np.mean(maes))
    assert s["rows"]["routed"]["mae"]["std"] == pytest.approx(np.std(maes, ddof=1))
    assert s["rows"]["routed"]["group_cmae.0-17"]["n"] == 3
    # pooled = the metric over all folds' samples at once
    y_all = np.concatenate(ys)
    pred_all = np.concatenate([r["routed"] for r in rows])
    assert s["pooled"]["routed"]["mae"] == pytest.approx(M.mae(y_all, pred_all))
    assert s["pooled"]["routed"]["cmae"] == pytest.approx(M.cmae(y_all, pred_all))
    assert s["gap_closed"]["routed_learned"]["cmae"]["mean"] == pytest.approx(0.25)
    text = summary_markdown(s, {"routed": "Smaller Υ (AR)", "oracle": "Oracle (bound)"})
    assert "3 folds (name=k-fold, folds=3)" in text
    assert f"{np.mean(maes):.2f} ± {np.std(maes, ddof=1):.2f}" in text
    assert "| Oracle (bound) |" in text and "| bound |" in text


def test_one_fold_and_missing_rows() -> None:
    y = np.array([10.0, 20.0, 30.0])
    a = fold_report(y, {"routed": y + 1, "routed_learned": y})
    b = fold_report(y, {"routed": y + 2})
    s = summarize_folds([a, b])
    assert s["rows"]["routed_learned"]["mae"]["n"] == 1
    assert math.isnan(s["rows"]["routed_learned"]["mae"]["std"])
    assert s["row_order"] == ["routed", "routed_learned"]
    with pytest.raises(ValueError, match="at least one"):
        summarize_folds([])
    assert fold_run_name("utk", 3) == "utk-fold3"
