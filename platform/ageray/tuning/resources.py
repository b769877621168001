"""What a trial holds on the cluster and how many trials run at once; the janitor that
gives back the resources a stopped trial leaves behind. Plain rules (Ray is imported only
inside the janitor), tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ageray.tuning.metric import TuningError

__all__ = ["max_concurrent_trials", "release_orphaned_placement_groups", "trial_resources"]


def trial_resources(ray_cfg: Any, driver_cpus: float = 0.1) -> dict[str, float]:
    """What one trial holds while it runs: its Train workers (``num_workers`` x
    ``cpus_per_worker``, and GPUs when ``use_gpu``) plus its Tune driver function's own small
    CPU share (the function only waits on Train's controller, so 0.1 CPU is plenty and does
    not starve a 2-core machine)."""
    need = {"CPU": ray_cfg.num_workers * float(ray_cfg.cpus_per_worker) + float(driver_cpus)}
    if ray_cfg.use_gpu:
        need["GPU"] = ray_cfg.num_workers * float(ray_cfg.gpus_per_worker)
    if getattr(ray_cfg, "memory_per_worker_gb", None):
        need["memory"] = ray_cfg.num_workers * ray_cfg.memory_per_worker_gb * 1024**3
    return need


def max_concurrent_trials(
    cluster: Mapping[str, float],
    need: Mapping[str, float],
    *,
    override: int | None = None,
    autoscaling: bool = False,
) -> tuple[int, str]:
    """How many trials run at once: ``min over resources of floor(cluster / need)``.

    Tune only reserves the drivers' CPU share; Train reserves the workers later. Without this
    limit Tune would start every trial's driver at once and their worker groups would queue
    for resources (and time out). Returns ``(n, why)``. With nothing fitting, a fixed
    cluster is an error; a cluster that autoscales (``autoscaling=True``) runs one trial at a
    time and lets the autoscaler add nodes. ``override`` wins (e.g. the autoscaler's maximum).
    """
    parts = []
    n = None
    for res, amount in need.items():
        if amount <= 0:
            continue
        have = float(cluster.get(res, 0.0))
        fit = math.floor(have / amount + 1e-9)
        parts.append(f"{res}: {have:g} / {amount:g} per trial = {fit}")
        n = fit if n is None else min(n, fit)
    n = 1 if n is None else n
    why = "; ".join(parts) or "trials need no resources"
    if override is not None:
        if override < 1:
            raise TuningError(f"max_concurrent={override} must be at least 1")
        return override, f"{override} (set explicitly; cluster would fit {n}: {why})"
    if n >= 1:
        return n, f"{n} ({why})"
    if autoscaling:
        return 1, f"1 (the cluster fits none now: {why}; waiting for the autoscaler)"
    raise TuningError(
        f"one trial needs {dict(need)} but the cluster has {dict(cluster)} ({why}): lower "
        "ray.num_workers / ray.cpus_per_worker (or ray.use_gpu) with --set, or run on a "
        "bigger cluster"
    )


def release_orphaned_placement_groups() -> list[str]:
    """Remove this job's placement groups whose creating actor is dead; return their ids.

    Why: Tune stops a trial (ASHA's early stop, an interrupted search) by ending its actor;
    the Ray Train controller that actor created dies with it, but the controller's placement
    group belongs to the job and outlives it. Train V2 has a watcher for this, which asks
    the dashboard's state API; where that API is unavailable (a local Ray started without the
    dashboard, or several Ray instances on one machine) the reserved CPUs leak and the next
    trial's workers wait for them forever. This reads the GCS placement-group table (a Ray
    internal, guarded) and removes exactly those groups: created by an actor of this job,
    that actor dead, not detached.
    """
    import ray

    if not ray.is_initialized():
        return []
    try:
        from ray._private.state import state as global_state
        from ray._raylet import ActorID, PlacementGroupID
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        table = global_state._connect_and_get_accessor().get_placement_group_table()
    except (ImportError, AttributeError, RuntimeError) as exc:
        _warn_once(f"cannot inspect placement groups ({exc}); stopped trials may hold CPUs")
        return []
    removed = []
    for raw in table:
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if info.state == gcs_pb2.PlacementGroupTableData.REMOVED or info.is_detached:
            continue
        if not info.creator_actor_dead or ActorID(info.creator_actor_id).is_nil():
            continue
        if info.creator_job_id.hex() != job:
            continue
        pg_id = PlacementGroupID(info.placement_group_id)
        try:
            remove_placement_group(PlacementGroup(pg_id))
        except Exception as exc:  # already removed by Train's own watcher: nothing to do
            _warn_once(f"placement group {pg_id.hex()} could not be removed: {exc}")
            continue
        removed.append(pg_id.hex())
    return removed


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"[tune] warning: {message}", flush=True)
