"""Xing et al. 3.3's multi-task architectures: age with gender and race.

* ``ParallelMultiTask`` (3.3.1): shared trunk; age, gender and race heads side by side on the
  final features (gender/race: GAP + Linear).
* ``DeepMultiTask`` (3.3.2): deeply supervised; race reads an early stage map, gender the next
  stage, age the last. Each side branch is a 1x1 conv dimensionality reduction (+BN, ReLU),
  GAP, and two non-linear FC layers before its classifier, as in Xing's Fig. 4(b). Xing's net
  has three conv blocks (race at conv1, gender at conv2, age at the top); on a timm trunk we
  map them onto the last three ``feature_info`` levels (ResNet: layer2, layer3, layer4).
* ``HybridMultiTask`` (3.3.3): a race-gender group classifier over a configurable group set
  (``model.hybrid_groups``: Morph's BF, BM, WF, WM by default, or every race x gender group
  as UTKFace allows), one age estimator per group, and the paper's fusion
  ``F_a = sum_k F_group_k * F_k`` (eq. 13 in the paper's numbering, printed beside eq. 12):
  ``age`` is exactly that weighted sum of the group estimators' own answers (each answers as
  its formulation does, e.g. the ordinal count). For training, distribution formulations
  also fuse the group distributions (``p = sum_k g_k p_k``, as log-probabilities in
  ``logits``: with the expectation answer its mean is eq. 13 again, by linearity) and
  ordinal fuses the per-threshold probabilities the same way. Gender and race logits are the
  log-marginals of the group distribution ("we can also obtain the race and gender
  predictions from the group classification part"); a race no group covers gets probability
  0. ``group_raw`` (B, N, D) holds every estimator's raw output, so Xing's step 2 can train
  each estimator on its own group's images; ``group_map`` (G, R) maps (gender, race) labels to
  the group index (-1: no group), so the loss needs no copy of the group set.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .formulation import Formulation
from .heads import AgeHead

__all__ = [
    "HYBRID_GROUP_SETS",
    "DeepMultiTask",
    "HybridMultiTask",
    "ParallelMultiTask",
    "SideBranch",
    "hybrid_groups",
]

#: ``model.hybrid_groups``: Morph's four race-gender groups (Xing 3.3.3) or all of them.
HYBRID_GROUP_SETS = ("morph", "race_gender")
# Label codes (ageray.data.labels): gender 0 male, 1 female; race 0 white, 1 black.
_MORPH = ((1, 1), (0, 1), (1, 0), (0, 0))  # BF, BM, WF, WM as (gender, race)

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


def hybrid_groups(
    name: str, *, num_genders: int = 2, num_races: int = 5
) -> tuple[tuple[int, int], ...]:
    """The (gender, race) label pair of each group of the set ``name``, in group order.

    ``morph``: BF, BM, WF, WM, Xing's groups (Morph II's training splits hold only black and
    white faces; other races belong to no group: they are left out of the group loss and of
    step 2, and the fusion still answers for them). ``race_gender``: every pair, group
    ``gender * num_races + race``.
    """
    if name == "morph":
        if num_genders < 2 or num_races < 2:
            raise ValueError(
                f"model.hybrid_groups=morph needs gender codes 0/1 and race codes 0 (white) and "
                f"1 (black); num_genders={num_genders}, num_races={num_races} lack them"
            )
        return _MORPH
    if name == "race_gender":
        return tuple((g, r) for g in range(num_genders) for r in range(num_races))
    raise ValueError(f"model.hybrid_groups={name!r} is not one of {list(HYBRID_GROUP_SETS)}")


class HybridMultiTask(AgeHead):
    """Group classifier + one age estimator per race-gender group + eq. 13's fusion.

    Each estimator is a small MLP on the trunk's pooled features (Linear, ReLU, dropout,
    Linear): Xing's group-specific part is several layers deep (Conv3 to FC2), and a single
    linear layer per group would leave the groups nothing of their own to learn.
    """

    def __init__(
        self,
        in_channels: int,
        formulation: Formulation,
        *,
        groups: tuple[tuple[int, int], ...] | None = None,
        num_genders: int = 2,
        num_races: int = 5,
        hidden: int = 256,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if num_genders < 1 or num_races < 1:
            raise ValueError(
                f"multitask=hybrid needs num_genders and num_races >= 1, got {num_genders} "
                f"and {num_races}"
            )
        if groups is None:
            groups = hybrid_groups("race_gender", num_genders=num_genders, num_races=num_races)
        groups = tuple((int(g), int(r)) for g, r in groups)
        if len(groups) < 2 or len(set(groups)) != len(groups):
            raise ValueError(f"multitask=hybrid needs at least 2 distinct groups, got {groups}")
        bad = [(g, r) for g, r in groups if not (0 <= g < num_genders and 0 <= r < num_races)]
        if bad:
            raise ValueError(
                f"hybrid groups {bad} lie outside num_genders={num_genders} x num_races={num_races}"
            )
        self.formulation = formulation
        self.num_genders = num_genders
        self.num_races = num_races
        self.groups = groups
        self.num_groups = len(groups)
        group_map = torch.full((num_genders, num_races), -1, dtype=torch.long)
        onehot = torch.zeros(self.num_groups, num_genders * num_races)
        for k, (g, r) in enumerate(groups):
            group_map[g, r] = k
            onehot[k, g * num_races + r] = 1.0
        # Derived from the group set (model.json), so not saved with the weights.
        self.register_buffer("group_map", group_map, persistent=False)
        self.register_buffer("group_joint", onehot, persistent=False)
        self.pool = _pool()
        self.drop = nn.Dropout(drop_rate)
        self.group = nn.Linear(in_channels, self.num_groups)
        self.age_heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(in_channels, hidden),
                nn.ReLU(),
                nn.Dropout(drop_rate),
                nn.Linear(hidden, formulation.out_dim),
            )
            for _ in range(self.num_groups)
        )
        for expert in self.age_heads:
            formulation.init_layer(expert[-1])

    def classifier_layers(self) -> list[nn.Module]:
        return [expert[-1] for expert in self.age_heads]

    def group_labels(self, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        """Group index per sample from its labels; -1 where a label is absent or the pair
        belongs to no group."""
        gender = torch.as_tensor(gender, device=self.group_map.device).long()
        race = torch.as_tensor(race, device=self.group_map.device).long()
        ok = (gender >= 0) & (gender < self.num_genders) & (race >= 0) & (race < self.num_races)
        idx = self.group_map[
            gender.clamp(0, self.num_genders - 1), race.clamp(0, self.num_races - 1)
        ]
        return torch.where(ok, idx, torch.full_like(idx, -1))

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
        group_ages = form.age_of_raw(raw)  # (B, N): each estimator's own answer
        out: dict[str, torch.Tensor] = {
            "group_logits": group_logits,
            "group_raw": raw,
            "group_ages": group_ages,
            "group_map": self.group_map,
            "age": (g * group_ages).sum(-1),
        }
        if form.is_distribution:
            p = torch.einsum("bn,bnk->bk", g, torch.softmax(raw.float(), -1))
            out["logits"] = torch.log(p.clamp_min(_TINY32))
        elif form.name == "ordinal":
            q = torch.einsum("bn,bnk->bk", g, torch.sigmoid(raw.float()))
            out["ordinal_logits"] = torch.logit(q, eps=1e-6)
        joint = (g @ self.group_joint).view(-1, self.num_genders, self.num_races)
        out["gender_logits"] = torch.log(joint.sum(2).clamp_min(_TINY32))
        out["race_logits"] = torch.log(joint.sum(1).clamp_min(_TINY32))
        return out
