"""GLAE's eq. 11 on probabilities: ``adaptive_route`` and ``kl_rows`` (stable public names,
ARCHITECTURE.md), float64 KL.

This is the reference form of the two KL rules; the model routes through the rule registry
(``ageray.model.routing``: float32, features, any rule), and the tests hold the two to the same
choices.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

__all__ = ["adaptive_route", "kl_rows"]

_TINY = torch.finfo(torch.float64).tiny  # ~2.2e-308: log(tiny) ~ -708, finite


def _as_2d(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected probabilities of shape (B, K), got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def kl_rows(p: Any, q: Any) -> torch.Tensor:
    """KL(p || q) = sum_k p_k log(p_k / q_k) per row, (B, K) -> (B,), in float64.

    Zero-safe: terms with p_k = 0 are 0 (``xlogy``), and q is clamped at the smallest
    positive float64, so p_k > 0 with q_k = 0 gives a large finite value, never inf/NaN.
    """
    p64 = _as_2d(p, "p").double()
    q64 = _as_2d(q, "q").to(p64.device).double().clamp_min(_TINY)
    return (torch.xlogy(p64, p64) - torch.xlogy(p64, q64)).sum(-1)


def adaptive_route(
    p_van: Any,
    p_van_flip: Any,
    p_bal: Any,
    p_bal_flip: Any,
    rule: Literal["smaller", "bigger"] = "smaller",
    *,
    flip_average: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose vanilla or balanced per sample; returns ``(probs, choice, kl_van, kl_bal)``.

    ``kl_* = KL(p || p_flip)`` per sample (eq. 11, Upsilon_1 / Upsilon_2). ``rule="smaller"``
    (AR): ``choice = 0`` (vanilla) iff ``kl_van < kl_bal``, otherwise 1 (balanced) -- the
    paper's "the vanilla classifier is chosen if Upsilon_1 < Upsilon_2; otherwise, the balanced
    classifier", so ties go to the balanced head. ``rule="bigger"`` (Table IX's "Bigger
    Upsilon" row): vanilla iff ``kl_van > kl_bal``, ties again to balanced.

    ``probs`` is the chosen head's distribution averaged over the image and its flip,
    ``0.5 * (p + p_flip)``, because GLAE's test protocol feeds both and averages the prediction
    (V-A 2); ``flip_average=False`` returns the chosen head's ``p`` for the unflipped image.

    Inputs are (B, K) torch tensors or numpy arrays (a single (K,) row is treated as B = 1).
    Outputs are torch tensors: probs (B, K) in the inputs' float dtype, choice (B,) int64,
    and kl_van, kl_bal (B,) in float64 (the comparison is made in float64).

    The model itself routes through the rule registry below (float32, any rule); this
    function is the reference form of the two KL rules on probabilities.
    """
    if rule not in ("smaller", "bigger"):
        raise ValueError(f"adaptive_route: rule={rule!r} must be 'smaller' (AR) or 'bigger'")
    pv, pvf, pb, pbf = (
        _as_2d(a, n) for a, n in zip((p_van, p_van_flip, p_bal, p_bal_flip), _NAMES)
    )
    shapes = {tuple(t.shape) for t in (pv, pvf, pb, pbf)}
    if len(shapes) != 1:
        raise ValueError(
            f"adaptive_route: the four inputs must share one (B, K) shape, got "
            f"{[tuple(t.shape) for t in (pv, pvf, pb, pbf)]}"
        )
    device = pv.device
    pvf, pb, pbf = (t.to(device) for t in (pvf, pb, pbf))
    kl_van, kl_bal = kl_rows(pv, pvf), kl_rows(pb, pbf)
    pick_vanilla = kl_van < kl_bal if rule == "smaller" else kl_van > kl_bal
    choice = (~pick_vanilla).long()
    dtype = torch.promote_types(pv.dtype, pb.dtype)
    van = 0.5 * (pv + pvf) if flip_average else pv
    bal = 0.5 * (pb + pbf) if flip_average else pb
    probs = torch.where(pick_vanilla[:, None], van.to(dtype), bal.to(dtype))
    return probs, choice, kl_van, kl_bal


_NAMES = ("p_van", "p_van_flip", "p_bal", "p_bal_flip")
