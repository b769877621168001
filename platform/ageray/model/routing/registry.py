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
    "ROUTING_RULES",
    "RoutingRule",
    "Weighting",
    "check_fit_inputs",
    "check_servable",
    "hard_weight",
    "make_rule",
    "register_rule",
    "routed_error",
    "rules_to_fit",
    "sample_weights",
    "servable_rules",
]

Weighting = Literal["age", "instance"]


def sample_weights(labels: Any, weighting: Weighting = "age") -> np.ndarray:
    """Per-sample weights with mean 1: ``instance`` (all 1: the objective is MAE) or ``age``
    (1 / count of the sample's integer age: every age counts equally, the objective is
    CMAE, eq. 13, with labels binned to the nearest integer as ``ageray.metrics.cmae``)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if weighting == "instance":
        return np.ones_like(y)
    if weighting != "age":
        raise ValueError(f"weighting={weighting!r} must be 'age' (CMAE) or 'instance' (MAE)")
    if y.size == 0:
        return y
    ages = np.floor(y + 0.5).astype(np.int64)
    _, inverse, counts = np.unique(ages, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w * (y.size / w.sum())


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

        Rules without parameters only report their objective."""
        f, y = check_fit_inputs(features, labels)
        self.fit_report = self._fit(f, y)
        return self.fit_report

    def _fit(self, f: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return self._summary(f, y, "instance")

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
    settings: dict[str, dict[str, Any]] = {
        "threshold": {"weighting": routing.weighting},
        "learned": {
            "mode": routing.mode,
            "weighting": routing.weighting,
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
