"""Xing et al. 3.2's five formulations: what the last layer outputs and how it becomes an age.

==========  ==========  =============================================================
name        outputs     age
==========  ==========  =============================================================
ldl         K logits    expectation sum_k k * softmax_k over ages 0..K-1 (GLAE eq. 3)
onehot      K logits    same expectation (DEX); trained with softmax cross entropy
mse, mae    1 number    the number itself (the bias starts at the middle of the range)
ordinal     K-1 logits  age_min + sum_k sigmoid(logit_k)  (Xing eq. 11; age_min=1 there)
==========  ==========  =============================================================

The ordinal outputs are the binary "age > age_min + k" classifiers, k = 0..K-2, so the
predicted range is age_min..age_min+K-1, like the K classes of the distribution heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DISTRIBUTION", "FORMULATIONS", "Formulation", "age_from_probs"]

FORMULATIONS = ("ldl", "onehot", "mse", "mae", "ordinal")
DISTRIBUTION = ("ldl", "onehot")


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

    def __post_init__(self) -> None:
        if self.name not in FORMULATIONS:
            raise ValueError(f"formulation={self.name!r} is not one of {list(FORMULATIONS)}")
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

    def outputs(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw last-layer outputs (B, out_dim) -> {"logits"|"ordinal_logits", "age"}."""
        if self.name in DISTRIBUTION:
            return {"logits": raw, "age": age_from_probs(torch.softmax(raw.float(), -1))}
        if self.name == "ordinal":
            return {
                "ordinal_logits": raw,
                "age": self.age_min + torch.sigmoid(raw.float()).sum(-1),
            }
        return {"age": raw[:, 0].float()}
