"""The built-in rules: ``smaller`` (GLAE eq. 11), ``bigger`` (Table IX's ablation),
``threshold`` (eq. 11 with a fitted ratio) and ``oracle`` (the evaluation bound).

Each is tensor ops on the feature rows (``torch.where``, no Python branch on data values), so
a routed model exports to ONNX / TorchScript with its rule inside.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .features import AGE_BAL, AGE_VAN, KL_BAL, KL_VAN
from .registry import (
    RoutingRule,
    Weighting,
    check_weighting,
    hard_weight,
    register_rule,
    sample_weights,
)

__all__ = ["BiggerRule", "OracleRule", "SmallerRule", "ThresholdRule"]


@register_rule
class SmallerRule(RoutingRule):
    """GLAE eq. 11 (AR): the head whose answer moves less under a flip; ties to balanced."""

    name = "smaller"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return hard_weight(features[:, KL_VAN] < features[:, KL_BAL])


@register_rule
class BiggerRule(RoutingRule):
    """Table IX's ablation: the head with the BIGGER flip KL; ties to balanced."""

    name = "bigger"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return hard_weight(features[:, KL_VAN] > features[:, KL_BAL])


@register_rule
class ThresholdRule(RoutingRule):
    """Vanilla iff KL_van < tau * KL_bal. tau = 1 is eq. 11; tau is fitted on a held-out
    split (the exact minimiser of the weighted error over all cut points of KL_van / KL_bal,
    preferring the cut nearest tau = 1 on ties) because after a short run the two heads'
    flip-consistency is on different scales, and eq. 11 compares them as if they were not."""

    name = "threshold"
    needs_fit = True

    def __init__(self, weighting: Weighting = "auto", age_share: float | None = None) -> None:
        super().__init__()
        self.weighting: Weighting = check_weighting(weighting)
        self.age_share = age_share  # the share 'auto' chose (restored from model.json)
        self.register_buffer("tau", torch.ones((), dtype=torch.float32))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    def settings(self) -> dict[str, Any]:
        return {"weighting": self.weighting, "age_share": self.age_share}

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return hard_weight(features[:, KL_VAN] < self.tau * features[:, KL_BAL])

    def _fit(self, f: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        sw = sample_weights(y, self.share)
        kv, kb = f[:, KL_VAN], f[:, KL_BAL]
        cost_v = sw * np.abs(y - f[:, AGE_VAN])  # the price of answering with vanilla
        cost_b = sw * np.abs(y - f[:, AGE_BAL])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = kv / kb  # vanilla iff ratio < tau; kb = 0 -> inf (never), 0/0 -> nan
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        order = np.argsort(ratio, kind="stable")
        r = ratio[order]
        # Cutting after the j first (sorted) samples: they answer with vanilla, the rest with
        # balanced. j = 0 .. n; only cuts between distinct finite ratios are realisable.
        loss = np.concatenate([[0.0], np.cumsum(cost_v[order])]) + np.concatenate(
            [np.cumsum(cost_b[order][::-1])[::-1], [0.0]]
        )
        lo = np.concatenate([[0.0], r])  # tau must be above lo (the j-th ratio) ...
        hi = np.concatenate([r, [np.inf]])  # ... and at most hi (the (j+1)-th)
        taus = np.array([_cut_point(a, b, j) for j, (a, b) in enumerate(zip(lo, hi))])
        ok = np.isfinite(taus)
        loss = np.where(ok, loss, np.inf)
        best = np.flatnonzero(loss <= loss.min() * (1 + 1e-12) + 1e-15)
        with np.errstate(divide="ignore"):
            pick = best[np.argmin(np.abs(np.log(taus[best])))]
        tau = float(taus[pick])
        with torch.no_grad():
            self.tau.fill_(tau)
            self.fitted.fill_(1)
        return {"tau": tau, **self._summary(f, y, self.share)}


@register_rule
class OracleRule(RoutingRule):
    """The head whose answer is closer to the true age: the bound a per-image router could
    reach with these two heads. Evaluation only: it reads the label, so it is never served."""

    name = "oracle"
    needs_labels = True
    servable = False

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError(
                "routing rule 'oracle' needs the true ages (labels=...): it is the evaluation "
                "bound, not a rule a model can apply to a new image"
            )
        y = labels.to(features.dtype).reshape(-1)
        err_v = (features[:, AGE_VAN] - y).abs()
        err_b = (features[:, AGE_BAL] - y).abs()
        return hard_weight(err_v < err_b)


def _cut_point(lo: float, hi: float, j: int) -> float:
    """A tau with ``lo < tau <= hi`` (j samples below it), inf when there is none.

    j = 0 is tau = 0 (nothing is below 0: every image goes to the balanced head); otherwise
    the geometric midpoint, so a float32 comparison in the model lands on the same side.
    """
    if j == 0:
        return 0.0
    if not lo < hi or not np.isfinite(lo):
        return np.inf
    if np.isinf(hi):
        return max(2.0 * lo, 1.0)
    return float(np.sqrt(lo * hi)) if lo > 0 else hi / 2.0
