"""Label distributions and every training loss of the three papers.

Paper keys used in the docstrings: **GLAE** (papers/001: eqs. 1-10), **LAE**
(papers/000: eqs. 1-5), **Xing** (papers/003: eqs. 5-12), and AM-softmax (Wang et al. 2018,
the identity-pretraining loss LAE 2.3 uses).

One module per family: ``distribution`` (GLAE / LAE), ``amsoftmax`` (identity pretraining),
``xing`` (the five formulations and the multi-task terms), ``compute`` (``compute_loss``, the
one entry point the training loop calls, and the ``LOSSES`` registry of age terms it picks
from by ``loss.name``, ``@register_loss``; everything else is a building block with its own
test), ``common`` (label and shape helpers).

Conventions:

* The classifier's K outputs are the ages ``0..K-1`` (K = 101: ages 0..100, GLAE III-A).
* Logits are cast to float32 before softmax/log-softmax, so the losses are accurate under
  bf16 autocast; every log-probability comes from ``log_softmax`` (never ``log(softmax)``).
* Batch reduction is the mean over samples (the papers' 1/N), unless ``reduction`` says
  otherwise.
* Real-valued labels are binned to an integer age with round-half-up, ``floor(y + 0.5)``,
  wherever a class index is needed (one-hot CE, ordinal targets), as in ``ageray.metrics``.
"""

from .amsoftmax import AMSoftmaxHead, am_softmax_logits, am_softmax_loss
from .compute import LOSSES, AgeTerms, compute_loss, loss_entry, register_loss
from .distribution import (
    base_loss,
    er_loss,
    expected_age,
    gaussian_label_distribution,
    holistic_loss,
    kl_loss,
    lae_stage2_loss,
    local_loss,
    sum_loss,
)
from .xing import (
    group_labels,
    group_loss,
    ldl_ce,
    mae_loss,
    masked_ce,
    mse_loss,
    multitask_loss,
    ordinal_age,
    ordinal_bce,
    ordinal_targets,
    softmax_ce,
)

__all__ = [
    "LOSSES",
    "AMSoftmaxHead",
    "AgeTerms",
    "am_softmax_logits",
    "am_softmax_loss",
    "base_loss",
    "compute_loss",
    "er_loss",
    "expected_age",
    "gaussian_label_distribution",
    "group_labels",
    "group_loss",
    "holistic_loss",
    "kl_loss",
    "lae_stage2_loss",
    "ldl_ce",
    "local_loss",
    "loss_entry",
    "mae_loss",
    "masked_ce",
    "mse_loss",
    "multitask_loss",
    "ordinal_age",
    "ordinal_bce",
    "ordinal_targets",
    "register_loss",
    "softmax_ce",
    "sum_loss",
]
