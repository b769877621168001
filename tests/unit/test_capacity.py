"""The resource rule of ``ageray.training.capacity`` without Ray: what a run asks for, whether
the cluster's nodes (and an autoscaler's node groups) can give it, the one-line message with
the setting to change, and the bounded wait for an autoscaler (its clock and the cluster's
nodes are the inputs here)."""

from __future__ import annotations

import math

import pytest

from ageray.config import load_config
from ageray.training.capacity import (
    GIB,
    Autoscaler,
    NodeGroup,
    Request,
    ResourceError,
    assess,
    request_for,
    scales_nodes,
    wait_for_capacity,
    workers_that_fit,
)

LAPTOP = [NodeGroup({"CPU": 2.0, "memory": 10 * GIB})]  # the 2-CPU local Ray
WHERE = "the local Ray this job started, no autoscaler"


def ray_cfg(*overrides: str):
    return load_config(None, list(overrides)).ray


def test_request_follows_the_ray_settings() -> None:
    req = request_for(ray_cfg("ray.num_workers=3", "ray.cpus_per_worker=2"))
    assert req == Request({"CPU": 2.0}, 3)
    assert req.total() == {"CPU": 6.0}
    gpu = request_for(
        ray_cfg("ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.memory_per_worker_gb=4"),
        driver_cpus=0.1,
    )
    assert gpu.worker == {"CPU": 1.0, "GPU": 0.5, "memory": 4 * GIB}
    assert gpu.total() == {"CPU": 1.1, "GPU": 0.5, "memory": 4 * GIB}
    assert gpu.bundles() == [gpu.worker, {"CPU": 0.1}]
    # use_gpu off: gpus_per_worker is not asked for
    assert "GPU" not in request_for(ray_cfg("ray.gpus_per_worker=4")).worker


def test_gpu_recipe_on_a_cpu_only_local_ray_is_impossible_and_names_the_setting() -> None:
    cfg = load_config("recipes/xing_ldl.yaml")
    verdict = assess(request_for(cfg.ray), LAPTOP, None, where=WHERE)
    assert verdict.decision == "impossible"
    assert "--set ray.use_gpu=false" in verdict.message
    assert "too few GPU (0 of 1)" in verdict.message
    assert "\n" not in verdict.message
    # paper scale: 8 GPU workers; on CPUs only as many workers as there are CPUs
    paper = assess(request_for(load_config("recipes/glae_r50.yaml").ray), LAPTOP, None, where=WHERE)
    assert "--set ray.use_gpu=false --set ray.num_workers=2 (train on CPUs)" in paper.message


def test_too_many_workers_suggests_the_number_that_fits() -> None:
    req = request_for(ray_cfg("ray.num_workers=4"))
    verdict = assess(req, LAPTOP, None, where=WHERE)
    assert verdict.decision == "impossible"
    assert "--set ray.num_workers=2 (fewer workers)" in verdict.message
    assert "too few CPU (2 of 4)" in verdict.message
    # a Tune trial's driver takes its share first: one 1-CPU worker beside it
    trial = request_for(ray_cfg("ray.num_workers=2"), driver_cpus=0.1)
    assert "--set ray.num_workers=1" in assess(trial, LAPTOP, None, where=WHERE).message


def test_a_worker_bigger_than_every_node_fails_even_when_the_sum_fits() -> None:
    nodes = [NodeGroup({"CPU": 2.0}, 4)]  # 8 CPUs on four nodes
    req = request_for(ray_cfg("ray.num_workers=2", "ray.cpus_per_worker=4"))
    assert workers_that_fit(req.worker, nodes) == 0
    verdict = assess(req, nodes, None, where="Ray at http://head:8265, no autoscaler")
    assert verdict.decision == "impossible"
    assert "no node has 4 CPU (the biggest: 2)" in verdict.message
    assert "--set ray.cpus_per_worker=2" in verdict.message


def test_memory_per_worker_is_checked_against_the_nodes() -> None:
    req = request_for(ray_cfg("ray.memory_per_worker_gb=64"))
    verdict = assess(req, LAPTOP, None, where=WHERE)
    assert verdict.decision == "impossible"
    assert "no node has 64.0 GiB memory (the biggest: 10.0 GiB)" in verdict.message
    assert "--set ray.memory_per_worker_gb=10" in verdict.message
    assert assess(request_for(ray_cfg("ray.memory_per_worker_gb=4")), LAPTOP, None, where=WHERE)


@pytest.mark.parametrize(
    ("overrides", "nodes"),
    [
        (["ray.num_workers=2"], LAPTOP),
        (["ray.use_gpu=true", "ray.num_workers=2"], [NodeGroup({"CPU": 8, "GPU": 1}, 2)]),
        (
            ["ray.use_gpu=true", "ray.gpus_per_worker=0.5", "ray.num_workers=4"],
            [NodeGroup({"CPU": 4, "GPU": 2})],
        ),
    ],
)
def test_runs_that_fit_go(overrides: list[str], nodes: list[NodeGroup]) -> None:
    assert assess(request_for(ray_cfg(*overrides)), nodes, None, where=WHERE).decision == "fits"


def test_an_autoscaler_that_can_add_gpu_nodes_means_wait() -> None:
    req = request_for(ray_cfg("ray.use_gpu=true", "ray.num_workers=4"))
    gpu_group = NodeGroup({"CPU": 8.0, "GPU": 1.0}, 4)
    verdict = assess(req, LAPTOP, Autoscaler("Ray autoscaler v2", (gpu_group,)), where=WHERE)
    assert verdict.decision == "wait"
    assert "this run needs 4 worker(s) x {CPU: 1, GPU: 1}" in verdict.message
    assert "{CPU: 2, GPU: 0} now" in verdict.message
    # unknown limits (v1 autoscaler, or ray.autoscaling=true): wait as well
    assert assess(req, LAPTOP, Autoscaler("Ray autoscaler"), where=WHERE).decision == "wait"
    # unbounded group (max_count -1)
    unbounded = Autoscaler("v2", (NodeGroup({"CPU": 4.0, "GPU": 1.0}, None),))
    assert assess(req, LAPTOP, unbounded, where=WHERE).decision == "wait"
    assert math.isinf(workers_that_fit(req.worker, [NodeGroup({"GPU": 1, "CPU": 1}, None)]))


def test_an_autoscaler_without_gpu_node_types_cannot_help() -> None:
    req = request_for(ray_cfg("ray.use_gpu=true"))
    cpu_only = Autoscaler("Ray autoscaler v2", (NodeGroup({"CPU": 16.0}, 10),))
    verdict = assess(req, LAPTOP, cpu_only, where=WHERE)
    assert verdict.decision == "impossible"
    assert "even at its autoscaler's maximum" in verdict.message
    assert "--set ray.use_gpu=false" in verdict.message
    # a cluster-wide cap below the request: impossible too
    capped = Autoscaler("v2", (NodeGroup({"CPU": 8.0, "GPU": 1.0}, 8),), limits={"GPU": 2.0})
    four = request_for(ray_cfg("ray.use_gpu=true", "ray.num_workers=4"))
    message = assess(four, LAPTOP, capped, where=WHERE).message
    assert "too few GPU (2 of 4)" in message and "--set ray.num_workers=2" in message


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_returns_when_the_nodes_arrive_and_reports_progress() -> None:
    req = request_for(ray_cfg("ray.use_gpu=true", "ray.num_workers=2"))
    clock, lines = FakeClock(), []
    gpu_nodes = [*LAPTOP, NodeGroup({"CPU": 4.0, "GPU": 1.0}, 2)]

    def nodes() -> list[NodeGroup]:
        return gpu_nodes if clock.now >= 70 else LAPTOP

    waited = wait_for_capacity(
        req, nodes, limit_s=600, where=WHERE, log=lines.append, clock=clock, sleep=clock.sleep
    )
    assert waited == pytest.approx(70)
    assert len(lines) == 2  # at 30 s and 60 s
    assert lines[0].startswith("still waiting for resources (30s of 600s): GPU 0 of 2")


def test_wait_gives_up_after_the_limit_with_the_settings() -> None:
    req = request_for(ray_cfg("ray.use_gpu=true"))
    clock = FakeClock()
    with pytest.raises(ResourceError) as err:
        wait_for_capacity(
            req, lambda: LAPTOP, limit_s=45, where=WHERE, log=print, clock=clock, sleep=clock.sleep
        )
    assert clock.now == pytest.approx(45)
    message = str(err.value)
    assert "after waiting 45s" in message
    assert "--set ray.use_gpu=false" in message
    assert "--set ray.resource_wait_s=600" in message


def test_only_an_autoscaler_with_named_node_types_adds_nodes() -> None:
    """Every Ray head's monitor writes a status; a laptop's (read-only, as captured from a
    local Ray 2.60) mirrors its nodes under anonymous types and adds none."""
    node = "node_d3b225b9339c52aa801f94d0e59d4e73de326ebe7b6c45627415f257"
    local = {
        "active_nodes": {node: 1},
        "idle_nodes": None,
        "pending_launches": {},
        "node_type_mapping": {node[5:]: node},
        "legacy": True,
    }
    assert not scales_nodes({"autoscaler_report": local})
    assert not scales_nodes({"load_metrics_report": {}})  # the monitor's first status
    kuberay = {**local, "active_nodes": {"headgroup": 1}, "pending_launches": {"gpu-group": 2}}
    assert scales_nodes({"autoscaler_report": kuberay})
