"""Xing et al. 3.3's multi-task architectures: age with gender and race.

* ``ParallelMultiTask`` (3.3.1): shared trunk; age, gender and race heads side by side on the
  final features (gender/race: GAP + Linear).
* ``DeepMultiTask`` (3.3.2): deeply supervised; race reads an early stage map, gender the next
  stage, age the last. Each side branch is a 1x1 conv dimensionality reduction (+BN, ReLU),
  GAP, and two non-linear FC layers before its classifier, as in Xing's Fig. 4(b). Xing's net
  has three conv blocks (race at conv1, gender at conv2, age at the top); on a timm trunk we
  map them onto the last three ``feature_info`` levels (ResNet: layer2, layer3, layer4).
* ``HybridMultiTask`` (3.3.3): a race-gender group classifier over G*R groups (group =
  gender * R + race), one age estimator per group, and eq. 13's fusion
  ``F_a = sum_k F_group_k * F_k``. For distribution formulations the group distributions are
  fused (``p = sum_k g_k p_k``; its expectation is exactly eq. 13 on the group ages, by
  linearity) and returned as log-probabilities in ``logits``; for ordinal the per-threshold
  probabilities are fused the same way. Gender and race logits are the log-marginals of the
  group distribution ("we can also obtain the race and gender predictions from the group
  classification part").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .formulation import Formulation, age_from_probs
from .heads import AgeHead

__all__ = ["DeepMultiTask", "HybridMultiTask", "ParallelMultiTask", "SideBranch"]

_TINY32 = torch.finfo(torch.float32).tiny


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class ParallelMultiTask(AgeHead):
    """An age head plus GAP + Linear gender and race heads on the same final features."""

    def __init__(
        self,
        age_head: AgeHead,
        in_channels: int,
        *,
        num_genders: int = 2,
        num_races: int = 5,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.age = age_head
        self.formulation = age_head.formulation
        self.stage_indices = age_head.stage_indices
        self.pool = _pool()
        self.drop = nn.Dropout(drop_rate)
        self.gender = nn.Linear(in_channels, num_genders)
        self.race = nn.Linear(in_channels, num_races)

    def classifier_layers(self) -> list[nn.Module]:
        return self.age.classifier_layers()

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        out = self.age(features, stages, return_local)
        pooled = self.drop(self.pool(features))
        out["gender_logits"] = self.gender(pooled)
        out["race_logits"] = self.race(pooled)
        return out


class SideBranch(nn.Sequential):
    """Xing 3.3.2's side classifier: Conv1x1 reduction + BN + ReLU, GAP, two FC + ReLU
    (+dropout), final Linear. GAP keeps it independent of the input size."""

    def __init__(
        self,
        in_channels: int,
        *,
        num_outputs: int,
        reduce: int = 128,
        hidden: int = 128,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, reduce, 1, bias=False),
            nn.BatchNorm2d(reduce),
            nn.ReLU(),
            _pool(),
            nn.Linear(reduce, hidden),
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(drop_rate),
            nn.Linear(hidden, num_outputs),
        )


class DeepMultiTask(AgeHead):
    """Age at the last feature map; race and gender side branches on earlier stage maps.

    ``race_index`` / ``gender_index`` index ``Backbone.feature_info`` (non-negative); the
    model's forward passes those stage maps in ``stages``. Everything after ``age_head`` is
    keyword-only: seven ints in a row (indices, channels, class counts) swap silently.
    """

    def __init__(
        self,
        age_head: AgeHead,
        *,
        race_index: int,
        race_channels: int,
        gender_index: int,
        gender_channels: int,
        num_genders: int = 2,
        num_races: int = 5,
        reduce: int = 128,
        hidden: int = 128,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if race_index < 0 or gender_index < 0:
            raise ValueError("DeepMultiTask: pass non-negative stage indices")
        self.age = age_head
        self.formulation = age_head.formulation
        self.race_index = race_index
        self.gender_index = gender_index
        self.stage_indices = tuple(sorted({*age_head.stage_indices, race_index, gender_index}))
        branch = {"reduce": reduce, "hidden": hidden, "drop_rate": drop_rate}
        self.race = SideBranch(race_channels, num_outputs=num_races, **branch)
        self.gender = SideBranch(gender_channels, num_outputs=num_genders, **branch)

    def classifier_layers(self) -> list[nn.Module]:
        return self.age.classifier_layers()

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        if stages is None or self.race_index not in stages or self.gender_index not in stages:
            raise ValueError(
                f"DeepMultiTask needs stage maps {self.race_index} (race) and "
                f"{self.gender_index} (gender); call it through AgeModel.forward"
            )
        out = self.age(features, stages, return_local)
        out["race_logits"] = self.race(stages[self.race_index])
        out["gender_logits"] = self.gender(stages[self.gender_index])
        return out


class HybridMultiTask(AgeHead):
    """Group classifier + one age estimator per race-gender group + eq. 13 fusion."""

    def __init__(
        self,
        in_channels: int,
        formulation: Formulation,
        *,
        num_genders: int = 2,
        num_races: int = 5,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if num_genders < 1 or num_races < 1 or num_genders * num_races < 2:
            raise ValueError(
                f"multitask=hybrid needs at least 2 race-gender groups, got num_genders="
                f"{num_genders} x num_races={num_races}"
            )
        self.formulation = formulation
        self.num_genders = num_genders
        self.num_races = num_races
        self.num_groups = num_genders * num_races
        self.pool = _pool()
        self.drop = nn.Dropout(drop_rate)
        self.group = nn.Linear(in_channels, self.num_groups)
        self.age_heads = nn.ModuleList(
            nn.Linear(in_channels, formulation.out_dim) for _ in range(self.num_groups)
        )
        for layer in self.age_heads:
            formulation.init_layer(layer)

    def classifier_layers(self) -> list[nn.Module]:
        return list(self.age_heads)

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        pooled = self.drop(self.pool(features))
        group_logits = self.group(pooled)
        raw = torch.stack([head(pooled) for head in self.age_heads], 1)  # (B, N, D)
        return self.fuse(group_logits, raw)

    def fuse(self, group_logits: torch.Tensor, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 13 on group logits (B, N) and per-group raw outputs (B, N, D)."""
        g = torch.softmax(group_logits.float(), -1)
        form = self.formulation
        out: dict[str, torch.Tensor] = {"group_logits": group_logits}
        if form.is_distribution:
            p_n = torch.softmax(raw.float(), -1)
            p = torch.einsum("bn,bnk->bk", g, p_n)
            out["logits"] = torch.log(p.clamp_min(_TINY32))
            out["age"] = age_from_probs(p)
            out["group_ages"] = age_from_probs(p_n)
        elif form.name == "ordinal":
            q_n = torch.sigmoid(raw.float())
            q = torch.einsum("bn,bnk->bk", g, q_n)
            out["ordinal_logits"] = torch.logit(q, eps=1e-6)
            out["age"] = form.age_min + q.sum(-1)
            out["group_ages"] = form.age_min + q_n.sum(-1)
        else:
            ages = raw[..., 0].float()
            out["age"] = (g * ages).sum(-1)
            out["group_ages"] = ages
        joint = g.view(-1, self.num_genders, self.num_races)
        out["gender_logits"] = torch.log(joint.sum(2).clamp_min(_TINY32))
        out["race_logits"] = torch.log(joint.sum(1).clamp_min(_TINY32))
        return out
