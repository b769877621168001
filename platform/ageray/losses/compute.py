"""``compute_loss``: the one loss entry point the training loop calls (one head, one batch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ageray.config import LossConfig, ModelConfig

from .common import _finite_nonneg, _labels
from .distribution import _base_terms, _local_terms, expected_age
from .xing import (
    group_labels,
    ldl_ce,
    mae_loss,
    masked_ce,
    mse_loss,
    ordinal_bce,
    softmax_ce,
)

__all__ = ["compute_loss"]

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
    the race-gender group (``head_out["group_map"][gender, race]``, the head's group set) is
    trained with CE instead, weighted ``(alpha + beta) / 2``, on samples that belong to a
    group: the joint CE is ``CE(gender) + CE(race | gender)``, so with ``alpha == beta`` this
    is eq. 12's weighting.

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
                group_map = head_out.get("group_map")
                if group_map is None:  # a head without its table: every race x gender pair
                    n_g, n_r = model_cfg.num_genders, model_cfg.num_races
                    group_map = torch.arange(n_g * n_r, device=device).view(n_g, n_r)
                n_groups = int(group_map.max()) + 1
                if group_logits.ndim != 2 or group_logits.shape[1] != n_groups:
                    raise ValueError(
                        f"group_logits must be (B, number of groups) = (B, {n_groups}), got "
                        f"{tuple(group_logits.shape)}"
                    )
                group = group_labels(gender, race, group_map.to(device))
                ce, _ = masked_ce(group_logits, group)
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
                ce, _ = masked_ce(logits, torch.as_tensor(labels, device=device))
                parts[key] = ce.detach()
                total = total + weight * ce
    parts = {"loss": total.detach(), **parts}
    values = torch.stack([v.float().reshape(()) for v in parts.values()]).tolist()
    return total, dict(zip(parts.keys(), (float(v) for v in values)))
