"""The rule registry: the ``RoutingRule`` base class, registration and lookup by name, the
serving guard, and the objective every fitted rule minimises.

A rule maps one row of routing features (``features.FEATURES``) to the balanced head's weight
``w`` in [0, 1]. Rules are ``nn.Module`` s: fitted numbers are buffers, so they travel in
``model.safetensors``; ``settings()`` is the JSON that rebuilds the module (``model.json``).
The built-in rules register themselves when ``ageray.model.routing`` is imported (its
``__init__`` imports ``rules`` and ``learned``), which every import of this module goes
through first.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ageray.config import FITTED_ROUTING_RULES, RoutingConfig

from .features import AGE_BAL, AGE_VAN, FEATURES

__all__ = [
    "AGE_SHARES",
    "ROUTING_RULES",
    "RoutingRule",
    "Weighting",
    "check_fit_inputs",
    "check_servable",
    "check_weighting",
    "hard_weight",
    "make_rule",
    "register_rule",
    "routed_error",
    "rules_to_fit",
    "sample_weights",
    "select_age_share",
    "servable_rules",
]

#: How a fitted rule weighs the samples of its objective: ``instance`` (MAE), ``age`` (every
#: age equally: CMAE), a number a in [0, 1] (``(1 - a) * instance + a * age``: between the
#: two), or ``auto`` (a chosen among ``AGE_SHARES`` by cross-validation on the fitting split).
Weighting = Literal["age", "instance", "auto"] | float
AGE_SHARES = (0.0, 0.1, 0.2, 0.35, 0.5, 1.0)
CV_FOLDS = 5


def _share_of(weighting: Any) -> float | None:
    """The per-age share a in [0, 1] of a weighting (None for ``auto``); errors say why."""
    if weighting == "instance":
        return 0.0
    if weighting == "age":
        return 1.0
    if weighting == "auto":
        return None
    number = isinstance(weighting, int | float) and not isinstance(weighting, bool)
    if number and 0.0 <= float(weighting) <= 1.0:
        return float(weighting)
    raise ValueError(
        f"weighting={weighting!r} must be 'instance' (MAE), 'age' (CMAE), a share of per-age "
        "weight in [0, 1], or 'auto' (the share chosen by cross-validation)"
    )


def check_weighting(weighting: Any) -> Weighting:
    """``weighting`` if valid (a name or a share in [0, 1]), else a ValueError saying why."""
    _share_of(weighting)
    return float(weighting) if isinstance(weighting, int | float) else weighting


def sample_weights(labels: Any, weighting: Weighting = "age") -> np.ndarray:
    """Per-sample weights with mean 1: ``instance`` (all 1: the objective is MAE), ``age``
    (1 / count of the sample's integer age: every age counts equally, the objective is
    CMAE, eq. 13, with labels binned to the nearest integer as ``ageray.metrics.cmae``), or
    a share a in [0, 1] of the two: ``(1 - a) * instance + a * age``."""
    a = _share_of(weighting)
    if a is None:
        raise ValueError("sample_weights: 'auto' is resolved by the rule's fit; pass a share")
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if a == 0.0 or y.size == 0:
        return np.ones_like(y)
    ages = np.floor(y + 0.5).astype(np.int64)
    _, inverse, counts = np.unique(ages, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    w = w * (y.size / w.sum())
    return (1.0 - a) + a * w


def routed_error(features: Any, labels: Any, weight: Any) -> np.ndarray:
    """|y - routed age| per sample for balanced weights ``weight`` (the expectation is linear,
    so the mixed distribution's age is ``(1 - w) * age_van + w * age_bal``)."""
    f = _np(features)
    w = _np(weight).reshape(-1)
    age = (1.0 - w) * f[:, AGE_VAN] + w * f[:, AGE_BAL]
    return np.abs(np.asarray(labels, dtype=np.float64).reshape(-1) - age)


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def check_fit_inputs(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    f = _np(features)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if f.ndim != 2 or f.shape[1] != len(FEATURES):
        raise ValueError(
            f"routing features must be (N, {len(FEATURES)}) in the order {FEATURES}, got {f.shape}"
        )
    if f.shape[0] != y.shape[0]:
        raise ValueError(f"{f.shape[0]} feature rows but {y.shape[0]} labels")
    if f.shape[0] < 2:
        raise ValueError(f"fitting a routing rule needs at least 2 samples, got {f.shape[0]}")
    if not (np.isfinite(f).all() and np.isfinite(y).all()):
        raise ValueError("routing features or labels contain NaN/inf; fit on finite values")
    return f, y


class RoutingRule(nn.Module):
    """A named rule: ``forward(features, labels=None) -> w`` (B,) float32 in [0, 1], the
    balanced head's weight (``choice`` = 1 where w >= 0.5: ties go to the balanced head).

    ``needs_fit`` rules hold buffers set by ``fit`` (and a ``fitted`` flag buffer, so a loaded
    model knows its rule was fitted); ``settings()`` is the JSON that rebuilds the module with
    the right buffer shapes before ``load_state_dict`` fills them.
    """

    name: ClassVar[str] = ""
    needs_fit: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    servable: ClassVar[bool] = True
    fit_report: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """Constructor keyword arguments (plain JSON values)."""
        return {}

    @property
    def is_fitted(self) -> bool:
        fitted = getattr(self, "fitted", None)
        return True if fitted is None else bool(fitted.item())

    def fit(self, features: Any, labels: Any) -> dict[str, Any]:
        """Fit on (features, labels) of a held-out split (never the test split); returns a
        JSON summary, also kept as ``fit_report`` (saved in ``model.json``).

        A rule with ``weighting="auto"`` first picks its share of per-age weight
        (:func:`select_age_share`); rules without parameters only report their objective."""
        f, y = check_fit_inputs(features, labels)
        selection = None
        if getattr(self, "weighting", None) == "auto":
            selection = select_age_share(self, f, y)
            self.age_share = selection["age_share"]
        self.fit_report = self._fit(f, y)
        if selection is not None:
            self.fit_report["selection"] = selection
        return self.fit_report

    @property
    def share(self) -> float:
        """The per-age share of this rule's objective (``weighting`` resolved)."""
        a = _share_of(getattr(self, "weighting", "instance"))
        if a is None:
            a = getattr(self, "age_share", None)
        if a is None:
            raise ValueError(f"routing rule {self.name!r}: weighting 'auto' is not resolved yet")
        return float(a)

    def _fit(self, f: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return self._summary(f, y, 0.0)

    def _summary(self, f: np.ndarray, y: np.ndarray, weighting: Weighting) -> dict[str, Any]:
        sw = sample_weights(y, weighting)
        with torch.no_grad():
            w = self(torch.as_tensor(f, dtype=torch.float32))
            ref = make_rule("smaller")(torch.as_tensor(f, dtype=torch.float32))
        return {
            "n": int(y.size),
            "weighting": weighting,
            "objective": float(np.mean(sw * routed_error(f, y, w))),
            "objective_smaller": float(np.mean(sw * routed_error(f, y, ref))),
        }

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items())


ROUTING_RULES: dict[str, type[RoutingRule]] = {}


def select_age_share(
    rule: RoutingRule,
    f: np.ndarray,
    y: np.ndarray,
    *,
    shares: tuple[float, ...] = AGE_SHARES,
    folds: int = CV_FOLDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick the share of per-age weight for ``rule``'s objective by ``folds``-fold
    cross-validation on the fitting split itself (never another split).

    For each share a copy of the rule is fitted on the other folds and answers the held-out
    one; the out-of-fold MAE and CMAE are compared with eq. 11's on the same images. Chosen:
    among the shares at least as good as eq. 11 on both, the one with the smallest
    ``MAE / MAE_eq11 + CMAE / CMAE_eq11``; if none is, the smallest of that sum (and
    ``beats_smaller`` says so). Why: a router deployed for everyone should not buy CMAE
    with MAE or the reverse, and which share does that depends on the model's two heads.
    """
    n = y.size
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    age_w = sample_weights(y, "age")
    t = torch.as_tensor(f, dtype=torch.float32)
    with torch.no_grad():
        ref = routed_error(f, y, make_rule("smaller")(t))
    ref_mae, ref_cmae = float(ref.mean()), float((age_w * ref).mean())
    table = []
    for a in shares:
        err = np.zeros(n)
        for i in range(folds):
            test = parts[i]
            train = np.concatenate([parts[j] for j in range(folds) if j != i])
            clone = make_rule(rule.name, **{**rule.settings(), "weighting": float(a)})
            clone._fit(f[train], y[train])
            with torch.no_grad():
                w = clone(torch.as_tensor(f[test], dtype=torch.float32))
            err[test] = routed_error(f[test], y[test], w)
        mae, cmae = float(err.mean()), float((age_w * err).mean())
        table.append(
            {
                "age_share": float(a),
                "cv_mae": mae,
                "cv_cmae": cmae,
                "beats_smaller": bool(mae <= ref_mae and cmae <= ref_cmae),
                "score": mae / max(ref_mae, 1e-12) + cmae / max(ref_cmae, 1e-12),
            }
        )
    good = [r for r in table if r["beats_smaller"]]
    best = min(good or table, key=lambda r: r["score"])
    return {
        "age_share": best["age_share"],
        "beats_smaller": best["beats_smaller"],
        "smaller_mae": ref_mae,
        "smaller_cmae": ref_cmae,
        "folds": folds,
        "candidates": table,
    }


def register_rule(cls: type[RoutingRule]) -> type[RoutingRule]:
    """Class decorator: add a rule to ``ROUTING_RULES`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in ROUTING_RULES and ROUTING_RULES[cls.name] is not cls:
        raise ValueError(f"routing rule {cls.name!r} is already registered")
    ROUTING_RULES[cls.name] = cls
    return cls


def make_rule(name: str, **settings: Any) -> RoutingRule:
    """A new (unfitted) rule by name, e.g. ``make_rule("learned", mode="hard")``."""
    cls = ROUTING_RULES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing rule {name!r}; known: {sorted(ROUTING_RULES)}")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ValueError(f"routing rule {name!r}: bad settings {settings}: {exc}") from exc


def servable_rules() -> list[str]:
    """Rules a served model may apply (everything but the label-reading bound)."""
    return [n for n, c in ROUTING_RULES.items() if c.servable]


def check_servable(rule: str, where: str = "serving") -> str:
    """Return ``rule`` if a deployed model may apply it, else raise a ValueError saying why."""
    cls = ROUTING_RULES.get(rule)
    if cls is None:
        raise ValueError(f"{where}: unknown routing rule {rule!r}; one of {servable_rules()}")
    if not cls.servable:
        raise ValueError(
            f"{where}: routing rule {rule!r} is an evaluation-only upper bound (it reads the "
            f"true age to pick the closer head) and is never served; use one of "
            f"{servable_rules()}"
        )
    return rule


def rules_to_fit(routing: RoutingConfig) -> dict[str, RoutingRule]:
    """The unfitted rules a run's ``routing`` section asks for (``routing.fit`` plus the
    served rule when it needs fitting), built with the section's settings."""
    names = [n for n in routing.fit]
    if routing.rule in FITTED_ROUTING_RULES and routing.rule not in names:
        names.append(routing.rule)
    weighting: Any = routing.weighting
    if weighting == "blend":
        weighting = float(routing.age_share)
    settings: dict[str, dict[str, Any]] = {
        "threshold": {"weighting": weighting},
        "learned": {
            "mode": routing.mode,
            "weighting": weighting,
            "hidden": routing.hidden,
            "weight_decay": routing.weight_decay,
            "steps": routing.steps,
        },
    }
    return {n: make_rule(n, **settings[n]) for n in names}


def hard_weight(pick_vanilla: torch.Tensor) -> torch.Tensor:
    """1.0 (balanced) where ``pick_vanilla`` is False, else 0.0: a hard rule's weight."""
    zero = torch.zeros((), dtype=torch.float32, device=pick_vanilla.device)
    one = torch.ones((), dtype=torch.float32, device=pick_vanilla.device)
    return torch.where(pick_vanilla, zero, one)
