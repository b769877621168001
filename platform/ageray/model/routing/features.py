"""Per-image routing features: what every rule looks at, from the two heads' logits on an
image and its flip.

Why features and not raw distributions: the heads' answers, spreads, entropies and flip KLs
are 9 numbers per image, so evaluation can keep them for a whole split and score every rule
from one forward pass, and a rule on them is a handful of tensor ops. Everything is float32:
the KL is computed from log-softmax (sum_k p_k (log p_k - log q_k)), exact enough without
float64 and never in need of a clamp on q, which keeps the routed model exportable to
runtimes without double support.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "AGE_BAL",
    "AGE_VAN",
    "ENT_BAL",
    "ENT_VAN",
    "FEATURES",
    "GAP",
    "KL_BAL",
    "KL_VAN",
    "STD_BAL",
    "STD_VAN",
    "head_stats",
    "mix_ages",
    "mix_heads",
    "route_features",
]

_TINY32 = torch.finfo(torch.float32).tiny  # 0 * log(tiny32) = 0 in the entropy

# One row of routing features per image, in this column order (float32).
FEATURES = (
    "age_van",  # the vanilla head's answer (expectation of its flip-averaged distribution)
    "age_bal",  # the balanced head's answer
    "std_van",  # spread: standard deviation of the flip-averaged distribution
    "std_bal",
    "ent_van",  # entropy (nats) of the flip-averaged distribution
    "ent_bal",
    "kl_van",  # KL(p || p_flip), eq. 11's Upsilon_1
    "kl_bal",  # Upsilon_2
    "gap",  # age_bal - age_van: how much the choice matters, and in which direction
)
AGE_VAN, AGE_BAL, STD_VAN, STD_BAL, ENT_VAN, ENT_BAL, KL_VAN, KL_BAL, GAP = range(len(FEATURES))


def head_stats(logits: torch.Tensor, logits_flip: torch.Tensor | None) -> dict[str, Any]:
    """One distribution head on an image (and its flip), from its logits (B, K), float32.

    Returns ``probs`` (B, K) = 0.5 * (p + p_flip) (or p without a flip), ``age`` (its
    expectation over ages 0..K-1), ``std``, ``entropy`` and ``kl`` = KL(p || p_flip) (None
    without a flip). The KL is sum_k p_k (log p_k - log p_flip_k) with both logs from
    ``log_softmax``: no cancellation between two entropies and no clamp, so float32 holds.
    """
    lp = torch.log_softmax(logits.float(), -1)
    p = lp.exp()
    kl: torch.Tensor | None = None
    probs = p
    if logits_flip is not None:
        lq = torch.log_softmax(logits_flip.float(), -1)
        probs = 0.5 * (p + lq.exp())
        kl = (p * (lp - lq)).sum(-1).clamp_min(0.0)  # >= 0 in exact arithmetic
    ages = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
    age = (probs * ages).sum(-1)
    var = (probs * (ages - age[:, None]) ** 2).sum(-1)
    entropy = -(probs * torch.log(probs.clamp_min(_TINY32))).sum(-1)
    return {
        "probs": probs,
        "age": age,
        "std": var.clamp_min(0.0).sqrt(),
        "entropy": entropy,
        "kl": kl,
    }


def route_features(van: Mapping[str, Any], bal: Mapping[str, Any]) -> torch.Tensor:
    """(B, len(FEATURES)) float32 from two :func:`head_stats` results (both with a flip)."""
    if van.get("kl") is None or bal.get("kl") is None:
        raise ValueError("route_features: both heads need the flipped image (kl is None)")
    cols = [
        van["age"],
        bal["age"],
        van["std"],
        bal["std"],
        van["entropy"],
        bal["entropy"],
        van["kl"],
        bal["kl"],
        bal["age"] - van["age"],
    ]
    return torch.stack([c.float() for c in cols], dim=-1)


def mix_heads(
    van_probs: torch.Tensor, bal_probs: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``(1 - w) * p_van + w * p_bal`` per row; exact copies of one head where w is 0 or 1."""
    w = weight.to(van_probs.dtype)[:, None]
    return (1.0 - w) * van_probs + w * bal_probs


def mix_ages(age_van: torch.Tensor, age_bal: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mixed distribution's answer, ``(1 - w) * age_van + w * age_bal`` (the expectation
    is linear); exactly one head's answer where w is 0 or 1. Evaluation scores rules offline
    with this same function, so its numbers are the model's to the last bit."""
    w = weight.to(age_van.dtype)
    return (1.0 - w) * age_van + w * age_bal
