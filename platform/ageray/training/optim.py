"""Optimisation as the papers prescribe: SGD with Nesterov momentum 0.9, weight decay 5e-4,
``lr = base x global_batch / 256`` (LAE 3.3), OneCycle stepped per iteration (LAE, GLAE),
step LR for the standard baseline (LAE 2.2: x0.1 at epochs 20, 40, 60 of 75), and gradient
clipping.

Why the schedule is built per *iteration* for every kind: OneCycle must step per batch, and
stepping everything per batch keeps one code path (a step schedule converts its epoch
milestones to iterations). The scheduler state goes into checkpoints, so a resumed run
continues the same curve.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

from ageray.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "clip_gradients", "effective_lr"]


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The learning rate actually used: ``lr * global_batch / 256`` when ``scale_lr``."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return cfg.lr * global_batch / 256.0 if cfg.scale_lr else cfg.lr


def _param_groups(params: Iterable[nn.Parameter] | nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-D tensors): decaying them
    pulls BatchNorm scales towards zero and is the common timm/torchvision recipe."""
    if isinstance(params, nn.Module):
        named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    else:
        named = [(str(i), p) for i, p in enumerate(params) if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: is everything frozen?")
    decay = [p for _, p in named if p.ndim > 1]
    no_decay = [p for _, p in named if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused(optimizer: type[torch.optim.Optimizer], groups: list[dict], wanted: bool) -> dict:
    """``{"fused": True}`` when asked for, this torch's ``optimizer`` has a fused kernel and
    every parameter is a floating-point CUDA tensor (what the fused kernels require)."""
    if not wanted or "fused" not in inspect.signature(optimizer).parameters:
        return {}
    tensors = [p for g in groups for p in g["params"]]
    if all(p.is_cuda and p.is_floating_point() for p in tensors):
        return {"fused": True}
    return {}


def build_optimizer(
    params: Iterable[nn.Parameter] | nn.Module,
    cfg: OptimConfig,
    global_batch: int,
    *,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum) or AdamW over the trainable parameters.

    ``fused``: use torch's fused (one multi-tensor kernel) implementation where it has one
    and the parameters are on a GPU; the update is the same, the step several times
    cheaper on a GPU. Ignored otherwise."""
    lr = effective_lr(cfg, global_batch)
    groups = _param_groups(params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            **_fused(torch.optim.SGD, groups, fused),
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **_fused(torch.optim.AdamW, groups, fused))
    raise ValueError(f"optim.optimizer={cfg.optimizer!r}: choose sgd or adamw")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-iteration scheduler for ``epochs x steps_per_epoch`` steps."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.scheduler == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lrs,
            total_steps=total,
            pct_start=cfg.pct_start,
            # SGD momentum cycling is part of OneCycle; AdamW has no 'momentum' key.
            cycle_momentum="momentum" in optimizer.defaults and cfg.momentum > 0,
            base_momentum=max(0.0, cfg.momentum - 0.05),
            max_momentum=cfg.momentum if cfg.momentum > 0 else 0.95,
        )
    if cfg.scheduler == "step":
        milestones = sorted(m * steps_per_epoch for m in cfg.milestones if m < epochs)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg.gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    raise ValueError(f"optim.scheduler={cfg.scheduler!r}: choose onecycle, step, cosine, constant")


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm; returns the norm before clipping (for logging)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
