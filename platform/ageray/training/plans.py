"""Stage plans: what differs between the stages that one training loop runs.

A :class:`StageSpec` is what the driver hands every worker (plain data); a
:class:`StagePlan` is what a worker builds from it: the model, which parameters train, the
loss step, the sampler, the validation. ``stage1`` (representation), ``stage2`` (balanced
classifier on the frozen backbone), ``pretrain`` (identity, AM-softmax) and the hybrid
net's three steps (Xing 3.3.3: ``hybrid_groups``, ``hybrid_ages``, ``hybrid_finetune``) each
have one plan function here; :mod:`ageray.training.loop` runs any of them.

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
from ageray.evaluation.traits import trait_metrics
from ageray.inference import collect_predictions, merge_predictions, prediction_metrics
from ageray.training.checkpoint import fetched, unwrap
from ageray.training.context import WorkerContext, all_gather_objects
from ageray.training.pretrain import IdentityNet
from ageray.training.stage_names import HYBRID_STEPS, STAGES

__all__ = [
    "HYBRID_STEPS",
    "STAGES",
    "STAGE_METRICS",
    "StagePlan",
    "StageSpec",
    "gather_split_predictions",
    "plan_for",
    "plan_hybrid_ages",
    "plan_hybrid_finetune",
    "plan_hybrid_groups",
    "plan_pretrain",
    "plan_stage1",
    "plan_stage2",
    "spec_for",
]

#: The checkpoint metric of a stage whose best epoch is not the best age (step 1 trains only
#: the group classifier, so its ages are the untrained estimators').
STAGE_METRICS = {"hybrid_groups": ("val_group_acc", "max")}


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


def gather_split_predictions(
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
        preds = gather_split_predictions(
            model, cfg, cfg.data.val_split, ctx, flip=cfg.eval.flip_tta
        )
        metrics = prediction_metrics(preds, aar_groups=cfg.eval.aar_groups, prefix="val")
        metrics.update(trait_metrics(preds, prefix="val"))  # multi-task nets: gender, race
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
        # fetched: on a cluster the backbone is in the run's storage (s3://), not here
        with fetched(init_backbone) as path:
            model.load_backbone(str(path))
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
    with fetched(spec.init_model) as path:
        model, _info = load_model(path)
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
    plans = {
        "stage1": plan_stage1,
        "stage2": plan_stage2,
        "pretrain": plan_pretrain,
        "hybrid_groups": plan_hybrid_groups,
        "hybrid_ages": plan_hybrid_ages,
        "hybrid_finetune": plan_hybrid_finetune,
    }
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


# ------------------------------------------------------------------ the hybrid net (Xing 3.3.3)


def _hybrid_model(cfg: Config, spec: StageSpec) -> tuple[nn.Module, dict[str, Any]]:
    """Step 1 builds the recipe's hybrid net (from an identity-pretrained trunk when
    ``train.init_from`` is set); steps 2 and 3 load the previous step's model."""
    from ageray.model import build_model, load_model

    if cfg.model.multitask != "hybrid":
        raise ValueError(
            f"stage {spec.stage!r} is a step of Xing 3.3.3's hybrid training and needs "
            f"model.multitask=hybrid (the recipe has {cfg.model.multitask!r}); train other "
            "nets with --stage 1"
        )
    if spec.stage == HYBRID_STEPS[0]:
        model = build_model(cfg)
        init_backbone = spec.init_backbone or cfg.train.init_from
        if init_backbone:
            with fetched(init_backbone) as path:
                model.load_backbone(str(path))
            return model, {"init_backbone": init_backbone}
        return model, {}
    if not spec.init_model:
        before = HYBRID_STEPS[HYBRID_STEPS.index(spec.stage) - 1]
        raise ValueError(
            f"stage {spec.stage!r} starts from the {before!r} model (StageSpec.init_model; "
            f"jobs.train --stage {spec.stage} --from <that model>)"
        )
    with fetched(spec.init_model) as path:
        model, _info = load_model(path)
    if "balanced" in model.heads:
        raise ValueError(f"{spec.init_model} has a balanced head: it is a stage-2 model")
    return model, {"init_model": spec.init_model}


def _hybrid_epochs(cfg: Config, step: str) -> int:
    epochs = tuple(cfg.train.hybrid_epochs)
    if len(epochs) != 3 or any(int(e) < 1 for e in epochs):
        raise ValueError(
            f"train.hybrid_epochs={list(epochs)}: give three epoch counts >= 1 (group "
            "classifier, group estimators, end-to-end fine-tuning)"
        )
    return int(epochs[HYBRID_STEPS.index(step)])


def _plan(cfg: Config, spec: StageSpec, model: nn.Module, step: Any, meta: dict) -> StagePlan:
    return StagePlan(
        model=model,
        params=[p for p in model.parameters() if p.requires_grad],
        optim=cfg.train.stage1.optim,
        epochs=_hybrid_epochs(cfg, spec.stage),
        sampler=cfg.train.stage1.sampler,
        split=cfg.data.train_split,
        step=step,
        validate=_stage_validate(cfg),
        meta=meta,
    )


def _group_accuracy(logits: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """``train_group_acc`` over the batch's images that belong to a group (none: no key, so
    the epoch's mean is not poisoned by a NaN)."""
    known = groups >= 0
    if not bool(known.any()):
        return {}
    hits = logits.detach().argmax(-1)[known] == groups[known]
    return {"train_group_acc": float(hits.float().mean())}


def plan_hybrid_groups(cfg: Config, spec: StageSpec) -> StagePlan:
    """Step 1: the race-gender group classifier (and the trunk under it) on all the training
    data, softmax CE over the groups; the age estimators do not train (no gradient reaches
    them, and DDP wants every trainable parameter used)."""
    from ageray.losses import group_labels, group_loss

    model, meta = _hybrid_model(cfg, spec)
    for p in model.heads["vanilla"].age_heads.parameters():
        p.requires_grad_(False)

    def step(m: nn.Module, batch: dict[str, torch.Tensor]):
        out = m(batch["image"], heads=["vanilla"])["vanilla"]
        groups = group_labels(batch["gender"], batch["race"], out["group_map"])
        loss = group_loss(out["group_logits"], groups)
        value = float(loss.detach())
        parts = {"loss": value, "group": value, **_group_accuracy(out["group_logits"], groups)}
        return loss, parts

    return _plan(cfg, spec, model, step, meta)


def plan_hybrid_ages(cfg: Config, spec: StageSpec) -> StagePlan:
    """Step 2: each group's age estimator on its own group's images (the recipe's age loss on
    the estimator of the sample's group; samples in no group are left out). The group
    classifier stays as step 1 left it. The trunk trains with the estimators: Xing's shared
    part is only Conv1-2 and each group has its own Conv3-FC2, while on a timm trunk every
    conv layer is shared, so freezing it would leave the estimators on features trained for
    race and gender alone."""
    from ageray.losses import compute_loss, group_labels

    model, meta = _hybrid_model(cfg, spec)
    head = model.heads["vanilla"]
    for p in head.group.parameters():
        p.requires_grad_(False)
    form = head.formulation
    single = dataclasses.replace(cfg.model, multitask="none")

    def step(m: nn.Module, batch: dict[str, torch.Tensor]):
        out = m(batch["image"], heads=["vanilla"])["vanilla"]
        groups = group_labels(batch["gender"], batch["race"], out["group_map"])
        rows = torch.nonzero(groups >= 0).flatten()
        raw = out["group_raw"]
        # Every estimator takes part in the graph (with weight 0 when its group has no image
        # in this batch), so DDP sees a gradient for each of them on every rank.
        zero = raw.float().sum() * 0.0
        if rows.numel() == 0:
            return zero, {"loss": 0.0, "group_images": 0.0}
        own = form.outputs(raw[rows, groups[rows]])
        sub = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        loss, parts = compute_loss(cfg.loss, single, own, sub)
        loss = loss + zero
        with torch.no_grad():
            parts["train_mae"] = float((own["age"] - sub["age"].float()).abs().mean())
        parts["group_images"] = float(rows.numel())
        return loss, parts

    return _plan(cfg, spec, model, step, meta)


def plan_hybrid_finetune(cfg: Config, spec: StageSpec) -> StagePlan:
    """Step 3: the whole net end to end on all the training data: the age loss on eq. 13's
    fused output plus the group term (``compute_loss`` with ``multitask=hybrid``)."""
    model, meta = _hybrid_model(cfg, spec)
    for p in model.parameters():
        p.requires_grad_(True)
    return _plan(cfg, spec, model, _loss_step(cfg, "vanilla", None, stage=1), meta)
