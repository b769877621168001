"""What a stage says about its worker group: failure lines, nodes, read sums (no Ray)."""

from __future__ import annotations

from ageray.training.restarts import (
    failure_line,
    node_of,
    pick_failure,
    sum_reads,
    workers_line,
)


def test_failure_line_names_worker_node_error_and_retries_left() -> None:
    err = RuntimeError("A worker health check failed.\nWorker info: ... node_ip='127.0.0.3', pid=9")
    assert node_of(err, {1: "127.0.0.2"}, 1) == "127.0.0.3"  # Ray's worker info wins
    assert node_of(ValueError("boom"), {1: "127.0.0.2"}, 1) == "127.0.0.2"
    assert node_of(ValueError("boom"), {}, 1) == "unknown"
    line = failure_line(
        stage="stage1", failure=1, max_failures=2, rank=1, node="127.0.0.3", error=err
    )
    assert line.startswith("[ageray] stage1: worker group failure 1 (train.max_failures=2)")
    assert "rank 1 on node 127.0.0.3" in line
    assert "RuntimeError: A worker health check failed." in line
    assert "1 retry left; resuming from the latest checkpoint" in line
    assert "no retries left: the stage fails" in failure_line(
        stage="s", failure=3, max_failures=2, rank=0, node="n", error=err
    )
    assert "0 retries left" in failure_line(
        stage="s", failure=2, max_failures=2, rank=0, node="n", error=err
    )
    assert "unlimited" in failure_line(
        stage="s", failure=9, max_failures=-1, rank=0, node="n", error=err
    )


def test_workers_line_and_read_sums() -> None:
    assert workers_line("stage1", {1: "127.0.0.3", 0: "127.0.0.2"}) == (
        "[ageray] stage1: 2 workers on 2 node(s): 0@127.0.0.2 1@127.0.0.3"
    )
    reports = [{"read_samples": 64, "read_keysum": 10}, {"read_samples": 64, "read_keysum": 5}]
    assert sum_reads(reports) == (128, 15)
    assert sum_reads([{"read_samples": 1}]) is None


def test_the_dead_worker_explains_the_failure_not_its_survivor() -> None:
    errs = {0: RuntimeError("gloo: connection reset by peer"), 1: RuntimeError("ActorDiedError")}
    assert pick_failure(errs)[0] == 1
    assert pick_failure({2: ValueError("a"), 0: ValueError("b")})[0] == 0


def test_health_check_timing_is_a_setting_handed_to_ray_train() -> None:
    from ageray.config import load_config
    from ageray.training.driver import health_check_env

    assert health_check_env(load_config(None, [])) == {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0",
        "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "600.0",
    }
    cfg = load_config(None, ["ray.health_check_timeout_s=900", "ray.health_check_interval_s=5"])
    assert health_check_env(cfg)["RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"] == "900.0"
    assert health_check_env(cfg)["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5.0"
