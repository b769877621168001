"""``compute_loss``: the one loss entry point the training loop calls (one head, one batch),
and the age terms it picks by ``loss.name`` from a registry (timm style).

``@register_loss("kl", distribution=True)`` adds an age term: a small function of one
``AgeTerms`` (the head's outputs, the labels, sigma, lambda, LAE's stage-2 ``mae`` and the
``parts`` it logs into) that returns the batch's age loss. ``distribution=True`` says the
term reads a distribution head, so LAE's stage-2 ``(L_er - mae)^2`` term applies to it. Why
a registry: each formulation's loss is read and tested on its own, and a new one is one
decorated function; an unknown ``loss.name`` fails listing the registered ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ageray.config import LossConfig, ModelConfig

from .distribution import _base_terms, _local_terms, expected_age
from .targets import _finite_nonneg, _labels
from .xing import (
    group_labels,
    ldl_ce,
    mae_loss,
    masked_ce,
    mse_loss,
    ordinal_bce,
    softmax_ce,
)

__all__ = ["LOSSES", "AgeTerms", "LossEntry", "compute_loss", "loss_entry", "register_loss"]


@dataclass
class AgeTerms:
    """What an age term reads (one head, one batch) and the ``parts`` it logs into."""

    name: str  # loss.name, for error messages
    head_out: Mapping[str, Tensor]
    y: Tensor  # float ages (B,)
    sigma: float  # the label distribution's sigma (loss.sigma)
    lam: float  # lambda of the l1 term (loss.lambda_er)
    mae: float | None  # LAE stage 2's validated mae_ref, or None
    age_min: int  # ordinal thresholds start here (model.age_min)
    parts: dict[str, Tensor] = field(default_factory=dict)

    def need(self, key: str) -> Tensor:
        """The head output ``key``; a head without it fails naming what it has."""
        value = self.head_out.get(key)
        if value is None:
            raise ValueError(
                f"loss.name={self.name} needs head output {key!r}, but the head returned "
                f"{sorted(k for k, v in self.head_out.items() if v is not None)}; check "
                "model.head / model.formulation"
            )
        return value

    def er_term(self, er: Tensor) -> Tensor:
        """Per-sample l1 term: lambda |y - y_hat| or, in LAE stage 2, (|y - y_hat| - mae)^2."""
        if self.mae is not None:
            self.parts["er_mae"] = ((er - self.mae) ** 2).mean().detach()
            return (er - self.mae) ** 2
        return self.lam * er


@dataclass(frozen=True)
class LossEntry:
    """A registered age term; ``distribution``: it takes LAE's stage-2 mae term."""

    name: str
    fn: Callable[[AgeTerms], Tensor]
    distribution: bool = False


LOSSES: dict[str, LossEntry] = {}


def register_loss(
    name: str, *, distribution: bool = False
) -> Callable[[Callable[[AgeTerms], Tensor]], Callable[[AgeTerms], Tensor]]:
    """Decorator: register an age term as ``loss.name=<name>``."""

    def add(fn: Callable[[AgeTerms], Tensor]) -> Callable[[AgeTerms], Tensor]:
        if name in LOSSES and LOSSES[name].fn is not fn:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = LossEntry(name, fn, distribution)
        return fn

    return add


def loss_entry(name: str) -> LossEntry:
    """The registered age term ``name``; unknown names fail with the registered ones."""
    if name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"loss.name={name!r} is not registered{hint} (registered: {sorted(LOSSES)})")


def _distribution_losses() -> list[str]:
    return [n for n, e in LOSSES.items() if e.distribution]


# ------------------------------------------------------------------------ age terms


def _holistic(t: AgeTerms) -> tuple[Tensor, Tensor]:
    """GLAE eq. 2's KL and the l1 error of the holistic logits, per sample (logged)."""
    kl, er, _ = _base_terms(t.need("logits"), t.y, t.sigma)
    t.parts["kl"], t.parts["er"] = kl.mean().detach(), er.mean().detach()
    return kl, er


@register_loss("kl", distribution=True)
def _kl(t: AgeTerms) -> Tensor:
    """GLAE eq. 2 (in LAE stage 2: KL + (er - mae)^2, eq. 4)."""
    kl, er = _holistic(t)
    return kl.mean() if t.mae is None else (kl + t.er_term(er)).mean()


@register_loss("base", distribution=True)
def _base(t: AgeTerms) -> Tensor:
    """GLAE eq. 5: KL + lambda * er (LAE L_fe, eq. 3)."""
    kl, er = _holistic(t)
    return (kl + t.er_term(er)).mean()


@register_loss("sum", distribution=True)
def _sum(t: AgeTerms) -> Tensor:
    """GLAE eq. 10: L_loc (per-pixel, PA) + L_hol (eq. 5 on the holistic logits)."""
    hol = _base(t)
    lkl, ler = _local_terms(t.need("local_logits"), t.y, t.sigma)
    loc = (lkl + t.lam * ler).mean()
    t.parts["hol"], t.parts["loc"] = hol.detach(), loc.detach()
    return loc + hol


def _ce_with_er(t: AgeTerms, logits: Tensor, ce: Tensor) -> Tensor:
    """A CE term, its l1 error logged, plus LAE's stage-2 term when it applies."""
    t.parts[t.name] = ce.detach()
    er = (t.y - expected_age(logits=logits)).abs()
    t.parts["er"] = er.mean().detach()
    return ce if t.mae is None else ce + t.er_term(er).mean()


@register_loss("ce", distribution=True)
def _ce(t: AgeTerms) -> Tensor:
    """Xing eq. 5: one-hot softmax cross entropy."""
    logits = t.need("logits")
    return _ce_with_er(t, logits, softmax_ce(logits, t.y))


@register_loss("ldl_ce", distribution=True)
def _ldl_ce(t: AgeTerms) -> Tensor:
    """Xing eq. 8: label-distribution cross entropy."""
    logits = t.need("logits")
    return _ce_with_er(t, logits, ldl_ce(logits, t.y, t.sigma))


@register_loss("mse")
def _mse(t: AgeTerms) -> Tensor:
    """Xing eq. 9: squared error of the regressed age."""
    loss = mse_loss(t.need("age"), t.y)
    t.parts["mse"] = loss.detach()
    return loss


@register_loss("mae")
def _mae(t: AgeTerms) -> Tensor:
    """Xing eq. 10: absolute error of the regressed age."""
    loss = mae_loss(t.need("age"), t.y)
    t.parts["mae"] = loss.detach()
    return loss


@register_loss("ordinal_bce")
def _ordinal_bce(t: AgeTerms) -> Tensor:
    """Xing 3.2.3: K-1 binary "older than k" terms, thresholds from model.age_min."""
    loss = ordinal_bce(t.need("ordinal_logits"), t.y, t.age_min)
    t.parts["ordinal_bce"] = loss.detach()
    return loss


# ------------------------------------------------------------------------ multi-task terms


def _group_term(
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
    head_out: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    parts: dict[str, Tensor],
    device: torch.device,
) -> Tensor | None:
    """The hybrid net's race-gender group CE, weighted (alpha + beta) / 2; None without
    both labels."""
    gender, race = batch.get("gender"), batch.get("race")
    if gender is None or race is None:
        return None
    group_logits = head_out["group_logits"]
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
    ce, _ = masked_ce(group_logits, group_labels(gender, race, group_map.to(device)))
    parts["group"] = ce.detach()
    return 0.5 * (loss_cfg.alpha + loss_cfg.beta) * ce


def _with_multitask(
    total: Tensor,
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
    head_out: Mapping[str, Tensor],
    batch: Mapping[str, Any],
    parts: dict[str, Tensor],
    device: torch.device,
) -> Tensor:
    """``total`` plus Xing eq. 12's gender and race terms (or the hybrid group term).

    Multi-task (``model_cfg.multitask != "none"``, Xing eq. 12): ``alpha * CE_gender +
    beta * CE_race`` for the logits that are present. For ``hybrid`` with ``group_logits``
    the race-gender group (``head_out["group_map"][gender, race]``, the head's group set) is
    trained with CE instead, weighted ``(alpha + beta) / 2``, on samples that belong to a
    group: the joint CE is ``CE(gender) + CE(race | gender)``, so with ``alpha == beta`` this
    is eq. 12's weighting.
    """
    if model_cfg.multitask == "none":
        return total
    if model_cfg.multitask == "hybrid" and head_out.get("group_logits") is not None:
        term = _group_term(loss_cfg, model_cfg, head_out, batch, parts, device)
        return total if term is None else total + term
    for key, weight in (("gender", loss_cfg.alpha), ("race", loss_cfg.beta)):
        logits, labels = head_out.get(f"{key}_logits"), batch.get(key)
        if logits is None or labels is None:
            continue
        ce, _ = masked_ce(logits, torch.as_tensor(labels, device=device))
        parts[key] = ce.detach()
        total = total + weight * ce
    return total


# ------------------------------------------------------------------------ the entry point


def _stage2_mae(entry: LossEntry, mae_ref: float | None, stage: int) -> float | None:
    """LAE stage 2's validated ``mae_ref`` (None outside stage 2 or without one)."""
    if stage != 2 or mae_ref is None:
        return None
    mae = _finite_nonneg(
        mae_ref,
        "mae_ref",
        "it is stage 1's (representation stage's) MAE on the validation set (LAE eq. 5)",
    )
    if not entry.distribution:
        raise ValueError(
            f"the LAE stage-2 term (L_er - mae)^2 needs a distribution head, but "
            f"loss.name={entry.name}; turn off train.stage2.mae_term or use one of "
            f"{_distribution_losses()}"
        )
    return mae


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

    Age term by ``loss_cfg.name`` (the registered ``LOSSES``): ``kl`` (GLAE eq. 2),
    ``base`` (eq. 5), ``sum`` (eq. 10), ``ce`` (Xing eq. 5), ``ldl_ce`` (eq. 8),
    ``mse`` (eq. 9), ``mae`` (eq. 10),
    ``ordinal_bce`` (3.2.3, thresholds from ``model_cfg.age_min``). The label distribution
    uses ``loss_cfg.sigma`` for every sample (the papers' fixed sigma); ``age_std`` is not
    used for training.

    Stage 2 with ``mae_ref`` (LAE's classifier stage, ``train.stage2.mae_term``): on the
    answering (holistic) logits the l1 term is replaced by LAE eq. 4's
    ``(|y - y_hat| - mae_ref)^2``: ``kl``/``base`` become ``KL + (er - mae)^2`` exactly;
    ``sum`` keeps ``L_loc`` and uses that for its holistic part; ``ce``/``ldl_ce`` add the
    term to their CE. Regression and ordinal formulations have no distribution for it and
    raise.

    Multi-task terms (Xing eq. 12): see :func:`_with_multitask`.

    Returns ``(loss, parts)``; ``parts`` holds Python floats (``"loss"`` and the terms, e.g.
    ``"kl"``, ``"er"``, ``"loc"``, ``"hol"``, ``"gender"``), read with a single device sync.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    first = next((v for v in head_out.values() if isinstance(v, Tensor)), None)
    if first is None:
        raise ValueError("head_out holds no tensors; pass one head's output dict")
    if "age" not in batch:
        raise ValueError("batch has no 'age' labels")
    y = _labels(batch["age"], "batch['age']", device=first.device)
    entry = loss_entry(loss_cfg.name)
    terms = AgeTerms(
        name=entry.name,
        head_out=head_out,
        y=y,
        sigma=float(loss_cfg.sigma),
        lam=float(loss_cfg.lambda_er),
        mae=_stage2_mae(entry, mae_ref, stage),
        age_min=model_cfg.age_min,
    )
    age_loss = entry.fn(terms)
    parts = terms.parts
    parts["age"] = age_loss.detach()
    total = _with_multitask(age_loss, loss_cfg, model_cfg, head_out, batch, parts, first.device)
    parts = {"loss": total.detach(), **parts}
    values = torch.stack([v.float().reshape(()) for v in parts.values()]).tolist()
    return total, dict(zip(parts.keys(), (float(v) for v in values)))
