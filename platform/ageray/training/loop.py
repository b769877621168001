"""The per-worker training loop of each stage: ``stage1`` (representation), ``stage2``
(balanced classifier on the frozen backbone), ``pretrain`` (identity, AM-softmax) and the
hybrid net's three steps (``hybrid_groups``, ``hybrid_ages``, ``hybrid_finetune``).

One loop, six stage plans (``plans.plan_for``). A :class:`~ageray.training.plans.StagePlan`
says what differs between stages (how the model is built, which parameters train, which head
the loss reads, which sampler feeds it; see :mod:`ageray.training.plans`); :func:`run_stage`
does what is common, in named steps (``_set_up``, ``_resume``, ``_train_epoch``,
``_epoch_metrics``, ``_checkpoint_and_report``): resume, epochs of equal step counts on every
rank, validation over every sample exactly once, a checkpoint and one ``report`` per epoch on
every rank (``ray.train.report`` is a barrier), metric logging from rank 0 only.

Entry points: :func:`train_worker` for ``TorchTrainer`` (``train_loop_config`` is a
:class:`~ageray.training.plans.StageSpec` as a dict), :func:`run_stage` with a
:class:`~ageray.training.context.LocalContext` for tests and benchmarks (:func:`run_local`).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ageray.config import Config, DataConfig, config_from_dict
from ageray.inference import autocast
from ageray.training.checkpoint import load_state, restore, save_checkpoint, unwrap
from ageray.training.context import (
    LocalContext,
    RayTrainContext,
    WorkerContext,
    all_gather_objects,
    broadcast_buffers,
    maybe_inject_fault,
)
from ageray.training.optim import build_optimizer, build_scheduler, clip_gradients
from ageray.training.plans import StagePlan, StageSpec, plan_for

__all__ = [
    "nonfinite_loss_message",
    "prepare_for_device",
    "run_local",
    "run_stage",
    "train_step",
    "train_worker",
]


# ------------------------------------------------------------------------ helpers


def say(message: str) -> None:
    """A progress line from a worker. Written to stdout directly: Ray Train V2 patches
    ``print`` into its logger, which echoes each line twice on the driver's console."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def alignment_meta(shards: str) -> dict[str, Any]:
    """How the training shards' faces were aligned, for model.json: Serve must crop request
    images exactly like the shard writer did (same FaceAligner settings)."""
    from ageray.data.manifest import read_manifest

    options = read_manifest(shards).get("options") or {}
    if not options.get("align"):
        return {"align": False}
    aligner: dict[str, Any] = {"output_size": int(options.get("image_size") or 112)}
    if options.get("detector"):
        aligner["detector"] = options["detector"]
    return {"align": True, "align_options": aligner}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def prepare_for_device(
    model: nn.Module,
    device: torch.device,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
) -> nn.Module:
    """The GPU path's model settings: cuDNN picks its fastest kernels for our fixed input
    sizes (``cudnn.benchmark``), weights in channels_last (what bf16 convolutions on tensor
    cores want; CUDA only) and, with ``compile``, ``torch.compile`` in place (the state
    dict keeps its names, so checkpoints and saved models are unchanged)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(backend=compile_backend)
    return model


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    step: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[nn.Parameter],
    device: torch.device,
    amp: str = "auto",
    channels_last: bool = False,
    grad_clip: float | None = None,
    where: str = "",
) -> dict[str, float]:
    """One optimisation step on ``batch``: to the device (non-blocking from pinned memory),
    channels_last on CUDA, the plan's loss ``step`` under autocast (bf16 on GPU), backward,
    gradient clipping, optimiser and scheduler. Returns the step's logged parts (``loss``,
    ``grad_norm``, ...). The loop and ``benchmarks.gpu_check`` both step through here."""
    batch = _to_device(batch, device)
    if channels_last and device.type == "cuda":
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        loss, parts = step(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(nonfinite_loss_message(loss, batch, params, optimizer, where))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm"] = clip_gradients(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return parts


def nonfinite_loss_message(
    loss: torch.Tensor,
    batch: dict[str, Any],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    where: str,
) -> str:
    """Why the loss went non-finite, in one message naming the samples (their shard
    ``key``) and the likely cause, told apart by what is non-finite: the images or ages of
    some samples (those samples), the weights (an earlier step diverged: the learning rate),
    or neither (a step too large for this batch: its keys, its labels, the learning rate).
    ``age_std`` is NaN where a dataset has none, so it is not a cause."""
    keys = [str(k) for k in batch.get("key") or []]
    bad: set[int] = set()
    for name in ("image", "age"):
        value = batch.get(name)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.is_floating_point():
            finite = torch.isfinite(value.detach().reshape(value.shape[0], -1)).all(dim=1)
            bad |= set((~finite).nonzero().flatten().tolist())
    lr = optimizer.param_groups[0]["lr"]
    if bad:
        named = _first([keys[i] if i < len(keys) else f"row {i}" for i in sorted(bad)])
        cause = (
            f"non-finite image or age values in sample(s) {named}; check those samples in "
            "the shards (their labels and images) and the augmentation settings"
        )
    elif not all(bool(torch.isfinite(p.detach()).all()) for p in params):
        cause = (
            f"the weights are non-finite (an earlier step diverged at lr {lr:.3g}): lower the "
            "learning rate (train.*.optim.lr) or clip gradients (optim.grad_clip)"
        )
    else:
        cause = (
            f"inputs and weights are finite; the batch holds {_first(keys) or 'no keys'}. "
            f"Check these samples' labels (finite, within the age range), then the learning "
            f"rate ({lr:.3g}, train.*.optim.lr) and gradient clipping (optim.grad_clip)"
        )
    return f"{where}: loss is {loss.item()}: {cause}"


def _first(names: list[str], shown: int = 8) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _sum_counts(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


# ------------------------------------------------------------------------ the loop


@dataclass
class _StageRun:
    """What every step of one stage on this worker reads, set up once by :func:`_set_up`."""

    spec: StageSpec
    cfg: Config
    ctx: WorkerContext
    device: torch.device
    plan: StagePlan
    model: nn.Module
    params: list[nn.Parameter]
    data_cfg: DataConfig
    first: Any  # epoch 0's loader (its length is every epoch's step count)
    steps: int
    align_meta: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    logger: Any

    def loader(self, epoch: int) -> Any:
        """This rank's loader for ``epoch`` (epoch 0's is built once, at set-up)."""
        if epoch == 0 and self.first is not None:
            return self.first
        return _make_loader(self.cfg, self.data_cfg, self.plan, self.ctx, self.device, epoch)


@dataclass
class _EpochStats:
    """Sums over one epoch's steps (weighted by batch size) and its timings."""

    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    train_time: float = 0.0
    train_cpu: float = 0.0
    first_batch_s: float = 0.0


def _make_loader(
    cfg: Config,
    data_cfg: DataConfig,
    plan: StagePlan,
    ctx: WorkerContext,
    device: torch.device,
    epoch: int,
) -> Any:
    from ageray.data.loader import train_loader

    # On GPU the stream delivers uint8 images to the device and normalises them there (and,
    # with data.augment_on=device, augments them there).
    return train_loader(
        data_cfg,
        plan.split,
        rank=ctx.rank,
        world_size=ctx.world_size,
        epoch=epoch,
        seed=cfg.run.seed,
        sampler=plan.sampler,
        num_classes=cfg.model.num_classes,
        device=device if device.type == "cuda" else None,
    )


def _prepare_model(
    cfg: Config, plan: StagePlan, ctx: WorkerContext, device: torch.device
) -> nn.Module:
    """The plan's model, SyncBatchNorm across GPUs if asked, on the device, wrapped (DDP)."""
    model = plan.model
    if cfg.train.sync_bn and ctx.world_size > 1:
        if device.type != "cuda":
            raise ValueError("train.sync_bn needs GPUs (NCCL); set train.sync_bn=false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_for_device(
        model, device, channels_last=cfg.model.channels_last, compile=cfg.train.compile
    )
    return ctx.prepare_model(model)


def _set_up(spec: StageSpec, ctx: WorkerContext) -> _StageRun:
    """Seed, plan, model, epoch 0's loader, optimiser, scheduler and the run logger."""
    from ageray.tracking import RunLogger

    cfg = config_from_dict(spec.config)
    seed_everything(cfg.run.seed + 1000 * ctx.rank)
    device = ctx.device
    plan = plan_for(cfg, spec)
    model = _prepare_model(cfg, plan, ctx, device)
    params = [p for p in plan.params if p.requires_grad]
    data_cfg = plan.data_cfg or cfg.data
    first = _make_loader(cfg, data_cfg, plan, ctx, device, 0)
    align_meta = alignment_meta(data_cfg.shards)
    steps = len(first)
    global_batch = data_cfg.batch_size * ctx.world_size
    fused = device.type == "cuda"
    optimizer = build_optimizer(params, plan.optim, global_batch, fused=fused)
    scheduler = build_scheduler(optimizer, plan.optim, plan.epochs, steps)
    logger = RunLogger(spec.tracking_uri, spec.mlflow_run_id, enabled=ctx.rank == 0)
    return _StageRun(
        spec, cfg, ctx, device, plan, model, params, data_cfg, first, steps, align_meta,
        optimizer, scheduler, logger,
    )  # fmt: skip


def _resume(run: _StageRun) -> tuple[int, int]:
    """(first epoch to train, global step) from the latest checkpoint, or (0, 0)."""
    spec, ctx, logger = run.spec, run.ctx, run.logger
    start_epoch, global_step = 0, 0
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            # Check the stage before loading: another stage's weights would fail the strict
            # load with a key mismatch that does not say what is wrong.
            saved_stage = load_state(ckpt_dir).get("stage")
            if saved_stage != spec.stage:
                raise ValueError(
                    f"checkpoint {ckpt_dir} is from stage {saved_stage!r}, not "
                    f"{spec.stage!r}: use another run.name for a new run"
                )
            state = restore(ckpt_dir, run.model, run.optimizer, run.scheduler)
            start_epoch = int(state["epoch"]) + 1
            global_step = int(state.get("global_step", 0))
            if ctx.rank == 0:
                say(f"[ageray] {spec.stage}: resumed at epoch {start_epoch}")
            # Also in the run's history (step = the epoch it resumed at), so whoever reads
            # the run in MLflow sees each restart without the workers' console logs.
            logger.log_metrics({"resumed_at_epoch": float(start_epoch)}, step=start_epoch)
    return start_epoch, global_step


def _train_epoch(
    run: _StageRun, loader: Any, epoch: int, global_step: int
) -> tuple[_EpochStats, int]:
    """One epoch of optimisation steps; returns its stats and the global step after it."""
    spec, cfg, ctx, plan = run.spec, run.cfg, run.ctx, run.plan
    if len(loader) != run.steps:
        raise RuntimeError(
            f"rank {ctx.rank}: {len(loader)} steps in epoch {epoch}, not {run.steps}"
        )
    run.model.train()
    stats = _EpochStats()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step_i, batch in enumerate(loader):
        if step_i == 0:
            # Loader start-up (worker processes importing torch, first shard opened) is a
            # one-off per process; reported apart so epochs can be compared without it.
            stats.first_batch_s = time.perf_counter() - t0
        maybe_inject_fault(
            storage_path=cfg.run.storage_path,
            name=cfg.run.name,
            stage=spec.stage,
            rank=ctx.rank,
            epoch=epoch,
            step=step_i,
            cfg_run=cfg.run,
        )
        parts = train_step(
            run.model,
            batch,
            step=plan.step,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            params=run.params,
            device=run.device,
            amp=cfg.train.amp,
            channels_last=cfg.model.channels_last,
            grad_clip=plan.optim.grad_clip,
            where=f"{spec.stage} epoch {epoch} step {step_i}",
        )
        global_step += 1
        n = int(batch["image"].shape[0])
        stats.seen += n
        for k, v in parts.items():
            stats.sums[k] = stats.sums.get(k, 0.0) + float(v) * n
        _say_progress(run, epoch, step_i, stats, t0)
    stats.train_time = time.perf_counter() - t0
    stats.train_cpu = time.process_time() - cpu0
    return stats, global_step


def _say_progress(run: _StageRun, epoch: int, step_i: int, stats: _EpochStats, t0: float) -> None:
    """Every ``train.log_every`` steps, rank 0 says the running loss and throughput."""
    every = run.cfg.train.log_every
    if run.ctx.rank != 0 or not every or (step_i + 1) % every != 0:
        return
    rate = stats.seen / max(1e-9, time.perf_counter() - t0)
    say(
        f"[ageray] {run.spec.stage} epoch {epoch + 1}/{run.plan.epochs} "
        f"step {step_i + 1}/{run.steps} loss {stats.sums['loss'] / stats.seen:.3f} "
        f"{rate * run.ctx.world_size:.0f} img/s"
    )


def _epoch_metrics(run: _StageRun, loader: Any, stats: _EpochStats) -> dict[str, float]:
    """The epoch's training metrics (means, throughput, timings, lr, skipped samples of
    every rank) and, if the plan validates, its validation metrics."""
    seen, world = stats.seen, run.ctx.world_size
    metrics = {
        f"train_{k}" if not k.startswith("train_") else k: v / max(1, seen)
        for k, v in stats.sums.items()
    }
    metrics["train_images_per_s"] = seen * world / max(1e-9, stats.train_time)
    metrics["epoch_time_s"] = stats.train_time
    metrics["first_batch_s"] = stats.first_batch_s
    # CPU seconds of this process (all its threads) over the epoch's steps, and its torch
    # threads: on a shared machine wall time depends on the neighbours, these do not.
    metrics["epoch_cpu_s"] = stats.train_cpu
    metrics["torch_threads"] = float(torch.get_num_threads())
    metrics["lr"] = float(run.optimizer.param_groups[0]["lr"])
    skipped = _sum_counts(all_gather_objects(dict(getattr(loader, "skipped", {}) or {})))
    metrics["train_skipped"] = float(sum(skipped.values()))
    for k, v in skipped.items():
        metrics[f"train_skipped_{k}"] = float(v)
    if run.plan.validate is not None:
        tv = time.perf_counter()
        metrics.update(run.plan.validate(run.model, run.ctx))
        metrics["val_time_s"] = time.perf_counter() - tv
    return metrics


def _checkpoint_and_report(
    run: _StageRun, epoch: int, global_step: int, metrics: dict[str, float]
) -> None:
    """Rank 0 saves the epoch's checkpoint; every rank reports (``ray.train.report`` is a
    barrier), then rank 0 logs the epoch and says its summary."""
    spec, cfg, plan, ctx = run.spec, run.cfg, run.plan, run.ctx
    state = {
        "stage": spec.stage,
        "epoch": epoch,
        "global_step": global_step,
        "mlflow_run_id": spec.mlflow_run_id,
        "sampler": {"name": plan.sampler, "seed": cfg.run.seed, "next_epoch": epoch + 1},
        "metrics": metrics,
        **{k: v for k, v in plan.meta.items() if isinstance(v, str | int | float | type(None))},
    }
    with tempfile.TemporaryDirectory(prefix="ageray-ckpt-") as tmp:
        ckpt = None
        if ctx.rank == 0:
            ckpt = save_checkpoint(
                Path(tmp) / "checkpoint",
                model=run.model,
                cfg=cfg,
                state=state,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                meta={"val_mae": metrics.get("val_mae"), **run.align_meta},
            )
        ctx.report(metrics, ckpt)
    run.logger.log_epoch(metrics, epoch)  # idempotent: a re-run epoch is not logged twice
    if ctx.rank == 0:
        shown = {k: metrics[k] for k in ("train_loss", "val_mae", "val_cmae") if k in metrics}
        say(
            f"[ageray] {spec.stage} epoch {epoch + 1}/{plan.epochs} done in "
            f"{metrics['epoch_time_s']:.1f}s " + " ".join(f"{k} {v:.3f}" for k, v in shown.items())
        )


def run_stage(spec: StageSpec | dict[str, Any], ctx: WorkerContext) -> dict[str, float]:
    """Train one stage on this worker. Returns the last epoch's metrics."""
    spec = spec if isinstance(spec, StageSpec) else StageSpec(**spec)
    run = _set_up(spec, ctx)
    start_epoch, global_step = _resume(run)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, run.plan.epochs):
        loader = run.loader(epoch)
        stats, global_step = _train_epoch(run, loader, epoch, global_step)
        # validate (on every rank) exactly the model that rank 0 saves
        broadcast_buffers(unwrap(run.model))
        metrics = _epoch_metrics(run, loader, stats)
        metrics["epoch"] = float(epoch)
        _checkpoint_and_report(run, epoch, global_step, metrics)
    _flush_metrics(run)
    return metrics


def _flush_metrics(run: Any, wait_s: float = 60.0) -> None:
    """The last epochs' metrics reach MLflow before the stage returns: metrics the tracking
    server did not take while it was down are held by the run logger and sent with the next
    call, and after the last epoch there is no next call. Retried for up to ``wait_s``
    (a server restart takes ~40 s on a loaded node); what is still held then is said."""
    deadline = time.monotonic() + wait_s
    while not run.logger.flush() and time.monotonic() < deadline:
        time.sleep(5.0)
    if run.logger.held:
        print(
            f"[ageray] warning: MLflow did not answer for {wait_s:.0f} s after the last epoch; "
            f"{run.logger.held} metric values were not logged",
            file=sys.stderr,
        )


def _quiet_ray_report_log() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO with the whole metrics dict (a
    ~2 kB line per epoch); the loop's own one-line epoch summary says the same readably."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as ray_context
    except ImportError:  # another Ray version: leave its logging alone
        return
    logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict[str, Any]) -> None:
    """``TorchTrainer`` entry point: ``train_loop_config`` is ``StageSpec.to_dict()``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _quiet_ray_report_log()
    run_stage(StageSpec(**loop_config), RayTrainContext())


def run_local(
    spec: StageSpec, workdir: str | Path | None = None
) -> tuple[dict[str, float], LocalContext]:
    """Run a stage in this process (tests, benchmarks, debugging)."""
    ctx = LocalContext(workdir)
    metrics = run_stage(spec, ctx)
    return metrics, ctx
