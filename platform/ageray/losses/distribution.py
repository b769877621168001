"""Label distributions and the distribution losses of GLAE (III-A, eqs. 1-10) and LAE (2.4,
eqs. 1-5): the Gaussian label distribution, KL, the expectation and its l1 term, GLAE's local
and holistic branches and their sum, LAE's classifier-stage loss."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .targets import (
    Reduction,
    Sigma,
    _ages,
    _check_logits,
    _finite_nonneg,
    _kl_from_log_p,
    _labels,
    _reduce,
)

__all__ = [
    "base_loss",
    "er_loss",
    "expected_age",
    "gaussian_label_distribution",
    "holistic_loss",
    "kl_loss",
    "lae_stage2_loss",
    "local_loss",
    "sum_loss",
]


def gaussian_label_distribution(y: Any, num_classes: int = 101, sigma: Sigma = 1.0) -> Tensor:
    """Gaussian label distribution over the ages ``0..K-1`` (GLAE eq. 1, LAE 2.4), (B, K).

    ``z_k ∝ exp(-(k - y)^2 / (2 sigma^2))``, **renormalised to sum to 1** over the K ages,
    i.e. Xing's eqs. 6-7 with the normaliser Z. Why: GLAE/LAE write the continuous density
    ``1/(sqrt(2 pi) sigma) exp(...)``; sampled at integer ages it sums to 1 only in the
    interior (to within 1e-8 for sigma = 1) and to about 0.70 at y = 0 or y = 100, where
    the support is cut off. The KL of eq. 2 is a divergence only between proper
    distributions: with an unnormalised target its minimum is not at ``p = z`` and it can
    go negative. In the interior the renormalisation changes nothing measurable; at the
    borders it moves the cut-off mass onto the ages that exist. It is computed as a softmax
    of the exponent, which also stays exact for tiny sigma or labels far outside 0..K-1.

    ``y`` may be real-valued (apparent age). ``sigma`` is a number or a per-sample tensor
    of shape (B,) (e.g. the annotators' std of apparent-age labels); it must be positive.
    """
    y = _labels(y)
    if isinstance(sigma, Tensor):
        s = sigma.to(device=y.device, dtype=torch.float32)
        if s.ndim == 0:
            s = s.reshape(1)
        if s.ndim != 1 or s.shape[0] not in (1, y.shape[0]):
            raise ValueError(
                f"sigma must be a number or a tensor of shape (B,)=({y.shape[0]},), "
                f"got shape {tuple(s.shape)}"
            )
        if bool((~(s > 0)).any()):
            raise ValueError("sigma must be positive (and not NaN) for every sample")
        s = s[:, None]
    else:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        s = float(sigma)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    k = _ages(num_classes, y)
    exponent = -((k[None, :] - y.float()[:, None]) ** 2) / (2.0 * s**2)
    return torch.softmax(exponent, dim=1)


def kl_loss(z: Tensor, logits: Tensor, reduction: Reduction = "mean") -> Tensor:
    """KL divergence of the prediction from the label distribution (GLAE eq. 2, LAE eq. 1):
    ``l_kl(z, p) = sum_k z_k log(z_k / p_k)``, ``p = softmax(logits)``.

    ``log p`` comes from ``log_softmax`` (no overflow/underflow), and ``0 log 0 = 0`` for the
    exact zeros a narrow Gaussian has far from the label, with finite gradients. Reduction
    over the batch: mean (per sample with ``reduction="none"``).
    """
    if z.shape != logits.shape or logits.ndim != 2:
        raise ValueError(
            f"z and logits must both have shape (B, K); got z {tuple(z.shape)}, "
            f"logits {tuple(logits.shape)}"
        )
    log_p = F.log_softmax(logits.float(), dim=1)
    return _reduce(_kl_from_log_p(z.float(), log_p, dim=1), reduction)


def expected_age(
    probs: Tensor | None = None,
    *,
    logits: Tensor | None = None,
    dim: int = 1,
    age_min: float = 0.0,
) -> Tensor:
    """Expectation refinement (GLAE eq. 3, LAE 2.4): ``y_hat = sum_k k p_k``.

    Give exactly one of ``probs`` (a distribution along ``dim``) or ``logits=`` (softmax is
    applied along ``dim``); the keyword is required for logits so that a probability
    tensor can never be soft-maxed twice by accident. The ages are ``arange(K) + age_min``
    (``age_min=0``: ages 0..K-1). ``dim=1`` fits both (B, K) and per-pixel (B, K, H, W)
    tensors; the result drops that dimension.
    """
    if probs is not None and logits is None:
        p = probs.float()
    elif logits is not None and probs is None:
        p = torch.softmax(logits.float(), dim=dim)
    else:
        raise ValueError("expected_age needs exactly one of probs or logits=")
    shape = [1] * p.ndim
    shape[dim] = p.shape[dim]
    k = _ages(p.shape[dim], p, age_min).view(shape)
    return (p * k).sum(dim=dim)


def er_loss(y: Any, y_hat: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Expectation-regression l1 term (GLAE eq. 4, LAE eq. 2): ``|y - y_hat|``, mean over
    the batch."""
    yt = _labels(y, device=y_hat.device)
    if y_hat.shape != yt.shape:
        raise ValueError(f"y_hat has shape {tuple(y_hat.shape)} but y has {tuple(yt.shape)}")
    return _reduce((yt - y_hat.float()).abs(), reduction)


def _base_terms(logits: Tensor, y: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample KL, per-sample |y - y_hat| and y_hat for a (B, K) head."""
    _check_logits(logits, y)
    z = gaussian_label_distribution(y, logits.shape[1], sigma)
    log_p = F.log_softmax(logits.float(), dim=1)
    kl = _kl_from_log_p(z, log_p, dim=1)
    y_hat = expected_age(log_p.exp())
    return kl, (y - y_hat).abs(), y_hat


def base_loss(
    logits: Tensor,
    y: Any,
    sigma: Sigma = 1.0,
    lambda_er: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """GLAE's baseline loss (eq. 5) = LAE's representation loss L_fe (eq. 3):
    ``l_kl(z, p) + lambda * |y - y_hat|`` with the Gaussian label distribution z (eq. 1)
    and the expected age y_hat (eq. 3). GLAE writes lambda = 1, LAE fixes lambda = 1 in all
    experiments; it is a knob here (``loss.lambda_er``)."""
    yt = _labels(y, device=logits.device)
    kl, er, _ = _base_terms(logits, yt, sigma)
    return _reduce(kl + lambda_er * er, reduction)


def holistic_loss(logits: Tensor, y: Any, sigma: Sigma = 1.0, lambda_er: float = 1.0) -> Tensor:
    """GLAE holistic branch (eq. 9): ``L_hol = l_kl(z, p_hol) + l_er(y, y_hat_hol)`` on the
    MLP-projected head's (B, K) logits; the same form as eq. 5 (lambda = 1 by default)."""
    return base_loss(logits, y, sigma, lambda_er)


def _local_terms(local_logits: Tensor, y: Tensor, sigma: Sigma) -> tuple[Tensor, Tensor]:
    """Per-sample KL and |y - y_hat|, each averaged over the H' x W' pixels."""
    _check_logits(local_logits, y, "local_logits", ndim=4)
    z = gaussian_label_distribution(y, local_logits.shape[1], sigma)[:, :, None, None]
    log_p = F.log_softmax(local_logits.float(), dim=1)  # per pixel, over the K channels
    kl = _kl_from_log_p(z, log_p, dim=1)  # (B, H', W')
    y_hat = expected_age(log_p.exp(), dim=1)  # (B, H', W')
    er = (y[:, None, None] - y_hat).abs()
    return kl.mean(dim=(1, 2)), er.mean(dim=(1, 2))


def local_loss(local_logits: Tensor, y: Any, sigma: Sigma = 1.0, lambda_er: float = 1.0) -> Tensor:
    """GLAE local branch (eqs. 6-7): every pixel (h, w) of the (B, K, H', W') map is a K-way
    prediction; ``L_loc = 1/(H'W') sum_{h,w} [l_kl(z, p_hw) + l_er(y, y_hat_hw)]``, then the
    mean over the batch.

    Eq. 6 as printed normalises with ``sum_k' exp(f_{h',w',k'})`` -- the denominator indexes
    another pixel (h', w'), which is a typo: that would not be a distribution at (h, w).
    We use the per-pixel softmax over the K channels, ``softmax(f_{h,w,:})``, which is what
    "a softmax layer ... for the pixel at position (h, w)" describes.
    """
    yt = _labels(y, device=local_logits.device)
    kl, er = _local_terms(local_logits, yt, sigma)
    return (kl + lambda_er * er).mean()


def sum_loss(
    local_logits: Tensor,
    logits: Tensor,
    y: Any,
    sigma: Sigma = 1.0,
    lambda_er: float = 1.0,
) -> Tensor:
    """GLAE stage-1 objective (eq. 10): ``L_sum = L_loc + L_hol`` (eqs. 7 and 9)."""
    return local_loss(local_logits, y, sigma, lambda_er) + holistic_loss(
        logits, y, sigma, lambda_er
    )


def lae_stage2_loss(logits: Tensor, y: Any, mae_ref: float, sigma: Sigma = 1.0) -> Tensor:
    """LAE classifier-stage loss (eq. 4): ``L_cl = L_ld + (L_er - mae)^2``.

    ``mae_ref`` is **stage 1's MAE on the validation set** (LAE eq. 5: "the mae here results
    from the representation learning stage on the validation set"). It is required and has
    no default on purpose: a made-up constant would silently change what the balanced
    classifier is pulled towards.

    Per-sample, then averaged: ``mean_i [KL_i + (|y_i - y_hat_i| - mae)^2]``. Why: in LAE
    eqs. 1-2, L_ld and L_er carry the sample index i (they are per-sample losses), and the
    term is introduced as an "MSE loss ... for narrowing down the standard deviation of
    different age groups". Pulling every sample's error towards the validation MAE shrinks
    the spread of errors across ages, which is what AAR's sigma measures; applied to the
    batch-mean error instead, a class-balanced batch could meet it with large errors on the
    tail ages balanced by small ones on the head, leaving sigma untouched.
    """
    mae = _finite_nonneg(
        mae_ref,
        "mae_ref",
        "it is stage 1's (representation stage's) MAE on the validation set (LAE eq. 5); "
        "pass the val_mae recorded by stage 1",
    )
    yt = _labels(y, device=logits.device)
    kl, er, _ = _base_terms(logits, yt, sigma)
    return (kl + (er - mae) ** 2).mean()
