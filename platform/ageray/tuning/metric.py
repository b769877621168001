"""The quantity a search optimises, and how each stage-1 report carries it to Tune.

Every Tune report holds the stage-1 validation metrics of one epoch (``val_mae``,
``val_cmae``, ``val_aar``); ``mae+cmae`` adds the derived ``val_mae_cmae``. The derived
value and the epoch counter ``tune_epoch`` are added on the Ray Train controller by
:class:`~ageray.tuning.callbacks.TrialReportCallback` (through :func:`enrich_report`), so
the worker loop stays search-agnostic.

This is the bottom of the tuning package (nothing here imports another tuning module), so
the package's one error type, :class:`TuningError`, lives here too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DERIVED_KEY",
    "EPOCH_KEY",
    "FINAL_KEY",
    "METRICS",
    "MetricSpec",
    "TuningError",
    "enrich_report",
    "finite_number",
    "parse_metric",
]


class TuningError(ValueError):
    """A search space, metric or search setting is invalid; the message names it and the fix."""


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
            mae, cmae = (
                finite_number(metrics.get("val_mae")),
                finite_number(metrics.get("val_cmae")),
            )
            if mae is None or cmae is None:
                return finite_number(metrics.get(self.key))
            return self.weight * mae + (1.0 - self.weight) * cmae
        return finite_number(metrics.get(self.key))

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


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool, NaN or text), else None:
    Tune's result rows mix numbers, NaN for missing columns and strings."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def enrich_report(
    metrics: Mapping[str, Any],
    spec: MetricSpec,
    constants: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One stage-1 report as Tune should see it: ``tune_epoch`` (1-based, from the loop's
    0-based ``epoch``), the derived metric when the search optimises one, and per-trial
    constants (the parameter count)."""
    out = dict(metrics)
    epoch = finite_number(out.get("epoch"))
    if epoch is not None:
        out[EPOCH_KEY] = int(epoch) + 1
    if spec.derived:
        value = spec.value(out)
        if value is not None:
            out[spec.key] = value
    out.update(constants or {})
    return out
