"""The edge's HTTP parser and guard on a real uvicorn server (no Ray): 414/431/400 as the
JSON envelope, the header deadline, the connection cap per client, the admission bound
and the drain (503 + Retry-After + Connection: close, in-flight requests finish)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from ageray.serving import edge_http
from ageray.serving.drain import DrainState
from ageray.serving.guard import RequestGuard
from ageray.serving.settings import Limits

LIMITS = Limits(header_timeout_s=0.5, max_connections_per_client=4, admission_timeout_s=0.5)


async def _app(scope, receive, send) -> None:
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    if scope["path"] == "/serve-503":  # what Serve's proxy itself sends on backpressure
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, DrainState]]:
    assert edge_http.install(LIMITS)
    state = DrainState()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    guard = RequestGuard(_app, limits=LIMITS, where="edge", drain=state, shed=True)
    srv = uvicorn.Server(
        uvicorn.Config(guard, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline
        time.sleep(0.05)
    yield port, state
    srv.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` and read until the server closes; (reply, seconds)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(data)
        s.settimeout(wait)
        out, t0 = b"", time.monotonic()
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out, time.monotonic() - t0


def envelope(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


GET = b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_long_url_is_json_414(server) -> None:
    port, _ = server
    for size in (20_000, 200_000):  # under and over the parser's own buffer
        status, err = envelope(exchange(port, b"GET /x?" + b"q" * size + GET)[0])
        assert (status, err["code"]) == (414, "uri_too_long")


def test_large_or_many_headers_are_json_431(server) -> None:
    port, _ = server
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n"
    for data in (big, many):
        status, err = envelope(exchange(port, data)[0])
        assert (status, err["code"]) == (431, "headers_too_large")


def test_garbage_is_json_400(server) -> None:
    status, err = envelope(exchange(server[0], b"NOT HTTP AT ALL\r\n\r\n")[0])
    assert (status, err["code"]) == (400, "bad_http_request")


def test_header_deadline(server) -> None:
    port, _ = server
    reply, took = exchange(port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
    status, err = envelope(reply)
    assert (status, err["code"]) == (408, "header_timeout")
    assert LIMITS.header_timeout_s - 0.1 <= took < LIMITS.header_timeout_s + 1.0
    reply, took = exchange(port, b"")  # connected, sent nothing: closed, no answer
    assert reply == b"" and took < LIMITS.header_timeout_s + 1.0
    assert exchange(port, b"GET /x" + GET)[0].startswith(b"HTTP/1.1 200")


def test_connection_cap_per_client(server) -> None:
    port, _ = server
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.1)
        status, err = envelope(exchange(port, b"GET /x" + GET)[0])
        assert (status, err["code"]) == (503, "too_many_connections")
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert exchange(port, b"GET /x" + GET)[0].startswith(b"HTTP/1.1 200")


def test_serve_plain_text_errors_become_the_envelope(server) -> None:
    reply = exchange(server[0], b"GET /serve-503" + GET)[0]
    status, err = envelope(reply)
    assert (status, err["code"]) == (503, "overloaded") and "backpressure" in err["message"]
    assert b"retry-after: 1" in reply.lower()


def test_admission_bound_sheds_with_503(server) -> None:
    port, _ = server
    reply, took = exchange(port, b"GET /slow" + GET)
    status, err = envelope(reply)
    assert (status, err["code"]) == (503, "overloaded")
    assert b"retry-after: 1" in reply.lower()
    assert took < LIMITS.admission_timeout_s + 0.5


def test_drain_answers_in_flight_and_refuses_new(server) -> None:
    """While draining, a request already in flight finishes (200); a new one is 503 +
    Retry-After + Connection: close. (Last: the state stays draining.)"""
    port, state = server
    results: dict[str, bytes] = {}
    LIMITS.admission_timeout_s = 5.0  # the in-flight request must not be shed meanwhile
    t = threading.Thread(target=lambda: results.update(slow=exchange(port, b"GET /slow" + GET)[0]))
    t.start()
    time.sleep(0.5)
    assert state.inflight == 1
    assert state.start()
    status, err = envelope(exchange(port, b"GET /x" + GET)[0])
    t.join(10)
    assert (status, err["code"]) == (503, "shutting_down")
    assert results["slow"].startswith(b"HTTP/1.1 200")
    deadline = time.time() + 5
    while not state.idle() and time.time() < deadline:  # the guard leaves after the reply
        time.sleep(0.01)
    assert state.idle() and state.refused == 1
