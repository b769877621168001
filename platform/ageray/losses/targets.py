"""Shared helpers of the losses: label tensors, shape checks, class indices, 0 log 0.

Every loss module takes its labels through ``_labels`` and its class indices through
``_age_index``, so real-valued ages, (B, 1) labels and out-of-range ages are handled (and
refused with the same message) in one place.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
Sigma = float | Tensor


def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")


def _labels(y: Any, name: str = "y", device: torch.device | None = None) -> Tensor:
    """Ages as a float32 1-D tensor (B,) on ``device``; (B, 1) is accepted."""
    t = torch.as_tensor(y, device=device).float()
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"{name} must be ages of shape (B,), got shape {tuple(t.shape)}")
    return t


def _check_logits(logits: Tensor, y: Tensor, name: str = "logits", ndim: int = 2) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != ndim:
        shape = "(B, K)" if ndim == 2 else "(B, K, H', W')"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(logits.shape)}")
    if logits.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} has batch size {logits.shape[0]} but the labels y have {y.shape[0]}"
        )


def _age_index(y: Tensor, num_classes: int, offset: int = 0, name: str = "y") -> Tensor:
    """Class index ``floor(y + 0.5) - offset`` (round half up), checked to lie in range.

    The check costs one host sync; it is worth it because an out-of-range class index is
    a device-side assert on CUDA (the whole worker dies without saying which label).
    """
    idx = torch.floor(y + 0.5).long() - offset
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        lo, hi = int(idx.min()) + offset, int(idx.max()) + offset
        raise ValueError(
            f"{name} holds ages {lo}..{hi} but the classifier covers {offset}.."
            f"{offset + num_classes - 1}; filter those samples or raise model.num_classes"
        )
    return idx


def _finite_nonneg(value: Any, name: str, why: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one number, got a tensor of shape {value.shape}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number; {why} (got {value!r})")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite, non-negative number; {why} (got {value!r})")
    return v


def _xlogx(z: Tensor) -> Tensor:
    """``z * log z`` with ``0 * log 0 = 0`` and finite gradients everywhere (double where)."""
    pos = z > 0
    safe = torch.where(pos, z, torch.ones_like(z))
    return torch.where(pos, z * torch.log(safe), torch.zeros_like(z))


def _kl_from_log_p(z: Tensor, log_p: Tensor, dim: int = 1) -> Tensor:
    """``sum_k z_k (log z_k - log p_k)`` along ``dim``, 0 log 0 = 0 (GLAE eq. 2)."""
    return (_xlogx(z) - z * log_p).sum(dim=dim)


def _ages(num_classes: int, like: Tensor, age_min: float = 0.0) -> Tensor:
    return torch.arange(num_classes, device=like.device, dtype=torch.float32) + age_min
