"""The request guard without a server: header caps (431), the body read under the byte cap
(413) and the body deadline (408), disconnects (one INFO line and a counter), and what the
app behind it receives. Each client behaviour is scripted as an ASGI ``receive``; the
real-socket versions against a running Serve deployment are in
tests/integration/test_serve_hostile.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import pytest

from ageray.serving import (
    ClientDisconnected,
    GuardCounts,
    Limits,
    LiveLimits,
    RequestGuard,
    ServeError,
    check_headers,
    read_body,
)
from ageray.serving.guard import EDGE_CALLBACK, EDGE_ENV, edge_limits, install_edge_guard

FAST = Limits(body_timeout_s=0.3, body_min_bytes_per_s=1000)


def script(*steps: tuple[float, dict[str, Any] | None]):
    """An ASGI ``receive`` that, per call, sleeps and returns a message; ``None`` after the
    last step means the client stalls forever."""
    queue = list(steps)

    async def receive() -> dict[str, Any]:
        if not queue:
            await asyncio.sleep(3600)
        delay, message = queue.pop(0)
        await asyncio.sleep(delay)
        if message is None:
            await asyncio.sleep(3600)
        return message  # type: ignore[return-value]

    return receive


def chunk(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": data, "more_body": more}


def scope(headers: Iterable[tuple[str, str]] = (), method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/v1/predict",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


class Recorder:
    """The app behind the guard: records the body it got and answers 200."""

    def __init__(self) -> None:
        self.body: bytes | None = None
        self.calls = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run_guard(guard: RequestGuard, sc: dict, receive: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(sc, receive, send))
    return sent


def answer(sent: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[str, str]]:
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], json.loads(body["body"]), headers


RAW = [("content-type", "image/jpeg")]


# --------------------------------------------------------------------------- body deadline


def test_stalled_body_is_408_at_the_deadline() -> None:
    app = Recorder()
    guard = RequestGuard(app, limits=FAST)
    receive = script((0.0, chunk(b"x" * 10)), (0.0, None))
    t0 = time.perf_counter()
    sent = run_guard(guard, scope([*RAW, ("content-length", "1000")]), receive)
    took = time.perf_counter() - t0
    status, body, headers = answer(sent)
    assert (status, body["error"]["code"]) == (408, "body_timeout")
    assert "10 of 1000 bytes" in body["error"]["message"]
    assert headers["connection"] == "close"  # the stalled connection is not reused
    assert 0.29 <= took < 0.6, took
    assert app.calls == 0 and guard.counts.snapshot() == {"body_timeout": 1}


def test_trickling_client_is_cut_off_but_a_steady_upload_earns_time() -> None:
    # 10 bytes every 50 ms = 200 B/s, far below body_min_bytes_per_s=1000: 408
    trickle = script(*[(0.05, chunk(b"x" * 10)) for _ in range(100)])
    chunked = scope([*RAW, ("transfer-encoding", "chunked")])
    sent = run_guard(RequestGuard(Recorder(), limits=FAST), chunked, trickle)
    assert answer(sent)[0] == 408
    # 2,000 B per 50 ms = 40 kB/s for 0.6 s: longer than body_timeout_s, but every byte
    # received extends the deadline by 1 ms, so it completes.
    steady = script(*[(0.05, chunk(b"y" * 2000, more=i < 11)) for i in range(12)])
    app = Recorder()
    sent = run_guard(
        RequestGuard(app, limits=FAST), scope([*RAW, ("content-length", "24000")]), steady
    )
    assert sent[0]["status"] == 200 and app.body == b"y" * 24_000


def test_lying_content_length() -> None:
    limits = Limits(max_image_bytes=1000, body_timeout_s=0.3)
    # declares more than the cap: 413 before a byte is read
    app = Recorder()
    receive = script((5.0, chunk(b"never read")))
    t0 = time.perf_counter()
    sent = run_guard(
        RequestGuard(app, limits=limits), scope([*RAW, ("content-length", "5000")]), receive
    )
    assert answer(sent)[:2][0] == 413 and time.perf_counter() - t0 < 0.2 and app.calls == 0
    assert "5000 bytes" in answer(sent)[1]["error"]["message"]
    # declares little, sends more (or none at all: chunked): cut at the cap while reading
    for headers in ([*RAW, ("content-length", "10")], [*RAW, ("transfer-encoding", "chunked")]):
        receive = script(*[(0.0, chunk(b"z" * 400)) for _ in range(5)])
        status, body, _ = answer(
            run_guard(RequestGuard(Recorder(), limits=limits), scope(headers), receive)
        )
        assert (status, body["error"]["code"]) == (413, "payload_too_large")
    # declares more than it sends, then stalls: 408
    receive = script((0.0, chunk(b"z" * 10)), (0.0, None))
    sent = run_guard(
        RequestGuard(Recorder(), limits=limits), scope([*RAW, ("content-length", "900")]), receive
    )
    assert answer(sent)[0] == 408


def test_json_bodies_are_capped_at_max_request_bytes() -> None:
    limits = Limits(max_image_bytes=100, max_request_bytes=300, body_timeout_s=1)
    headers = [("content-type", "application/json"), ("content-length", "250")]
    app = Recorder()
    sent = run_guard(
        RequestGuard(app, limits=limits), scope(headers), script((0, chunk(b"{" * 250, False)))
    )
    assert sent[0]["status"] == 200 and app.body == b"{" * 250


# --------------------------------------------------------------------------- disconnects


def test_disconnect_mid_upload_is_one_info_line_and_a_counter(caplog) -> None:
    counts = GuardCounts()
    guard = RequestGuard(Recorder(), limits=FAST, counts=counts, where="edge")
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):
        for _ in range(3):
            receive = script((0.0, chunk(b"x" * 7)), (0.01, {"type": "http.disconnect"}))
            sent = run_guard(guard, scope([*RAW, ("content-length", "100")]), receive)
            assert sent == []  # nobody to answer
    records = [r for r in caplog.records if "disconnect" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert "7 of 100 body bytes" in records[0].getMessage()
    assert "client disconnects so far: 3" in records[-1].getMessage()
    assert counts.snapshot() == {"client_disconnect": 3}


def test_read_body_raises_client_disconnected() -> None:
    receive = script((0.0, {"type": "http.disconnect"}))
    with pytest.raises(ClientDisconnected):
        asyncio.run(read_body(receive, content_type="image/png", declared=None, limits=FAST))


# --------------------------------------------------------------------------- headers


def test_header_size_and_count_are_431() -> None:
    limits = Limits(max_header_bytes=1024, max_headers=10)
    check_headers([(b"a", b"b")] * 10, limits)
    too_big = (([(b"x-big", b"v" * 2000)], b""), ([(b"h", b"v")] * 11, b""), ([], b"/" * 2000))
    for headers, target in too_big:
        with pytest.raises(ServeError) as info:
            check_headers(headers, limits, target)
        assert (info.value.status, info.value.code) == (431, "headers_too_large")
    app = Recorder()
    sent = run_guard(
        RequestGuard(app, limits=limits), scope([("cookie", "c" * 5000)], "GET"), script()
    )
    assert answer(sent)[0] == 431 and app.calls == 0


# --------------------------------------------------------------------------- pass-through


def test_probes_pass_without_waiting_for_a_body() -> None:
    """GET without Content-Length carries no body: the guard must not wait for one (under
    Serve's proxy every receive is an RPC)."""
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)
        return {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ready"})

    sent = run_guard(RequestGuard(app, limits=FAST), scope(method="GET"), receive)
    assert sent[0]["status"] == 200 and calls == 0


def test_app_gets_the_whole_body_then_the_real_disconnect() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(await receive())
        seen.append(await receive())

    receive = script(
        (0, chunk(b"ab")), (0, chunk(b"cd", more=False)), (0, {"type": "http.disconnect"})
    )
    run_guard(RequestGuard(app, limits=FAST), scope([*RAW, ("content-length", "4")]), receive)
    assert seen == [
        {"type": "http.request", "body": b"abcd", "more_body": False},
        {"type": "http.disconnect"},
    ]


def test_live_limits_follow_reconfigure() -> None:
    live = LiveLimits()
    guard = RequestGuard(Recorder(), limits=live)
    headers = scope([*RAW, ("content-length", "2000")])
    body = script((0, chunk(b"q" * 2000, more=False)))
    assert run_guard(guard, headers, body)[0]["status"] == 200
    live.value = Limits(max_image_bytes=1000)
    assert run_guard(guard, headers, script())[0]["status"] == 413


# --------------------------------------------------------------------------- the edge


def test_edge_settings() -> None:
    env: dict[str, str] = {}
    assert install_edge_guard(env) and env[EDGE_ENV] == EDGE_CALLBACK
    assert not install_edge_guard({EDGE_ENV: ""})  # an explicit opt-out is kept
    limits = edge_limits({"AGERAY_EDGE_LIMITS": "body_timeout_s=2.5, max_header_bytes=65536"})
    assert (limits.body_timeout_s, limits.max_header_bytes) == (2.5, 65536)
    assert edge_limits({}) == Limits()
    with pytest.raises(ValueError, match="did you mean 'body_timeout_s'"):
        edge_limits({"AGERAY_EDGE_LIMITS": "body_timeout=2"})
    with pytest.raises(ValueError, match="body_timeout_s"):
        edge_limits({"AGERAY_EDGE_LIMITS": "body_timeout_s=0"})
