"""Driver side of a stage: Ray start-up sized for the machine, the ``TorchTrainer`` with
scaling, storage, checkpoint and failure settings, and the hand-over of the best checkpoint.

Why the run name is stable (``<run.name>/<stage>``): Ray Train V2 restores a run from the
checkpoint-manager snapshot in ``<storage>/<name>``, so resubmitting the same job after a
crash resumes from the latest checkpoint instead of starting over. A stage that already
finished is not trained again: its ``result.json`` is reused unless ``fresh=True``.

Layout of a run (local storage): ``<storage_path>/<run.name>/<stage>/`` holds Ray Train's
checkpoints (``checkpoint_*``), the best one copied to ``model/`` and ``result.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ageray.config import Config, to_dict
from ageray.training.checkpoint import materialize
from ageray.training.loop import train_worker
from ageray.training.plans import STAGE_METRICS, StageSpec

__all__ = [
    "StageResult",
    "health_check_env",
    "init_ray",
    "local_run_dir",
    "loopback_only",
    "process_group_backend",
    "run_stage_on_ray",
    "storage_args",
]


@dataclass
class StageResult:
    stage: str
    model_dir: Path  # local folder: model.safetensors + model.json (+ optim.pt, state.json)
    metrics: dict[str, float]
    checkpoint: str  # where Ray Train keeps it (local path or s3:// URI)
    reused: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "model_dir": str(self.model_dir),
            "metrics": self.metrics,
            "checkpoint": self.checkpoint,
        }


def init_ray(cfg: Config, *, verbose: bool | None = None) -> None:
    """Join the cluster named by ``ray.address`` / ``RAY_ADDRESS`` (``ray job submit`` sets
    it), else start a local Ray with ``ray.num_cpus`` and a small object store so it fits a
    2-core, few-GiB machine.

    Quiet unless ``verbose`` (default: ``AGERAY_VERBOSE``, set by the jobs' ``--verbose``):
    Ray's driver-side INFO/WARNING lines are off and forwarded worker output is reduced to
    ageray's own lines (:mod:`ageray.training.console`); the rest stays in Ray's logs.
    """
    import logging

    import ray

    if ray.is_initialized():
        return
    loud = verbose if verbose is not None else verbose_from_env()
    quiet: dict[str, Any] = {} if loud else {"logging_level": logging.ERROR}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        loopback_only()
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus or os.cpu_count() or 2,
            object_store_memory=cfg.ray.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            **quiet,
        )
    if not loud:
        from ageray.training.console import install_console_filter

        install_console_filter()


def loopback_only() -> None:
    """Make the local Ray that this process is about to start bind to 127.0.0.1 only.

    Why this way: Ray replaces a node IP of 127.0.0.1 (even one given as
    ``_node_ip_address``) with the machine's interface address, where its GCS, raylet and
    agents then listen and advertise. Ray 2.60 keeps 127.0.0.1 when
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (the single-node mode it uses on laptops): the
    node IP stays 127.0.0.1 and every server binds there. Ray reads the flag once, when it
    is imported, so it is set both in the environment (the processes Ray starts) and in the
    already-imported constant. A single-node Ray only: a cluster's nodes need their own IPs.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray layout: the environment variable alone must do
        return
    ray_constants.ENABLE_RAY_CLUSTER = False


def verbose_from_env() -> bool:
    """``AGERAY_VERBOSE`` (``1``/``true``): show Ray's own output on the console."""
    return os.environ.get("AGERAY_VERBOSE", "").lower() not in ("", "0", "false", "no")


def _abs(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def absolutize_paths(cfg: Config) -> Config:
    """Local paths resolved against the driver's folder: Ray workers run elsewhere (their own
    working directory), so a relative ``data.shards`` would point at nothing there."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, storage_path=_abs(cfg.run.storage_path)),
        data=dataclasses.replace(cfg.data, shards=_abs(cfg.data.shards)),
        model=dataclasses.replace(cfg.model, pretrained=_abs(cfg.model.pretrained)),
        pretrain=dataclasses.replace(cfg.pretrain, shards=_abs(cfg.pretrain.shards)),
        train=dataclasses.replace(cfg.train, init_from=_abs(cfg.train.init_from)),
    )


def local_run_dir(cfg: Config) -> Path:
    """This run's local folder (outputs the driver keeps: stage models, reports)."""
    storage = cfg.run.storage_path
    base = Path(storage) if "://" not in storage else Path("runs")
    return (base / cfg.run.name).resolve()


def ray_storage(cfg: Config) -> str:
    """Ray Train's storage for this run: ``<storage_path>/<run.name>``, so a run's
    checkpoints (``<stage>/checkpoint_*``) sit beside the driver's outputs for that stage."""
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def storage_args(storage_path: str) -> dict[str, Any]:
    """``storage_path`` (+ ``storage_filesystem`` for S3 with a custom endpoint) for
    ``RunConfig``. Credentials and the endpoint come from the standard AWS environment."""
    if not storage_path.startswith("s3://"):
        path = Path(storage_path).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return {"storage_path": str(path)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {"storage_path": storage_path}
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint,
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        scheme="https" if endpoint.startswith("https") else "http",
    )
    return {"storage_path": storage_path[len("s3://") :], "storage_filesystem": fs}


def _scaling(cfg: Config):
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    if cfg.ray.memory_per_worker_gb:  # scheduling only: Ray does not cap the process
        resources["memory"] = cfg.ray.memory_per_worker_gb * 1024**3
    return ScalingConfig(
        num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
    )


def process_group_backend(cfg: Config) -> str:
    """torch.distributed's backend for the worker group: NCCL between GPUs (gradients
    all-reduced device to device), gloo on CPUs. Said explicitly rather than left to Ray's
    default, so a GPU run cannot silently fall back to gloo."""
    return "nccl" if cfg.ray.use_gpu else "gloo"


def _metric_for(stage: str, cfg: Config) -> tuple[str, str]:
    if stage == "pretrain":
        return "train_loss", "min"
    if stage in STAGE_METRICS:
        return STAGE_METRICS[stage]
    if stage == "stage2" and cfg.train.checkpoint_metric == "val_mae":
        # The balanced head exists for the tail: keep the epoch whose routed answer is best
        # class-wise (CMAE), which is what stage 2 is for.
        return "val_routed_cmae", "min"
    return cfg.train.checkpoint_metric, cfg.train.checkpoint_mode


def run_stage_on_ray(
    cfg: Config,
    stage: str,
    *,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    init_model: str | None = None,
    init_backbone: str | None = None,
    mae_ref: float | None = None,
    fresh: bool = False,
    callbacks: list[Any] | None = None,
) -> StageResult:
    """Train one stage with ``TorchTrainer``; return its best checkpoint as a local folder.

    ``callbacks`` are Ray Train ``UserCallback``s for the run, e.g. Tune's
    ``TuneReportCallback`` when a Tune trial drives this stage (each epoch's report then
    reaches Tune's scheduler)."""
    done = _finished_stage(cfg, stage, fresh=fresh)
    if done is not None:
        return done
    init_ray(cfg)
    cfg = absolutize_paths(cfg)
    metric, mode = _metric_for(stage, cfg)
    spec = StageSpec(
        stage=stage,
        config=to_dict(cfg),
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        init_model=_abs(str(init_model)) if init_model else None,
        init_backbone=_abs(str(init_backbone)) if init_backbone else None,
        mae_ref=mae_ref,
    )
    from ageray.training.restarts import stage_watch

    watch = stage_watch(
        stage=stage,
        max_failures=cfg.train.max_failures,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
    )
    trainer = _trainer(cfg, stage, spec, metric, mode, [watch, *(callbacks or [])])
    t0 = time.time()
    result = _fit(trainer, cfg, stage)
    if result.error is not None:
        raise RuntimeError(f"{stage} failed: {result.error}") from result.error
    return _hand_over(cfg, stage, result, metric, mode, fit_time_s=time.time() - t0)


def _fit(trainer, cfg: Config, stage: str):
    """``trainer.fit()``; an S3 outage (which reads as a worker traceback) is raised as the
    storage error that names the endpoint and what to do."""
    from ageray.data import storage

    try:
        return trainer.fit()
    except Exception as exc:  # an S3 outage reads as a worker traceback; say what it is
        down = storage.unreachable_cause(
            exc,
            ray_storage(cfg),
            f"{stage}: saving or restoring checkpoints under",
            after="the run stops at its last registered checkpoint; re-run the same command "
            "when the endpoint answers and it resumes from there",
        )
        if down is None:
            raise
        raise down from exc


def _finished_stage(cfg: Config, stage: str, *, fresh: bool) -> StageResult | None:
    """The stage's earlier result when it already finished (its ``result.json``), fetching
    its model when this node lacks it; None when it must train. ``fresh`` clears it."""
    from ageray.data import storage

    out_dir = local_run_dir(cfg) / stage
    result_url = storage.join(ray_storage(cfg), stage, "result.json")
    if fresh:
        shutil.rmtree(out_dir, ignore_errors=True)  # local storage: Ray's state is in there too
        for url in storage.list_files(storage.join(ray_storage(cfg), stage)):
            storage.remove(url)
        return None
    if not storage.exists(result_url):
        return None
    done = storage.read_json(result_url)
    if not Path(done["model_dir"]).is_dir():  # another node/job: fetch the model
        done["model_dir"] = str(materialize(done["checkpoint"], out_dir / "model"))
    print(
        f"[ageray] {stage}: already finished for run {cfg.run.name!r}; "
        f"reusing {done['model_dir']} (--fresh retrains)"
    )
    return StageResult(
        stage=stage,
        model_dir=Path(done["model_dir"]),
        metrics=done["metrics"],
        checkpoint=done["checkpoint"],
        reused=True,
    )


def health_check_env(cfg: Config) -> dict[str, str]:
    """Ray Train's worker health checks as the run's settings say (``ray.health_check_*``):
    how often the controller polls its workers and how long a hanging poll may take before
    the worker counts as dead. Ray reads them from the environment of the driver, which it
    hands on to its controller."""
    return {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(float(cfg.ray.health_check_interval_s)),
        "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": str(float(cfg.ray.health_check_timeout_s)),
    }


def _trainer(cfg: Config, stage: str, spec: StageSpec, metric: str, mode: str, callbacks):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.update(health_check_env(cfg))
    return TorchTrainer(
        train_worker,
        train_loop_config=spec.to_dict(),
        scaling_config=_scaling(cfg),
        torch_config=TorchConfig(backend=process_group_backend(cfg)),
        run_config=RunConfig(
            name=stage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoint_keep,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
            **storage_args(ray_storage(cfg)),
        ),
    )


def _hand_over(cfg: Config, stage: str, result, metric: str, mode: str, *, fit_time_s: float):
    """The best checkpoint as the stage's local ``model/`` folder and its ``result.json``."""
    from ageray.data import storage

    best = _best(result, metric, mode)
    if best is None:
        raise RuntimeError(f"{stage} reported no checkpoint; nothing to hand on")
    ckpt, metrics = best
    model_dir = local_run_dir(cfg) / stage / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    ckpt.to_directory(str(model_dir))
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    metrics["fit_time_s"] = fit_time_s
    # The checkpoint's URI in storage is what other nodes and later jobs start from.
    uri = f"s3://{ckpt.path}" if cfg.run.storage_path.startswith("s3://") else ckpt.path
    out = StageResult(stage=stage, model_dir=model_dir, metrics=metrics, checkpoint=uri)
    storage.write_json(storage.join(ray_storage(cfg), stage, "result.json"), out.to_dict())
    return out


def _best(result, metric: str, mode: str):
    """The best (checkpoint, metrics) among those Ray kept; the latest if none has the metric."""
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if c is not None]
    scored = [(c, m) for c, m in pairs if isinstance(m.get(metric), int | float)]
    if scored:
        pick = min if mode == "min" else max
        return pick(scored, key=lambda cm: cm[1][metric])
    if result.checkpoint is not None:
        return result.checkpoint, dict(result.metrics or {})
    return pairs[-1] if pairs else None
