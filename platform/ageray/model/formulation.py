"""Xing et al. 3.2's five formulations: what the last layer outputs and how it becomes an age.

==========  ==========  =================================  ===============================
name        outputs     age, ``answer="paper"`` (default)  age, ``answer="expectation"``
==========  ==========  =================================  ===============================
ldl         K logits    sum_k k * softmax_k (GLAE eq. 3)   the same
onehot      K logits    argmax_k softmax_k (Xing 3.2.1)    sum_k k * softmax_k (DEX)
mse, mae    1 number    the number itself                  the same
ordinal     K-1 logits  age_min + #{k: sigmoid_k > 0.5}    age_min + sum_k sigmoid_k
                        (Xing eq. 11; age_min=1 there)
==========  ==========  =================================  ===============================

Why two answers: Xing et al. read the one-hot net by its most likely class and the ordinal net
by counting its binary classifiers' "older than" votes; the soft versions (expectation, sum of
probabilities) are smoother and usually a little better, so they stay available
(``model.answer``) for comparison, never silently swapped in.

The ordinal outputs are the binary "age > age_min + k" classifiers, k = 0..K-2, so the
predicted range is age_min..age_min+K-1, like the K classes of the distribution heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ANSWERS", "DISTRIBUTION", "FORMULATIONS", "Formulation", "age_from_probs"]

FORMULATIONS = ("ldl", "onehot", "mse", "mae", "ordinal")
DISTRIBUTION = ("ldl", "onehot")
ANSWERS = ("paper", "expectation")


def age_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """The age a distribution head answers: sum_k k * p_k over ages 0..K-1 along the LAST
    axis (GLAE eq. 3), (..., K) -> (...).

    Not named ``expected_age``: that is ``ageray.losses.expected_age``, which also takes
    logits, reduces along ``dim`` (1 by default, for per-pixel maps) and shifts by
    ``age_min``; two functions of one name with different axes would be a trap.
    """
    ages = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
    return (probs * ages).sum(-1)


@dataclass(frozen=True)
class Formulation:
    """One of ``FORMULATIONS`` for ``num_classes`` ages; turns raw outputs into the head dict."""

    name: str = "ldl"
    num_classes: int = 101
    age_min: int = 0
    answer: str = "paper"

    def __post_init__(self) -> None:
        if self.name not in FORMULATIONS:
            raise ValueError(f"formulation={self.name!r} is not one of {list(FORMULATIONS)}")
        if self.answer not in ANSWERS:
            raise ValueError(f"model.answer={self.answer!r} is not one of {list(ANSWERS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes}: need at least 2 ages")
        if self.age_min < 0:
            raise ValueError(f"age_min={self.age_min} must be >= 0")
        if self.age_min and self.name in DISTRIBUTION:
            raise ValueError(
                f"age_min={self.age_min} with formulation={self.name}: distribution heads "
                f"predict class index = age over 0..{self.num_classes - 1}; age_min only shifts "
                "the ordinal thresholds. Set model.age_min=0 (or formulation=ordinal)"
            )

    @property
    def is_distribution(self) -> bool:
        return self.name in DISTRIBUTION

    @property
    def out_dim(self) -> int:
        if self.name in DISTRIBUTION:
            return self.num_classes
        if self.name == "ordinal":
            return self.num_classes - 1
        return 1

    def init_layer(self, layer: nn.Linear) -> None:
        """Regression outputs start at the middle of the age range, so early steps train
        features rather than a 50-year offset."""
        if self.name in ("mse", "mae") and layer.bias is not None:
            nn.init.constant_(layer.bias, self.age_min + (self.num_classes - 1) / 2)

    @property
    def argmax(self) -> bool:
        """Whether a distribution is read by its most likely age (one-hot, ``paper``)."""
        return self.name == "onehot" and self.answer == "paper"

    def age_of_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """The answer of a distribution over ages 0..K-1 along the last axis, (..., K) ->
        (...): the argmax for one-hot read as the paper, else the expectation."""
        if self.argmax:
            return probs.argmax(-1).to(probs.dtype)
        return age_from_probs(probs)

    def age_of_ordinal(self, probs: torch.Tensor) -> torch.Tensor:
        """The answer of the K-1 "older than age_min + k" probabilities, (..., K-1) -> (...):
        Xing eq. 11's count of classifiers that say yes (``paper``) or the soft sum."""
        votes = (probs > 0.5).to(probs.dtype) if self.answer == "paper" else probs
        return self.age_min + votes.sum(-1)

    def age_of_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """The answer of raw last-layer outputs (..., out_dim) -> (...), float32."""
        if self.name in DISTRIBUTION:
            return self.age_of_probs(torch.softmax(raw.float(), -1))
        if self.name == "ordinal":
            return self.age_of_ordinal(torch.sigmoid(raw.float()))
        return raw[..., 0].float()

    def outputs(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw last-layer outputs (B, out_dim) -> {"logits"|"ordinal_logits", "age"}."""
        key = {"ldl": "logits", "onehot": "logits", "ordinal": "ordinal_logits"}.get(self.name)
        out = {"age": self.age_of_raw(raw)}
        if key is not None:
            out[key] = raw
        return out
