"""Does the run fit the cluster? Checked before training or tuning starts, so a recipe that
asks for what the cluster does not have fails in seconds with the setting to change,
instead of a placement group that waits forever without a word.

What a run asks for (:func:`request_for`): ``ray.num_workers`` identical worker bundles
(``ray.cpus_per_worker`` CPUs, ``ray.gpus_per_worker`` GPUs when ``ray.use_gpu``,
``ray.memory_per_worker_gb`` when set), one per Ray Train worker, plus a Tune trial's
driver share. What the cluster has: its alive nodes (Ray Train places each bundle on one
node, so a 4-CPU worker does not fit two 2-CPU nodes). What it can get: an autoscaler
(Ray's v2 autoscaler publishes its node groups and their maximum counts; the v1 one only
its status, so its limits are unknown) or ``ray.autoscaling: true`` said explicitly.

The rule (:func:`assess`, plain data, tested without Ray):

* fits the nodes now: go;
* does not, and nothing can add nodes: impossible, :class:`ResourceError` at once;
* does not, and an autoscaler with known node groups could not fit it even at their
  maximum counts: impossible as well;
* otherwise wait (:func:`wait_for_capacity`), asking the autoscaler for the bundles (an
  autoscaler adds nodes for pending demand, and before the placement group exists there is
  none) and saying so, for at most ``ray.resource_wait_s``.

"Impossible" is only said when it is certain: the estimate of an autoscaler's maximum
errs on the large side (nodes running now are counted beside their group's maximum), so a
doubtful case waits with a message rather than refusing a run that would have fitted.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Autoscaler",
    "NodeGroup",
    "Request",
    "ResourceError",
    "Verdict",
    "assess",
    "ensure_resources",
    "request_for",
    "scales_nodes",
    "wait_for_capacity",
    "workers_that_fit",
]

GIB = 1024**3
_EPS = 1e-9


class ResourceError(RuntimeError):
    """The run asks for more than the cluster has or can get; the message (one line) names
    the setting to change."""


@dataclass(frozen=True)
class Request:
    """What a run asks of the cluster: ``num_workers`` bundles like ``worker`` (Ray Train's
    placement group) and ``driver``, a Tune trial's own small bundle (empty for a job)."""

    worker: dict[str, float]
    num_workers: int
    driver: dict[str, float] = field(default_factory=dict)

    def total(self) -> dict[str, float]:
        out = {k: v * self.num_workers for k, v in self.worker.items()}
        for k, v in self.driver.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def bundles(self) -> list[dict[str, float]]:
        """The shapes an autoscaler is asked to fit."""
        return [dict(self.worker) for _ in range(self.num_workers)] + (
            [dict(self.driver)] if self.driver else []
        )

    def describe(self) -> str:
        driver = f" + a trial driver {_fmt(self.driver)}" if self.driver else ""
        return f"{self.num_workers} worker(s) x {_fmt(self.worker)}{driver}"


def request_for(ray_cfg: Any, *, driver_cpus: float = 0.0) -> Request:
    """The request of a run configured by ``ray_cfg`` (``cfg.ray``); ``driver_cpus`` is a
    Tune trial driver's CPU share."""
    worker = {"CPU": float(ray_cfg.cpus_per_worker)}
    if ray_cfg.use_gpu:
        worker["GPU"] = float(ray_cfg.gpus_per_worker)
    memory_gb = getattr(ray_cfg, "memory_per_worker_gb", None)
    if memory_gb:
        worker["memory"] = float(memory_gb) * GIB
    driver = {"CPU": float(driver_cpus)} if driver_cpus else {}
    return Request(worker=worker, num_workers=int(ray_cfg.num_workers), driver=driver)


@dataclass(frozen=True)
class NodeGroup:
    """``count`` nodes with ``resources`` each (``count`` None: as many as wanted)."""

    resources: dict[str, float]
    count: int | None = 1


@dataclass(frozen=True)
class Autoscaler:
    """Something that may add nodes. ``groups``: the node types and their maximum counts
    when known (Ray's v2 autoscaler), None when not (v1, or ``ray.autoscaling: true``);
    ``limits``: the cluster-wide maximum per resource, when set."""

    source: str
    groups: tuple[NodeGroup, ...] | None = None
    limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """What :func:`assess` decided: ``"fits"``, ``"wait"`` or ``"impossible"`` (with the
    one-line reason and remedy in ``message``)."""

    decision: str
    message: str = ""


def workers_that_fit(worker: Mapping[str, float], groups: Sequence[NodeGroup]) -> float:
    """How many bundles like ``worker`` the groups hold, each bundle on one node
    (``math.inf`` when a group is unbounded)."""
    total = 0.0
    for g in groups:
        per_node = min(
            (math.floor(g.resources.get(k, 0.0) / v + _EPS) for k, v in worker.items() if v > 0),
            default=0,
        )
        if per_node > 0:
            total += math.inf if g.count is None else per_node * g.count
    return total


def _totals(groups: Sequence[NodeGroup], limits: Mapping[str, float] | None = None):
    """Each resource summed over the groups, capped by ``limits``."""
    out: dict[str, float] = {}
    for g in groups:
        for k, v in g.resources.items():
            out[k] = out.get(k, 0.0) + (math.inf if g.count is None else v * g.count)
    for k, cap in (limits or {}).items():
        out[k] = min(out.get(k, 0.0), cap)
    return out


def _problems(req: Request, groups: Sequence[NodeGroup], limits: Mapping[str, float]) -> list:
    """(resource, have, need) for every resource the groups cannot give the request."""
    out = []
    have = _totals(groups, limits)
    for k, need in req.total().items():
        cap = have.get(k, 0.0)
        if need > cap + _EPS:
            out.append((k, cap, need))
    if not out and workers_that_fit(req.worker, groups) < req.num_workers:
        # Enough in sum but not per node: say which resource a single node lacks.
        for k, v in req.worker.items():
            biggest = max((g.resources.get(k, 0.0) for g in groups), default=0.0)
            if v > biggest + _EPS:
                out.append((k, biggest, v))
        if not out:
            out.append(("node", workers_that_fit(req.worker, groups), req.num_workers))
    return out


def assess(
    req: Request, nodes: Sequence[NodeGroup], autoscaler: Autoscaler | None, *, where: str
) -> Verdict:
    """The rule of the module docstring. ``where`` names the cluster in the message."""
    if not _problems(req, nodes, {}):
        return Verdict("fits")
    waiting = f"this run needs {req.describe()}; the cluster ({where}) has {_has(req, nodes)} now"
    if autoscaler is not None and autoscaler.groups is None:
        return Verdict("wait", waiting)
    if autoscaler is not None:
        reach = [*nodes, *autoscaler.groups]  # errs large: running nodes counted twice
        beyond = _problems(req, reach, autoscaler.limits)
        if not beyond:
            return Verdict("wait", waiting)
        where = f"{where}, even at its autoscaler's maximum"
        return Verdict("impossible", _shortage(req, reach, beyond, where, autoscaler.limits))
    return Verdict("impossible", _shortage(req, nodes, _problems(req, nodes, {}), where))


def _has(req: Request, groups: Sequence[NodeGroup], limits: Mapping[str, float] | None = None):
    have = _totals(groups, limits)
    return _fmt({k: have.get(k, 0.0) for k in req.total()})


def _shortage(req, groups, problems, where: str, limits: Mapping[str, float] | None = None):
    """One line: what the run needs, what the cluster has, the setting that fixes it."""
    lacks = []
    for k, cap, need in problems:
        if k == "node":
            lacks.append(f"no node holds a whole worker ({cap:g} of {need:g} fit)")
        elif k in req.worker and need == req.worker[k] and cap > 0:
            lacks.append(f"no node has {_amount(k, need)} {k} (the biggest: {_amount(k, cap)})")
        else:
            lacks.append(f"too few {k} ({_amount(k, cap)} of {_amount(k, need)})")
    fixes = _remedies(req, groups, [k for k, _, _ in problems], limits)
    fixes.append(
        "run it on a bigger cluster"
        if limits is None
        else "give the autoscaler more or bigger nodes"
    )
    has = _has(req, groups, limits)
    return (
        f"this run needs {req.describe()}, but the cluster ({where}) has {has}: "
        f"{'; '.join(lacks)}. Fix: {', or '.join(fixes)}"
    )


def _fit(worker: Mapping[str, float], req: Request, groups, totals: Mapping[str, float]) -> int:
    """Workers like ``worker`` that fit beside the request's driver (per node and in sum)."""
    fit = workers_that_fit(worker, groups)
    for k, v in worker.items():  # the driver's share comes first
        if v > 0:
            fit = min(fit, math.floor((totals.get(k, 0.0) - req.driver.get(k, 0.0)) / v + _EPS))
    return int(min(fit, req.num_workers))


def _remedies(req: Request, groups, short: Sequence[str], limits=None) -> list[str]:
    """The ``--set`` options that make the run fit, best first."""
    fixes = []
    totals = _totals(groups, limits)
    if "GPU" in short:
        on_cpus = _fit({k: v for k, v in req.worker.items() if k != "GPU"}, req, groups, totals)
        fewer = f" --set ray.num_workers={on_cpus}" if 1 <= on_cpus < req.num_workers else ""
        fixes.append(f"--set ray.use_gpu=false{fewer} (train on CPUs)")
    fit = _fit(req.worker, req, groups, totals)
    if 1 <= fit < req.num_workers:
        fixes.append(f"--set ray.num_workers={fit} (fewer workers)")
    per_worker = (("CPU", "cpus_per_worker", 1.0), ("memory", "memory_per_worker_gb", GIB))
    for key, setting, unit in per_worker:
        if key not in short or key not in req.worker:
            continue
        biggest = max((g.resources.get(key, 0.0) for g in groups), default=0.0)
        spare = totals.get(key, 0.0) - req.driver.get(key, 0.0)
        per = math.floor(min(biggest, spare / max(1, req.num_workers)) / unit * 10) / 10
        if 0 < per < req.worker[key] / unit:
            per_text = f"{int(per)}" if key == "CPU" else f"{per:g}"
            if key != "CPU" or per >= 1:
                fixes.append(f"--set ray.{setting}={per_text}")
    if not fixes:
        fixes.append("fewer or smaller workers (ray.num_workers, ray.*_per_worker)")
    return fixes


def _amount(key: str, value: float) -> str:
    if key == "memory" or key.endswith("memory"):
        return f"{value / GIB:.1f} GiB" if math.isfinite(value) else "unbounded"
    return f"{value:g}"


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in resources.items()) + "}"


def wait_for_capacity(
    req: Request,
    read_nodes: Callable[[], Sequence[NodeGroup]],
    *,
    limit_s: float,
    where: str,
    log: Callable[[str], None],
    poll_s: float = 5.0,
    report_every_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll ``read_nodes`` until the request fits; return the seconds waited. After
    ``limit_s`` raise :class:`ResourceError` naming what is still missing and the settings
    (``ray.resource_wait_s`` among them). A progress line every ``report_every_s``."""
    t0 = clock()
    last_report = t0
    while True:
        nodes = read_nodes()
        problems = _problems(req, nodes, {})
        waited = clock() - t0
        if not problems:
            return waited
        if waited >= limit_s:
            raise ResourceError(
                _shortage(req, nodes, problems, f"{where}, after waiting {waited:.0f}s")
                + f", or wait longer with --set ray.resource_wait_s={int(max(limit_s * 2, 600))}"
            )
        if clock() - last_report >= report_every_s:
            last_report = clock()
            missing = ", ".join(f"{k} {_amount(k, c)} of {_amount(k, n)}" for k, c, n in problems)
            log(f"still waiting for resources ({waited:.0f}s of {limit_s:g}s): {missing}")
        sleep(min(poll_s, max(0.0, limit_s - waited)))


# ----------------------------------------------------------------- the Ray-reading part


def read_nodes() -> list[NodeGroup]:
    """The alive nodes of the connected cluster, one group each."""
    import ray

    return [
        NodeGroup({k: float(v) for k, v in (n.get("Resources") or {}).items()}, 1)
        for n in ray.nodes()
        if n.get("Alive")
    ]


def read_autoscaler(setting: bool | None) -> Autoscaler | None:
    """Who can add nodes: ``ray.autoscaling`` when set, else what the cluster says (Ray's
    v2 autoscaler publishes its node groups in the GCS; the v1 one writes its status to the
    internal KV). Ray internals, guarded: unreadable means no autoscaler found."""
    if setting is False:
        return None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # another Ray version or a GCS without it: try the v1 status
        config = None
    if config is not None and len(config.node_group_configs):
        groups = tuple(
            NodeGroup(
                {k: float(v) for k, v in g.resources.items()},
                None if g.max_count < 0 else int(g.max_count),
            )
            for g in config.node_group_configs
        )
        limits = {k: float(v) for k, v in config.max_resources.items()}
        return Autoscaler("Ray autoscaler v2", groups, limits)
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    except Exception:  # unreadable status: fall through to the setting
        status = None
    if status and scales_nodes(json.loads(status)):
        return Autoscaler("Ray autoscaler")
    return Autoscaler("ray.autoscaling=true") if setting else None


_ANONYMOUS_NODE = re.compile(r"^node_[0-9a-f]+$")


def scales_nodes(status: Mapping[str, Any]) -> bool:
    """Whether a v1 autoscaler status comes from one that adds nodes. Every Ray head runs
    the monitor that writes this status; without an autoscaling config it mirrors the
    nodes it finds under anonymous types (``node_<id>``) and adds none. A real one names
    its node types (``ray.head.default``, a KubeRay group's name)."""
    report = status.get("autoscaler_report") or {}
    types = {
        *(report.get("active_nodes") or {}),
        *(report.get("idle_nodes") or {}),
        *(report.get("pending_launches") or {}),
        *(report.get("node_type_mapping") or {}).values(),
    }
    return any(not _ANONYMOUS_NODE.match(str(t)) for t in types)


def _ask_autoscaler(bundles: list[dict[str, float]], log: Callable[[str], None]) -> None:
    """Ask the autoscaler to fit ``bundles`` (empty: withdraw the request). Best effort."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # no autoscaler API here: waiting still shows what happens
        log(f"could not ask the autoscaler for resources: {exc}")


def ensure_resources(
    cfg: Any,
    *,
    driver_cpus: float = 0.0,
    wait: bool = True,
    log: Callable[[str], None] = lambda text: print(f"[ageray] {text}", flush=True),
) -> bool:
    """Join or start the run's Ray (``init_ray``), then apply the rule: return whether the
    cluster can grow (an autoscaler), after waiting for it when needed; raise
    :class:`ResourceError` when the run cannot fit. ``wait=False`` (a dry run) reports a
    wait instead of waiting."""
    from ageray.training.driver import init_ray

    init_ray(cfg)
    ray_cfg = cfg.ray
    req = request_for(ray_cfg, driver_cpus=driver_cpus)
    if _address(ray_cfg):
        autoscaler = read_autoscaler(ray_cfg.autoscaling)
    else:  # the local Ray this job started: nothing adds nodes to it
        autoscaler = Autoscaler("ray.autoscaling=true") if ray_cfg.autoscaling else None
    where = _where(ray_cfg, autoscaler)
    verdict = assess(req, read_nodes(), autoscaler, where=where)
    if verdict.decision == "impossible":
        raise ResourceError(verdict.message)
    if verdict.decision == "wait":
        limit = float(ray_cfg.resource_wait_s)
        source = autoscaler.source if autoscaler else "cluster"
        if not wait:
            log(f"a run would wait for the {source} to add nodes: {verdict.message}")
            return True
        log(
            f"waiting up to {limit:g}s (ray.resource_wait_s) for the {source} to "
            f"add nodes: {verdict.message}"
        )
        _ask_autoscaler(req.bundles(), log)
        try:
            waited = wait_for_capacity(req, read_nodes, limit_s=limit, where=where, log=log)
        finally:
            _ask_autoscaler([], log)  # the placement group holds the nodes from here on
        log(f"the cluster fits the run after {waited:.0f}s")
    return autoscaler is not None


def _address(ray_cfg: Any) -> str | None:
    import os

    return ray_cfg.address or os.environ.get("RAY_ADDRESS")


def _where(ray_cfg: Any, autoscaler: Autoscaler | None) -> str:
    address = _address(ray_cfg)
    place = f"Ray at {address}" if address else "the local Ray this job started"
    if autoscaler is None:
        hint = "; set ray.autoscaling=true if one adds nodes" if address else ""
        return f"{place}, no autoscaler{hint}"
    return f"{place}, {autoscaler.source}"
