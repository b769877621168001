"""Xing et al.'s losses: the five formulations (3.2: one-hot, label distribution, MSE, MAE,
ordinal regression) and the multi-task terms (3.3: eq. 12's gender and race cross entropies,
the hybrid net's race-gender group)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .distribution import gaussian_label_distribution
from .targets import Sigma, _age_index, _check_logits, _labels

__all__ = [
    "group_labels",
    "group_loss",
    "ldl_ce",
    "mae_loss",
    "masked_ce",
    "mse_loss",
    "multitask_loss",
    "ordinal_age",
    "ordinal_bce",
    "ordinal_targets",
    "softmax_ce",
]


def softmax_ce(logits: Tensor, y: Any) -> Tensor:
    """One-hot softmax cross entropy (Xing eq. 5): the class is the age ``floor(y + 0.5)``
    (real-valued labels rounded half up), mean over the batch.

    Ages above the last class count as the last class (the house rule, ``ageray.data.labels``:
    the classes 0..100 clip above 100, as the label distribution and the ordinal targets do
    too; UTKFace reaches 116). A negative age is an error (a device-side assert on CUDA)."""
    yt = _labels(y, device=logits.device)
    _check_logits(logits, yt)
    idx = _age_index(yt.clamp(max=logits.shape[1] - 1), logits.shape[1])
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


def masked_ce(logits: Tensor, labels: Any) -> tuple[Tensor, Tensor]:
    """Mean softmax CE over the samples whose label is >= 0 (-1 = absent) and how many there were.

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
        total = total + alpha * masked_ce(gender_logits, gender)[0]
    if race_logits is not None and race is not None:
        total = total + beta * masked_ce(race_logits, race)[0]
    return total


def group_labels(gender: Any, race: Any, group_map: Tensor) -> Tensor:
    """The hybrid net's race-gender group of each sample, (B,) int64: ``group_map[gender,
    race]`` (the head's (G, R) table, -1 for a pair in no group), -1 where either label is
    absent (-1) or outside the table. Why the table comes from the head: the group set is the
    model's (``model.hybrid_groups``), and a second copy here could disagree with it."""
    g = torch.as_tensor(gender, device=group_map.device).long()
    r = torch.as_tensor(race, device=group_map.device).long()
    num_g, num_r = group_map.shape
    ok = (g >= 0) & (g < num_g) & (r >= 0) & (r < num_r)
    idx = group_map[g.clamp(0, num_g - 1), r.clamp(0, num_r - 1)]
    return torch.where(ok, idx, torch.full_like(idx, -1))


def group_loss(group_logits: Tensor, groups: Any) -> Tensor:
    """Softmax CE of the race-gender group classifier (Xing 3.3.3, step 1 of the hybrid
    net's training) over the samples that belong to a group (label >= 0); 0 for a batch
    where none does."""
    return masked_ce(group_logits, groups)[0]
