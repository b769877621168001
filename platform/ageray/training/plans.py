"""Stage plans: what differs between the stages that one training loop runs.

A :class:`StageSpec` is what the driver hands every worker (plain data); a
:class:`StagePlan` is what a worker builds from it: the model, which parameters train, the
loss step, the sampler, the validation. ``stage1`` (representation), ``stage2`` (balanced
classifier on the frozen backbone) and ``pretrain`` (identity, AM-softmax) each have one plan
function here; :mod:`ageray.training.loop` runs any of them.

Why a module of its own: the loop and the stages depend on the plans, and nothing here
depends on the loop, so the training package has no import cycle.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ageray.config import Config, to_dict
from ageray.inference import collect_predictions, merge_predictions, prediction_metrics
from ageray.training.checkpoint import materialize, unwrap
from ageray.training.context import WorkerContext, all_gather_objects
from ageray.training.pretrain import IdentityNet

__all__ = [
    "STAGES",
    "StagePlan",
    "StageSpec",
    "plan_for",
    "plan_pretrain",
    "plan_stage1",
    "plan_stage2",
    "predict_split",
    "spec_for",
]

STAGES = ("pretrain", "stage1", "stage2")


@dataclass
class StageSpec:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    stage: str
    config: dict[str, Any]
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    init_model: str | None = None  # stage 2: the stage-1 model folder
    init_backbone: str | None = None  # stage 1: identity-pretrained backbone
    mae_ref: float | None = None  # stage 2: stage 1's validation MAE (LAE eq. 4)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StagePlan:
    """What one stage trains: model, trainable parameters, loss step and validation."""

    model: nn.Module
    params: list[nn.Parameter]
    optim: Any  # OptimConfig
    epochs: int
    sampler: str
    split: str
    step: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
    validate: Callable[[nn.Module, WorkerContext], dict[str, float]] | None
    meta: dict[str, Any] = field(default_factory=dict)
    data_cfg: Any = None  # DataConfig when the stage reads other shards (pretraining)


def _loss_step(cfg: Config, head: str, mae_ref: float | None, stage: int):
    from ageray.losses import compute_loss

    def step(model: nn.Module, batch: dict[str, torch.Tensor]):
        out = model(batch["image"], heads=[head])
        loss, parts = compute_loss(
            cfg.loss, cfg.model, out[head], batch, mae_ref=mae_ref, stage=stage
        )
        with torch.no_grad():
            age = out[head].get("age")
            if age is not None:
                parts["train_mae"] = float((age.float() - batch["age"].float()).abs().mean())
        return loss, parts

    return step


def predict_split(
    model: nn.Module, cfg: Config, split: str, ctx: WorkerContext, *, flip: bool
) -> dict[str, Any]:
    """Predict every sample of ``split`` once (this rank's share of the shards), then gather
    every rank's part: every rank gets the merged arrays, so every rank reports equal
    metrics (exact, not an average of per-rank metrics)."""
    from ageray.data.loader import eval_loader

    loader = eval_loader(
        cfg.data,
        split,
        rank=ctx.rank,
        world_size=ctx.world_size,
        device=ctx.device if ctx.device.type == "cuda" else None,
    )
    local = collect_predictions(
        unwrap(model), loader, device=ctx.device, flip=flip, amp=cfg.train.amp
    )
    return merge_predictions(all_gather_objects(local))


def _stage_validate(cfg: Config):
    def validate(model: nn.Module, ctx: WorkerContext) -> dict[str, float]:
        preds = predict_split(model, cfg, cfg.data.val_split, ctx, flip=cfg.eval.flip_tta)
        metrics = prediction_metrics(preds, aar_groups=cfg.eval.aar_groups, prefix="val")
        for k, v in preds["_skipped"].items():
            metrics[f"val_skipped_{k}"] = float(v)
        return metrics

    return validate


def plan_stage1(cfg: Config, spec: StageSpec) -> StagePlan:
    """Representation learning: the recipe's model (from an identity-pretrained backbone
    when ``train.init_from`` is set), every parameter, the vanilla head's loss."""
    from ageray.model import build_model

    model = build_model(cfg)  # the GLAE projection needs cfg.data.image_size
    meta: dict[str, Any] = {}
    # train.init_from is honoured whoever drives the stage (jobs.train, a Tune trial, tests);
    # an explicit StageSpec.init_backbone wins.
    init_backbone = spec.init_backbone or cfg.train.init_from
    if init_backbone:
        # materialize: on a cluster the backbone is in the run's storage (s3://), not here
        model.load_backbone(str(materialize(init_backbone)))
        meta["init_backbone"] = init_backbone
    return StagePlan(
        model=model,
        params=[p for p in model.parameters() if p.requires_grad],
        optim=cfg.train.stage1.optim,
        epochs=cfg.train.stage1.epochs,
        sampler=cfg.train.stage1.sampler,
        split=cfg.data.train_split,
        step=_loss_step(cfg, "vanilla", None, stage=1),
        validate=_stage_validate(cfg),
        meta=meta,
    )


def plan_stage2(cfg: Config, spec: StageSpec) -> StagePlan:
    """Classifier re-training: the stage-1 model with a balanced head, the backbone and the
    vanilla head frozen, class-balanced sampling, LAE's ``(L_er - mae)^2`` term on request
    (``mae`` = stage 1's validation MAE, ``StageSpec.mae_ref``)."""
    from ageray.model import load_model

    if not spec.init_model:
        raise ValueError("stage 2 needs the stage-1 model (StageSpec.init_model)")
    model, _info = load_model(materialize(spec.init_model))
    s2 = cfg.train.stage2
    if "balanced" not in model.heads:
        model.add_balanced_head(trainable=s2.trainable)
    model.freeze_for_stage2(s2.trainable)
    for p in model.heads["vanilla"].parameters():  # the vanilla head is final after stage 1
        p.requires_grad_(False)
    mae_ref = spec.mae_ref if s2.mae_term else None
    if s2.mae_term and (mae_ref is None or not math.isfinite(mae_ref)):
        raise ValueError(
            "train.stage2.mae_term needs stage 1's validation MAE; run stage 1 first or pass "
            "a stage-1 model whose model.json records metrics.val_mae"
        )
    return StagePlan(
        model=model,
        params=list(model.stage2_parameters()),
        optim=s2.optim,
        epochs=s2.epochs,
        sampler=s2.sampler,
        split=cfg.data.train_split,
        step=_loss_step(cfg, "balanced", mae_ref, stage=2),
        validate=_stage_validate(cfg),
        meta={"init_model": spec.init_model, "mae_ref": mae_ref},
    )


def plan_for(cfg: Config, spec: StageSpec) -> StagePlan:
    """The plan of ``spec.stage``."""
    plans = {"stage1": plan_stage1, "stage2": plan_stage2, "pretrain": plan_pretrain}
    if spec.stage not in plans:
        raise ValueError(f"unknown stage {spec.stage!r}; choose one of {STAGES}")
    return plans[spec.stage](cfg, spec)


def spec_for(cfg: Config, stage: str, **kwargs: Any) -> StageSpec:
    """A :class:`StageSpec` for ``stage`` of ``cfg`` (``kwargs``: the other fields)."""
    return StageSpec(stage=stage, config=to_dict(cfg), **kwargs)


def plan_pretrain(cfg: Config, spec: StageSpec) -> StagePlan:
    """Identity pretraining (LAE 2.3): :class:`~ageray.training.pretrain.IdentityNet` with
    AM-softmax on the pretraining shards (``pretrain.shards``, else ``data.shards``)."""
    from ageray.data.manifest import read_manifest

    shards = cfg.pretrain.shards or cfg.data.shards
    data_cfg = dataclasses.replace(cfg.data, shards=shards)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    manifest = read_manifest(shards)
    num_ids = int(manifest.get("num_identities") or 0)
    model = IdentityNet(cfg, num_ids)

    def step(m: nn.Module, batch: dict[str, torch.Tensor]):
        ids = batch["identity"]
        if bool((ids < 0).any()):
            raise ValueError(
                f"a pretraining batch holds samples without identity (keys "
                f"{[k for k, i in zip(batch['key'], ids.tolist()) if i < 0][:3]}); "
                "pretrain on shards whose every sample has an identity"
            )
        loss, logits = m(batch["image"], ids)
        with torch.no_grad():
            acc = float((logits.argmax(1) == ids).float().mean())
        return loss, {"loss": float(loss.detach()), "train_acc": acc}

    return StagePlan(
        model=model,
        params=[p for p in model.parameters() if p.requires_grad],
        optim=cfg.pretrain.optim,
        epochs=cfg.pretrain.epochs,
        sampler="instance",
        split=cfg.data.train_split,
        step=step,
        validate=None,
        meta={"num_identities": num_ids, "shards": shards},
        data_cfg=data_cfg,
    )
