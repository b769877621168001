"""Label distributions and every training loss of the three papers.

Paper keys used in the docstrings: **GLAE** (papers/001: eqs. 1-10), **LAE**
(papers/000: eqs. 1-5), **Xing** (papers/003: eqs. 5-12), and AM-softmax (Wang et al. 2018,
the identity-pretraining loss LAE 2.3 uses).

Conventions:

* The classifier's K outputs are the ages ``0..K-1`` (K = 101: ages 0..100, GLAE III-A).
* Logits are cast to float32 before softmax/log-softmax, so the losses are accurate under
  bf16 autocast; every log-probability comes from ``log_softmax`` (never ``log(softmax)``).
* Batch reduction is the mean over samples (the papers' 1/N), unless ``reduction`` says
  otherwise.
* ``compute_loss`` is the one entry point the training loop calls; everything else is a
  building block with its own test.
* Real-valued labels are binned to an integer age with round-half-up, ``floor(y + 0.5)``,
  wherever a class index is needed (one-hot CE, ordinal targets), as in ``ageray.metrics``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ageray.config import LossConfig, ModelConfig

__all__ = [
    "AMSoftmaxHead",
    "am_softmax_logits",
    "am_softmax_loss",
    "base_loss",
    "compute_loss",
    "er_loss",
    "expected_age",
    "gaussian_label_distribution",
    "holistic_loss",
    "kl_loss",
    "lae_stage2_loss",
    "ldl_ce",
    "local_loss",
    "mae_loss",
    "mse_loss",
    "multitask_loss",
    "ordinal_age",
    "ordinal_bce",
    "ordinal_targets",
    "softmax_ce",
    "sum_loss",
]

Reduction = Literal["mean", "sum", "none"]
Sigma = float | Tensor


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Label distributions and the distribution losses (GLAE III-A, LAE 2.4)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# AM-softmax (identity pretraining, LAE 2.3)
# --------------------------------------------------------------------------------------


def am_softmax_logits(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    scale: float = 30.0,
    margin: float = 0.35,
) -> Tensor:
    """``s * (cos(theta_j) - m * [j == label])`` (Wang et al. 2018), (B, C).

    ``cos(theta_j)`` is the cosine between the L2-normalised embedding (B, D) and the
    L2-normalised class weight ``weight[j]`` (``weight`` is (C, D), as in ``nn.Linear``).
    Without ``labels`` no margin is subtracted (plain scaled cosines, for accuracy).
    """
    if embeddings.ndim != 2 or weight.ndim != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be (B, D) and weight (C, D) with the same D; got "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()
    if labels is not None:
        labels = labels.to(cos.device).long()
        if labels.shape != (cos.shape[0],):
            raise ValueError(
                f"labels must have shape (B,)=({cos.shape[0]},), got {tuple(labels.shape)}"
            )
        cos = cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return scale * cos


def am_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    scale: float = 30.0,
    margin: float = 0.35,
) -> Tensor:
    """Additive-margin softmax (Wang et al. 2018; LAE 2.3 identity pretraining):
    ``CE(s * (cos(theta) - m * onehot), label)``, mean over the batch.

    Features and class weights are normalised, so the loss separates identities by angle
    only, with a margin m between classes; s = 30, m = 0.35 are the AM-softmax paper's
    values.
    """
    logits = am_softmax_logits(embeddings, weight, labels, scale, margin)
    return F.cross_entropy(logits, labels.to(logits.device).long())


class AMSoftmaxHead(nn.Module):
    """The identity classifier of AM-softmax pretraining: holds the (C, D) class weights.

    ``forward(emb, labels)`` returns the AM-softmax loss; ``logits(emb)`` the scaled cosines
    without margin (argmax = predicted identity, for accuracy). The head is dropped after
    pretraining; only the backbone is kept.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise ValueError(
                f"AMSoftmaxHead needs embedding_dim >= 1 and num_classes >= 2 identities, got "
                f"{embedding_dim} and {num_classes}"
            )
        if scale <= 0 or margin < 0:
            raise ValueError(f"scale must be > 0 and margin >= 0, got {scale} and {margin}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        return am_softmax_loss(emb, self.weight, labels, self.scale, self.margin)

    def logits(self, emb: Tensor) -> Tensor:
        return am_softmax_logits(emb, self.weight, None, self.scale, self.margin)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale}, margin={self.margin}"
        )


# --------------------------------------------------------------------------------------
# Xing et al.: five formulations, multi-task
# --------------------------------------------------------------------------------------


def softmax_ce(logits: Tensor, y: Any) -> Tensor:
    """One-hot softmax cross entropy (Xing eq. 5): the class is the age ``floor(y + 0.5)``
    (real-valued labels rounded half up), mean over the batch. Ages outside ``0..K-1`` are
    an error (they would be a device-side assert on CUDA)."""
    yt = _labels(y, device=logits.device)
    _check_logits(logits, yt)
    idx = _age_index(yt, logits.shape[1])
    return F.cross_entropy(logits.float(), idx)


def ldl_ce(logits: Tensor, y: Any, sigma: Sigma = 1.0) -> Tensor:
    """Label-distribution cross entropy (Xing eq. 8): ``-sum_k d_k log p_k`` with the
    renormalised Gaussian d (Xing eqs. 6-7, ``gaussian_label_distribution``), mean over the
    batch. It equals ``kl_loss`` plus the (constant) entropy of d, so the gradients match."""
    yt = _labels(y, device=logits.device)
    _check_logits(logits, yt)
    d = gaussian_label_distribution(yt, logits.shape[1], sigma)
    return -(d * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _regression_pred(pred: Tensor, y: Tensor) -> Tensor:
    p = pred.float()
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.shape != y.shape:
        raise ValueError(
            f"pred must be one age per sample, shape (B,) or (B, 1); got {tuple(pred.shape)} "
            f"for {y.shape[0]} labels"
        )
    return p


def mse_loss(pred: Tensor, y: Any) -> Tensor:
    """Mean squared error of a regression output (Xing eq. 9): ``mean (y_hat - y)^2``."""
    yt = _labels(y, device=pred.device)
    return ((_regression_pred(pred, yt) - yt) ** 2).mean()


def mae_loss(pred: Tensor, y: Any) -> Tensor:
    """Mean absolute error of a regression output (Xing eq. 10): ``mean |y_hat - y|``;
    Xing et al. argue for it because it is the metric the model is judged on (eq. 1)."""
    yt = _labels(y, device=pred.device)
    return (_regression_pred(pred, yt) - yt).abs().mean()


def ordinal_targets(y: Any, num_classes: int, age_min: int = 0) -> Tensor:
    """Binary targets of the K-1 ordinal tasks (Xing 3.2.3), (B, K-1) float:
    ``t_k = [age > age_min + k]`` for ``k = 0..K-2``.

    ``age`` is the label rounded half up (``floor(y + 0.5)``), so a real-valued 3.4 has the
    targets of age 3 and 3.6 those of age 4: the ordinal prediction then reconstructs the
    nearest integer age rather than always rounding up. With ``age_min=1`` the thresholds
    are Xing's ``k = 1..C-1``.
    """
    if num_classes < 2:
        raise ValueError(f"ordinal regression needs num_classes >= 2, got {num_classes}")
    yt = _labels(y)
    age = torch.floor(yt + 0.5)
    thresholds = torch.arange(num_classes - 1, device=yt.device, dtype=torch.float32) + age_min
    return (age[:, None] > thresholds[None, :]).float()


def ordinal_bce(ordinal_logits: Tensor, y: Any, age_min: int = 0) -> Tensor:
    """Ordinal regression loss (Xing 3.2.3): binary cross entropy of each of the K-1
    "is the age above age_min + k?" outputs against ``ordinal_targets``, averaged over
    tasks and batch. The K-1 classifiers share one network, as in Xing et al."""
    yt = _labels(y, device=ordinal_logits.device)
    _check_logits(ordinal_logits, yt, "ordinal_logits")
    targets = ordinal_targets(yt, ordinal_logits.shape[1] + 1, age_min)
    return F.binary_cross_entropy_with_logits(ordinal_logits.float(), targets)


def ordinal_age(ordinal_logits: Tensor, age_min: int = 0, hard: bool = False) -> Tensor:
    """Age from the K-1 ordinal outputs (Xing eq. 11): ``age_min + sum_k f_k``.

    ``hard=False`` (default): ``f_k = sigmoid(logit_k)``, a smooth, differentiable
    estimate; ``hard=True``: ``f_k = [sigmoid(logit_k) > 0.5]``, the count of "older than"
    answers. With ``age_min=1`` (thresholds 1..C-1) this is exactly Xing's ``1 + sum f_k``.
    """
    probs = torch.sigmoid(ordinal_logits.float())
    f = (probs > 0.5).float() if hard else probs
    return age_min + f.sum(dim=1)


def _masked_ce(logits: Tensor, labels: Any) -> tuple[Tensor, Tensor]:
    """Mean CE over the samples whose label is >= 0 (-1 = absent) and how many there were.

    Implemented as a masked sum over max(count, 1) -- not ``ignore_index`` with a mean, which
    is NaN when the whole batch lacks the label -- and without a host sync.
    """
    labels = torch.as_tensor(labels, device=logits.device).long()
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (B, C) and labels (B,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    present = labels >= 0
    safe = torch.where(present, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(logits.float(), safe, reduction="none") * present
    count = present.sum()
    return ce.sum() / count.clamp(min=1), count


def multitask_loss(
    age_loss: Tensor,
    gender_logits: Tensor | None,
    gender: Any,
    race_logits: Tensor | None,
    race: Any,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Xing eq. 12: ``L = L_a + alpha L_g + beta L_r`` with softmax CE for gender and race.

    Labels -1 mean "absent" (a sample without gender or race annotation) and are left out of
    that term's mean; a batch with no label for a task adds 0 for it, not NaN. A term whose
    logits or labels are None is skipped.
    """
    total = age_loss
    if gender_logits is not None and gender is not None:
        total = total + alpha * _masked_ce(gender_logits, gender)[0]
    if race_logits is not None and race is not None:
        total = total + beta * _masked_ce(race_logits, race)[0]
    return total


# --------------------------------------------------------------------------------------
# The entry point training calls
# --------------------------------------------------------------------------------------

_LOGIT_LOSSES = ("kl", "base", "sum", "ce", "ldl_ce")


def _need(head_out: Mapping[str, Tensor], key: str, loss_name: str) -> Tensor:
    value = head_out.get(key)
    if value is None:
        raise ValueError(
            f"loss.name={loss_name} needs head output {key!r}, but the head returned "
            f"{sorted(k for k, v in head_out.items() if v is not None)}; check model.head / "
            "model.formulation"
        )
    return value


def compute_loss(
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
    head_out: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    mae_ref: float | None = None,
    stage: int = 1,
) -> tuple[Tensor, dict[str, float]]:
    """The training loss of one head on one batch, and its parts for logging.

    ``head_out``: one head's outputs (``docs/design.md``): ``logits`` (B, K),
    ``local_logits`` (B, K, H', W'), ``age`` (B,), ``ordinal_logits`` (B, K-1),
    ``gender_logits``, ``race_logits``, ``group_logits``. ``batch``: ``age`` float (B,),
    ``age_std`` (NaN when absent), ``gender`` / ``race`` int64 (-1 when absent).

    Age term by ``loss_cfg.name``: ``kl`` (GLAE eq. 2), ``base`` (eq. 5), ``sum`` (eq. 10),
    ``ce`` (Xing eq. 5), ``ldl_ce`` (eq. 8), ``mse`` (eq. 9), ``mae`` (eq. 10),
    ``ordinal_bce`` (3.2.3, thresholds from ``model_cfg.age_min``). The label distribution
    uses ``loss_cfg.sigma`` for every sample (the papers' fixed sigma); ``age_std`` is not
    used for training.

    Stage 2 with ``mae_ref`` (LAE's classifier stage, ``train.stage2.mae_term``): on the
    answering (holistic) logits the l1 term is replaced by LAE eq. 4's
    ``(|y - y_hat| - mae_ref)^2``: ``kl``/``base`` become ``KL + (er - mae)^2`` exactly;
    ``sum`` keeps ``L_loc`` and uses that for its holistic part; ``ce``/``ldl_ce`` add the
    term to their CE. Regression and ordinal formulations have no distribution for it and
    raise.

    Multi-task (``model_cfg.multitask != "none"``, Xing eq. 12): ``alpha * CE_gender +
    beta * CE_race`` for the logits that are present. For ``hybrid`` with ``group_logits``
    the race-gender group (``gender * num_races + race``) is trained with CE instead,
    weighted ``(alpha + beta) / 2``, on samples that have both labels: the joint CE is
    ``CE(gender) + CE(race | gender)``, so with ``alpha == beta`` this is eq. 12's weighting.

    Returns ``(loss, parts)``; ``parts`` holds Python floats (``"loss"`` and the terms, e.g.
    ``"kl"``, ``"er"``, ``"loc"``, ``"hol"``, ``"gender"``), read with a single device sync.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    name = loss_cfg.name
    first = next((v for v in head_out.values() if isinstance(v, Tensor)), None)
    if first is None:
        raise ValueError("head_out holds no tensors; pass one head's output dict")
    device = first.device
    if "age" not in batch:
        raise ValueError("batch has no 'age' labels")
    y = _labels(batch["age"], "batch['age']", device=device)
    sigma, lam = float(loss_cfg.sigma), float(loss_cfg.lambda_er)
    use_mae = stage == 2 and mae_ref is not None
    mae = None
    if use_mae:
        mae = _finite_nonneg(
            mae_ref,
            "mae_ref",
            "it is stage 1's (representation stage's) MAE on the validation set (LAE eq. 5)",
        )
        if name not in _LOGIT_LOSSES:
            raise ValueError(
                f"the LAE stage-2 term (L_er - mae)^2 needs a distribution head, but "
                f"loss.name={name}; turn off train.stage2.mae_term or use one of "
                f"{list(_LOGIT_LOSSES)}"
            )
    parts: dict[str, Tensor] = {}

    def er_term(er: Tensor) -> Tensor:
        """Per-sample l1 term: lambda |y - y_hat| or, in LAE stage 2, (|y - y_hat| - mae)^2."""
        if mae is not None:
            parts["er_mae"] = ((er - mae) ** 2).mean().detach()
            return (er - mae) ** 2
        return lam * er

    if name in ("kl", "base", "sum"):
        kl, er, _ = _base_terms(_need(head_out, "logits", name), y, sigma)
        parts["kl"], parts["er"] = kl.mean().detach(), er.mean().detach()
        if name == "kl" and mae is None:
            age_loss = kl.mean()
        else:
            age_loss = (kl + er_term(er)).mean()
        if name == "sum":
            lkl, ler = _local_terms(_need(head_out, "local_logits", name), y, sigma)
            loc = (lkl + lam * ler).mean()
            parts["hol"], parts["loc"] = age_loss.detach(), loc.detach()
            age_loss = loc + age_loss
    elif name in ("ce", "ldl_ce"):
        logits = _need(head_out, "logits", name)
        age_loss = softmax_ce(logits, y) if name == "ce" else ldl_ce(logits, y, sigma)
        parts[name] = age_loss.detach()
        er = (y - expected_age(logits=logits)).abs()
        parts["er"] = er.mean().detach()
        if mae is not None:
            age_loss = age_loss + er_term(er).mean()
    elif name in ("mse", "mae"):
        pred = _need(head_out, "age", name)
        age_loss = mse_loss(pred, y) if name == "mse" else mae_loss(pred, y)
        parts[name] = age_loss.detach()
    elif name == "ordinal_bce":
        age_loss = ordinal_bce(_need(head_out, "ordinal_logits", name), y, model_cfg.age_min)
        parts["ordinal_bce"] = age_loss.detach()
    else:
        raise ValueError(f"unknown loss.name={name!r}")
    parts["age"] = age_loss.detach()

    total = age_loss
    if model_cfg.multitask != "none":
        gender, race = batch.get("gender"), batch.get("race")
        group_logits = head_out.get("group_logits")
        if model_cfg.multitask == "hybrid" and group_logits is not None:
            if gender is not None and race is not None:
                g = torch.as_tensor(gender, device=device).long()
                r = torch.as_tensor(race, device=device).long()
                n_groups = model_cfg.num_genders * model_cfg.num_races
                if group_logits.ndim != 2 or group_logits.shape[1] != n_groups:
                    raise ValueError(
                        f"group_logits must be (B, num_genders * num_races) = (B, {n_groups}),"
                        f" got {tuple(group_logits.shape)}"
                    )
                both = (g >= 0) & (r >= 0)
                group = torch.where(both, g * model_cfg.num_races + r, torch.full_like(g, -1))
                ce, _ = _masked_ce(group_logits, group)
                parts["group"] = ce.detach()
                total = total + 0.5 * (loss_cfg.alpha + loss_cfg.beta) * ce
        else:
            for key, labels, weight in (
                ("gender", gender, loss_cfg.alpha),
                ("race", race, loss_cfg.beta),
            ):
                logits = head_out.get(f"{key}_logits")
                if logits is None or labels is None:
                    continue
                ce, _ = _masked_ce(logits, torch.as_tensor(labels, device=device))
                parts[key] = ce.detach()
                total = total + weight * ce
    parts = {"loss": total.detach(), **parts}
    values = torch.stack([v.float().reshape(()) for v in parts.values()]).tolist()
    return total, dict(zip(parts.keys(), (float(v) for v in values)))
