"""Fitting a model's routing rules on a held-out split's features, and the numbers to log.

Why here, beside the rules: fitting needs only the features, the labels and the rules
themselves, so the evaluation (fit missing rules of an old model, in memory) and the training
pipeline (the fitting step after stage 2, saved with the model) share this one function.
The split must be held out: the caller passes the validation split, never the test split.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ageray.config import RoutingConfig

from .features import AGE_BAL, AGE_VAN, mix_ages
from .registry import rules_to_fit, sample_weights

__all__ = ["MIN_RELIABLE", "fit_rules", "routing_fit_metrics"]

# Fewer held-out images than this and a fitted router is mostly noise; it is still fitted
# (small test runs must exercise the step) but its report says so.
MIN_RELIABLE = 200


def fit_rules(
    model: Any,
    features: Any,
    labels: Any,
    routing: RoutingConfig,
    *,
    split: str = "val",
) -> dict[str, dict[str, Any]]:
    """Fit the rules ``routing`` asks for on (features, labels) of a held-out split, attach
    them to ``model`` (``set_router``) and make ``routing.rule`` its default rule.

    Returns ``{rule: fit report}``; besides the rule's own numbers each report has its MAE
    and CMAE on the fitting split (``fit_mae`` / ``fit_cmae``: in-sample, optimistic, for the
    log and never for tables), ``split`` and ``reliable`` (at least ``MIN_RELIABLE`` images).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y)
    f, y = f[keep], y[keep]
    reports: dict[str, dict[str, Any]] = {}
    for name, rule in rules_to_fit(routing).items():
        report = rule.fit(f, y)
        with torch.no_grad():
            t = torch.as_tensor(f, dtype=torch.float32)
            ages = mix_ages(t[:, AGE_VAN], t[:, AGE_BAL], rule(t)).double().numpy()
        err = np.abs(y - ages)
        report.update(
            split=split,
            fit_mae=float(np.mean(err)),
            # the age-weighted mean error is exactly CMAE (every age's mean counts once)
            fit_cmae=float(np.mean(sample_weights(y, "age") * err)),
            reliable=bool(y.size >= MIN_RELIABLE),
        )
        rule.fit_report = report
        model.set_router(rule, serve=False)
        reports[name] = report
    model.use_rule(routing.rule)
    return reports


def routing_fit_metrics(reports: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``routing_<rule>_<number>`` for MLflow: the objective, eq. 11's objective on the same
    data, the in-sample MAE / CMAE, tau, the number of images."""
    out: dict[str, float] = {}
    for name, report in reports.items():
        for key in ("objective", "objective_smaller", "fit_mae", "fit_cmae", "tau", "n"):
            value = report.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                out[f"routing_{name}_{key}"] = float(value)
    return out
