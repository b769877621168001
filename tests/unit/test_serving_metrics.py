"""Serve metrics without Ray: which route label, what each answer and batch records, the
ASGI middleware's status counting, and that a broken metrics backend never fails a request.
(tests/integration/test_promote_serve.py reads the same metrics from Ray's Prometheus
endpoint after real traffic.)"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from ageray.serving.telemetry import (
    AGE_BOUNDARIES,
    METRICS,
    MemoryRecorder,
    RequestMetrics,
    ServeMetrics,
    route_label,
)


@pytest.mark.parametrize(
    ("path", "root", "label"),
    [
        ("/v1/predict", "", "/v1/predict"),
        ("/age/v1/predict", "/age", "/v1/predict"),
        ("/age", "/age", "/"),
        ("/", "", "/"),
        ("/static/app.js", "", "/static"),
        ("/wp-login.php", "", "other"),  # scanners do not mint a series per path
        ("/v1/predict/../../etc", "", "other"),
    ],
)
def test_route_label_is_bounded(path: str, root: str, label: str) -> None:
    assert route_label(path, root) == label


def test_answers_batches_and_model_are_recorded() -> None:
    rec = MemoryRecorder()
    m = ServeMetrics(rec)
    m.batch(3, forward_ms=12.5, queue_ms=[0.1, 2.0, 4.0])
    for head, age in (("vanilla", 31.0), ("balanced", 4.0), ("balanced", 88.0)):
        m.answer(head, age)
    m.model("ageray", "7", "champion")
    m.model("ageray", "8", "champion")  # a swap: the gauge moves, no second series
    assert rec.values["ageray_batch_size"][()] == [3.0]
    assert rec.values["ageray_forward_ms"][()] == [12.5]
    assert rec.values["ageray_queue_wait_ms"][()] == [0.1, 2.0, 4.0]
    assert rec.total("ageray_images") == 3
    assert rec.total("ageray_routed", head="balanced") == 2
    assert rec.total("ageray_routed", head="vanilla") == 1
    assert sorted(rec.values["ageray_predicted_age"][()]) == [4.0, 31.0, 88.0]
    assert rec.values["ageray_model_version"] == {(("alias", "champion"), ("model", "ageray")): 8.0}


def test_model_without_registry_version_is_zero() -> None:
    rec = MemoryRecorder()
    ServeMetrics(rec).model("folder-model", None, None)
    assert list(rec.values["ageray_model_version"].values()) == [0.0]


def test_every_metric_is_declared_with_a_kind_and_buckets_where_needed() -> None:
    for name, (kind, description, _tags, buckets) in METRICS.items():
        assert name.startswith("ageray_") and description
        assert kind in ("counter", "gauge", "histogram")
        assert (buckets is not None) == (kind == "histogram"), name
        if buckets:
            assert list(buckets) == sorted(buckets)
    assert AGE_BOUNDARIES[0] == 5 and AGE_BOUNDARIES[-1] == 100


class _Broken:
    calls = 0

    def record(self, *args: Any) -> None:
        _Broken.calls += 1
        raise RuntimeError("exporter gone")


def test_a_broken_backend_is_dropped_and_never_raises() -> None:
    m = ServeMetrics(_Broken())
    m.answer("vanilla", 30.0)  # raises inside, swallowed, backend disabled
    m.request("/v1/predict", 200)
    m.batch(1, 1.0, [0.0])
    assert _Broken.calls == 1


# --------------------------------------------------------------------------- middleware


async def _app(scope, receive, send) -> None:
    path = scope["path"]
    if path.endswith("/boom"):
        raise RuntimeError("bug")
    if path.endswith("/silent"):
        return  # ends without a response: the client went away
    status = 404 if path.endswith("/missing") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _call(mw: RequestMetrics, path: str, root: str = "") -> None:
    scope = {"type": "http", "path": path, "root_path": root, "method": "GET"}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(mw(scope, receive, send))


def test_request_middleware_counts_by_route_and_status() -> None:
    rec = MemoryRecorder()
    mw = RequestMetrics(_app, ServeMetrics(rec))
    _call(mw, "/age/v1/predict", "/age")
    _call(mw, "/age/v1/predict", "/age")
    _call(mw, "/age/missing", "/age")
    _call(mw, "/v1/silent")
    with pytest.raises(RuntimeError):
        _call(mw, "/v1/boom")
    assert rec.total("ageray_requests", route="/v1/predict", status="200") == 2
    assert rec.total("ageray_requests", route="other", status="404") == 1
    assert rec.total("ageray_requests", status="499") == 1
    assert rec.total("ageray_requests", status="500") == 1


def test_lifespan_and_websocket_scopes_pass_through_uncounted() -> None:
    rec = MemoryRecorder()
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    asyncio.run(RequestMetrics(app, ServeMetrics(rec))({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"] and rec.values == {}


def test_outside_ray_the_default_recorder_is_memory() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        pytest.skip("a Ray instance runs in this test session (integration fixtures)")
    m = ServeMetrics()
    m.answer("vanilla", 20.0)
    assert isinstance(m.recorder, MemoryRecorder)
    assert m.recorder.total("ageray_images") == 1
