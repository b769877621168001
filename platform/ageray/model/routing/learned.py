"""The learned router: a small network on the routing features that decides, per image, how
much the balanced head should answer.

Why learn it: GLAE's eq. 11 asks "which head is more flip-consistent", which is a good proxy
for "which head is right" only once both heads are trained to convergence. After a short run
the proxy is weak (on UTKFace the balanced head is 4.6 years better on the over-65s but is
picked for a quarter of them), while the heads' own answers say a lot: a vanilla answer of 70
with a balanced answer of 78 is an old face, where the balanced head is usually right. A
router fitted on the validation split's features learns that, and an oracle bound in the
evaluation table shows how much is left.

Design:

* inputs: the 9 ``FEATURES`` of ``ageray.model.routing.features`` turned into scale-free columns
  (ages / 100, spreads / 10, log KLs, the log KL ratio, the gap and its size), standardised
  with the fitting split's mean and spread (buffers);
* the network: ``hidden`` tanh units and one output logit (``hidden=0``: logistic
  regression); the weights are buffers, not parameters, so a fitted router adds nothing an
  optimiser or ``count_parameters`` would see;
* ``mode="soft"``: w = sigmoid(logit), the routed distribution mixes the heads, fitted by
  minimising the weighted mean |y - ((1 - w) age_van + w age_bal)| directly;
  ``mode="hard"``: w = 1 iff logit >= 0, fitted as cost-sensitive logistic regression (the
  target is "balanced is closer", each sample weighted by how much the wrong choice costs);
* ``weighting="age"`` weights each sample by 1 / (count of its age), so the objective is
  CMAE; ``"instance"`` makes it MAE; a number a in [0, 1] blends the two; ``"auto"`` (the
  default) picks a by 5-fold cross-validation on the fitting split: the share that beats
  eq. 11 on both MAE and CMAE there by the widest margin (all-age weighting buys CMAE with
  MAE, instance weighting leaves CMAE on the table; which blend is right depends on the
  two heads);
* ``hidden=0`` (the default) is logistic regression on the 11 inputs: in 5-fold
  cross-validation on the validation split (1,465 images) of two UTKFace models, 8 tanh
  units gave a worse MAE at every share and a CMAE now better, now worse;
* fitting is full-batch Adam in float32 on CPU, seeded: the same features give the same
  router, and a few thousand rows fit in about a second.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from .features import (
    AGE_BAL,
    AGE_VAN,
    ENT_BAL,
    ENT_VAN,
    GAP,
    KL_BAL,
    KL_VAN,
    STD_BAL,
    STD_VAN,
)
from .registry import RoutingRule, Weighting, check_weighting, register_rule, sample_weights

__all__ = ["INPUTS", "LearnedRouter", "router_inputs"]

# The router's input columns, computed from FEATURES by router_inputs.
INPUTS = (
    "age_van/100",
    "age_bal/100",
    "std_van/10",
    "std_bal/10",
    "ent_van",
    "ent_bal",
    "log_kl_van",
    "log_kl_bal",
    "log_kl_ratio",
    "gap/10",
    "abs_gap/10",
)
_KL_EPS = 1e-6  # flip KLs below this are "perfectly consistent"; keeps the logs finite


def router_inputs(features: torch.Tensor) -> torch.Tensor:
    """(B, len(FEATURES)) -> (B, len(INPUTS)) float32, before standardisation."""
    f = features.float()
    log_kv = torch.log(f[:, KL_VAN] + _KL_EPS)
    log_kb = torch.log(f[:, KL_BAL] + _KL_EPS)
    cols = [
        f[:, AGE_VAN] / 100.0,
        f[:, AGE_BAL] / 100.0,
        f[:, STD_VAN] / 10.0,
        f[:, STD_BAL] / 10.0,
        f[:, ENT_VAN],
        f[:, ENT_BAL],
        log_kv,
        log_kb,
        log_kv - log_kb,
        f[:, GAP] / 10.0,
        f[:, GAP].abs() / 10.0,
    ]
    return torch.stack(cols, dim=-1)


@register_rule
class LearnedRouter(RoutingRule):
    """``learned``: see the module docstring. Unfitted, it refuses to be attached to a model
    (``AgeModel.set_router`` checks ``is_fitted``)."""

    name = "learned"
    needs_fit = True

    def __init__(
        self,
        mode: Literal["soft", "hard"] = "soft",
        weighting: Weighting = "auto",
        hidden: int = 0,
        weight_decay: float = 1e-3,
        steps: int = 800,
        lr: float = 0.05,
        seed: int = 0,
        age_share: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("soft", "hard"):
            raise ValueError(f"learned router: mode={mode!r} must be 'soft' or 'hard'")
        if hidden < 0 or steps < 1 or lr <= 0 or weight_decay < 0:
            raise ValueError(
                f"learned router: hidden={hidden} (>= 0), steps={steps} (>= 1), lr={lr} (> 0), "
                f"weight_decay={weight_decay} (>= 0)"
            )
        self.mode = mode
        self.weighting: Weighting = check_weighting(weighting)
        self.age_share = age_share  # the share 'auto' chose (restored from model.json)
        self.hidden = int(hidden)
        self.weight_decay = float(weight_decay)
        self.steps = int(steps)
        self.lr = float(lr)
        self.seed = int(seed)
        d, h = len(INPUTS), self.hidden
        f32 = torch.float32
        self.register_buffer("mean", torch.zeros(d, dtype=f32))
        self.register_buffer("scale", torch.ones(d, dtype=f32))
        if h:
            self.register_buffer("w1", torch.zeros(h, d, dtype=f32))
            self.register_buffer("b1", torch.zeros(h, dtype=f32))
        self.register_buffer("w2", torch.zeros(1, h or d, dtype=f32))
        self.register_buffer("b2", torch.zeros(1, dtype=f32))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    def settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "weighting": self.weighting,
            "hidden": self.hidden,
            "weight_decay": self.weight_decay,
            "steps": self.steps,
            "lr": self.lr,
            "seed": self.seed,
            "age_share": self.age_share,
        }

    # ------------------------------------------------------------------ the rule

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) logit of "the balanced head should answer"."""
        z = (router_inputs(features) - self.mean) / self.scale
        if self.hidden:
            z = torch.tanh(torch.nn.functional.linear(z, self.w1, self.b1))
        return torch.nn.functional.linear(z, self.w2, self.b2)[:, 0]

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logit = self.logit(features)
        if self.mode == "soft":
            return torch.sigmoid(logit)
        zero = torch.zeros((), dtype=logit.dtype, device=logit.device)
        one = torch.ones((), dtype=logit.dtype, device=logit.device)
        return torch.where(logit >= 0, one, zero)

    # ------------------------------------------------------------------ fitting

    def _fit(self, f: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        feats = torch.as_tensor(f, dtype=torch.float32)
        x = router_inputs(feats)
        mean = x.mean(0)
        scale = x.std(0, unbiased=False).clamp_min(1e-6)
        z = (x - mean) / scale
        yt = torch.as_tensor(y, dtype=torch.float32)
        sw = torch.as_tensor(sample_weights(y, self.share), dtype=torch.float32)
        age_v, gap = feats[:, AGE_VAN], feats[:, GAP]
        err_v = (yt - age_v).abs()
        err_b = (yt - feats[:, AGE_BAL]).abs()
        target = (err_b < err_v).float()
        cost = sw * (err_v - err_b).abs()
        cost = cost / cost.mean().clamp_min(1e-12)

        g = torch.Generator().manual_seed(self.seed)
        d, h = z.shape[1], self.hidden
        params: list[torch.Tensor] = []
        if h:
            w1 = (torch.randn(h, d, generator=g) / math.sqrt(d)).requires_grad_()
            b1 = torch.zeros(h, requires_grad=True)
            params += [w1, b1]
        w2 = (torch.randn(1, h or d, generator=g) * 0.01).requires_grad_()
        b2 = torch.zeros(1, requires_grad=True)
        params += [w2, b2]
        opt = torch.optim.Adam(params, lr=self.lr)

        def logit() -> torch.Tensor:
            hz = torch.tanh(torch.nn.functional.linear(z, w1, b1)) if h else z
            return torch.nn.functional.linear(hz, w2, b2)[:, 0]

        def objective() -> torch.Tensor:
            out = logit()
            if self.mode == "soft":
                age = age_v + torch.sigmoid(out) * gap
                loss = (sw * (yt - age).abs()).mean()
            else:
                bce = torch.nn.functional.binary_cross_entropy_with_logits(
                    out, target, reduction="none"
                )
                loss = (cost * bce).mean()
            reg = sum((p**2).sum() for p in params if p.dim() == 2)
            return loss + self.weight_decay * reg

        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                loss = objective()
                loss.backward()
                opt.step()
        with torch.no_grad():
            self.mean.copy_(mean)
            self.scale.copy_(scale)
            if h:
                self.w1.copy_(w1.detach())
                self.b1.copy_(b1.detach())
            self.w2.copy_(w2.detach())
            self.b2.copy_(b2.detach())
            self.fitted.fill_(1)
            final = float(objective().item())
        return {"final_loss": final, **self._summary(f, y, self.share)}
