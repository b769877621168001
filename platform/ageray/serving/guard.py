"""The request guard: bounded cost per client, in front of the app and (optionally) in
front of Serve's routing.

A pure ASGI middleware that, before a request reaches the app, caps the header block (431),
reads the whole body under the byte cap (413) and the body deadline (408, see
:class:`~ageray.serving.settings.Limits`), and turns a client that disconnects mid-upload
into one INFO line and a counter instead of an error traceback. The app then receives the
body in one piece.

Why it exists twice:

* **In the app** (``serve/app.py`` adds it to the FastAPI app): it holds under every way of
  running (``serve run``, ``serve deploy``, direct ingress). But Serve routes a request to
  a replica when its headers arrive, so a stalled upload still holds one of the replica's
  ``max_ongoing_requests`` slots until the deadline cuts it off.
* **At the edge** (Serve's HTTP proxy, and each replica's own HTTP server under
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): Serve applies the middlewares that the function
  named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` returns (:func:`proxy_middlewares`
  here). There the body is complete *before* Serve picks a replica, so clients that send
  nothing never take a request slot: valid requests and ``/readyz`` keep answering while
  hundreds of uploads stall. The variable is read by Serve's processes when they start;
  :func:`install_edge_guard` sets it for a local Ray that is about to start.

Nothing here imports Ray: the guard is tested in-process (tests/unit/test_guard.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ageray.serving.drain import DrainState, EdgeMonitor, draining_error
from ageray.serving.edge_http import url_too_long
from ageray.serving.errors import ServeError
from ageray.serving.requests import (
    ClientDisconnected,
    check_headers,
    declared_length,
    read_body,
)
from ageray.serving.settings import Limits

__all__ = [
    "EDGE_CALLBACK",
    "EDGE_ENV",
    "EDGE_LIMITS_ENV",
    "GuardCounts",
    "LiveLimits",
    "RequestGuard",
    "edge_limits",
    "install_edge_guard",
    "proxy_middlewares",
]

#: Serve's hook: an import path to a function returning Starlette middlewares for its HTTP
#: servers (proxy and direct ingress). Read by those processes at start.
EDGE_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
EDGE_CALLBACK = "ageray.serving.guard:proxy_middlewares"
#: The edge guard's limits, ``key=value`` pairs (``body_timeout_s=3,max_header_bytes=65536``);
#: unset keys keep :class:`Limits`' defaults. The edge serves every app of the cluster and
#: cannot see a replica's user_config: raise the byte caps here too when you raise them there.
EDGE_LIMITS_ENV = "AGERAY_EDGE_LIMITS"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Serve configures the "ray.serve" logger in its processes (replica and proxy log files,
# forwarded to the driver); a logger of our own would be dropped at INFO there. The name
# does not import Ray.
log = logging.getLogger("ray.serve")


class GuardCounts:
    """Requests the guard refused or lost, by reason (thread-safe; shown by ``/v1/model``
    for the in-app guard, exported as the Ray metric ``ageray_guard_events`` when running
    inside Ray)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._metric: Any = None

    def add(self, reason: str, where: str) -> int:
        with self._lock:
            self._counts[reason] = n = self._counts.get(reason, 0) + 1
        self._export(reason, where)
        return n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _export(self, reason: str, where: str) -> None:
        ray = sys.modules.get("ray")  # only when this process already runs Ray
        if ray is None or not getattr(ray, "is_initialized", lambda: False)():
            return
        try:
            if self._metric is None:
                from ray.util.metrics import Counter

                self._metric = Counter(
                    "ageray_guard_events",
                    description="requests refused or lost before the app: body timeouts, "
                    "client disconnects, oversized headers or bodies",
                    tag_keys=("reason", "where"),
                )
            self._metric.inc(1, tags={"reason": reason, "where": where})
        except Exception:  # metrics are best effort; the count above is kept
            self._metric = False


class LiveLimits:
    """The limits a running replica applies now (``user_config`` may change them)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.value = limits or Limits()

    def __call__(self) -> Limits:
        return self.value


class RequestGuard:
    """Pure ASGI middleware (see the module docstring).

    ``limits``: a :class:`Limits` or a callable returning the current ones. ``where``
    (``app`` / ``edge``) tags log lines and metrics. ``drain``: the server's
    :class:`~ageray.serving.drain.DrainState`; while it drains, new requests get 503 +
    ``Retry-After`` + ``Connection: close`` and the ones in flight are counted until they
    end. ``shed``: answer 503 + ``Retry-After`` when the response has not started within
    ``limits.admission_timeout_s`` (the edge: a request queued behind busy replicas is
    refused quickly instead of waiting; the app itself is told the client left, so Serve
    cancels the queued request).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        limits: Limits | Callable[[], Limits] | None = None,
        where: str = "app",
        counts: GuardCounts | None = None,
        drain: DrainState | None = None,
        shed: bool = False,
    ) -> None:
        self.app = app
        self._limits: Callable[[], Limits] = limits if callable(limits) else LiveLimits(limits)
        self.where = where
        self.counts = counts if counts is not None else GuardCounts()
        self.drain = drain
        self.shed = shed
        self._abandoned: set[asyncio.Task] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain is None:
            await self._guarded(scope, receive, send)
            return
        if not self.drain.enter():
            self.counts.add("shutting_down", self.where)
            await draining_error().send(send)
            return
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.drain.leave()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self._limits()
        headers = scope.get("headers") or []
        try:
            target = (scope.get("raw_path") or b"") + (scope.get("query_string") or b"")
            if len(target) > limits.max_url_bytes:
                raise url_too_long(len(target), limits.max_url_bytes)
            check_headers(headers, limits, target)
            declared, has_body = declared_length(headers)
            if not has_body:  # GET probes: nothing to wait for
                await self._forward(scope, receive, send, limits)
                return
            body = await read_body(
                receive,
                content_type=_header(headers, b"content-type"),
                declared=declared,
                limits=limits,
            )
        except ServeError as err:
            n = self.counts.add(err.code, self.where)
            if err.status == 408:
                log.info(
                    "ageray %s: %s %s: %s (body timeouts so far: %d)",
                    self.where,
                    scope.get("method"),
                    scope.get("path"),
                    err.message.split(";")[0],
                    n,
                )
            await err.send(send)
            return
        except ClientDisconnected as exc:
            n = self.counts.add("client_disconnect", self.where)
            log.info(
                "ageray %s: %s %s: %s (client disconnects so far: %d)",
                self.where,
                scope.get("method"),
                scope.get("path"),
                exc,
                n,
            )
            return
        await self._forward(scope, _replay(body, receive), send, limits)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, limits: Limits) -> None:
        if not self.shed:
            await self.app(scope, receive, send)
            return
        await self._bounded(scope, receive, send, limits.admission_timeout_s)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, bound: float) -> None:
        """Run the app; if its response has not started within ``bound`` seconds, answer
        503 + Retry-After and tell the app the client left (Serve then cancels the queued
        request); whatever the app sends afterwards is dropped."""
        started = asyncio.Event()
        gone = asyncio.Event()
        held: list[Message] = []  # a non-JSON error from Serve itself, rewritten below

        async def tracked_send(message: Message) -> None:
            if gone.is_set():
                return
            if message["type"] == "http.response.start":
                started.set()
                if message.get("status", 200) >= 400 and not _is_json(message):
                    held.append(message)
                    return
            if held and message["type"] == "http.response.body":
                held.append(message)
                if not message.get("more_body"):
                    await _as_envelope(held).send(send)
                return
            await send(message)

        async def tracked_receive() -> Message:
            if gone.is_set():
                return {"type": "http.disconnect"}
            recv = asyncio.ensure_future(receive())
            left = asyncio.ensure_future(gone.wait())
            done, _ = await asyncio.wait({recv, left}, return_when=asyncio.FIRST_COMPLETED)
            if recv in done:
                left.cancel()
                return recv.result()
            recv.cancel()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=bound, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if started.is_set() or task.done():
            await task  # the response is under way (or done): let it finish
            return
        gone.set()
        self.counts.add("shed", self.where)
        await shed_error(bound).send(send)
        self._abandoned.add(task)  # ends on its own once Serve sees the disconnect
        task.add_done_callback(_forget(self._abandoned))


def shed_error(bound: float, retry_after_s: int = 1) -> ServeError:
    """503 for a request whose answer did not start within the admission bound."""
    return ServeError(
        503,
        "overloaded",
        f"the service is overloaded: no replica could start on this request within {bound:g} "
        f"s; retry after {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )


_SERVE_CODES = {404: "not_found", 405: "method_not_allowed", 408: "timeout", 503: "overloaded"}


def _is_json(start: Message) -> bool:
    for key, value in start.get("headers") or []:
        if key.lower() == b"content-type":
            return b"json" in value.lower()
    return False


def _as_envelope(messages: list[Message]) -> ServeError:
    """Serve's own plain-text errors (404 no route, 408 request timeout, 503 backpressure,
    500) as the one JSON envelope, with the same status and Retry-After."""
    start, parts = messages[0], messages[1:]
    status = int(start.get("status", 500))
    text = b"".join(m.get("body", b"") for m in parts).decode("utf-8", "replace").strip()
    headers = {}
    for key, value in start.get("headers") or []:
        if key.lower() == b"retry-after":
            headers["Retry-After"] = value.decode("latin-1")
    code = _SERVE_CODES.get(status, "internal" if status >= 500 else "bad_request")
    return ServeError(status, code, text[:500] or f"HTTP {status}", headers=headers)


def _forget(tasks: set[asyncio.Task]) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("ageray edge: a shed request ended with %r", task.exception())

    return done


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the real ``receive`` (which reports the disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --------------------------------------------------------------------------- the edge


def edge_limits(environ: MutableMapping[str, str] | None = None) -> Limits:
    """:class:`Limits` from ``AGERAY_EDGE_LIMITS`` (``key=value,key=value``)."""
    text = (environ if environ is not None else os.environ).get(EDGE_LIMITS_ENV, "")
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{EDGE_LIMITS_ENV}: {item!r} must look like key=value")
        pairs[key.strip()] = value.strip()
    try:
        return Limits.from_mapping(pairs)
    except ValueError as exc:
        raise ValueError(f"{EDGE_LIMITS_ENV}={text!r}: {exc}") from exc


def proxy_middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: the edge guard for the proxy and direct-ingress servers.

    Set ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=ageray.serving.guard:proxy_middlewares``
    in the environment of ``ray start`` (every node) or let :func:`install_edge_guard` do it
    for a local Ray.
    """
    from starlette.middleware import Middleware

    from ageray.serving import edge_http

    limits = edge_limits()
    parser = edge_http.install(limits)
    state = DrainState()
    EdgeMonitor(state).start()
    log.info(
        "ageray edge: request guard on (%s; guarded parser %s, drain on shutdown)",
        limits,
        "on" if parser else "off",
    )
    return [Middleware(RequestGuard, limits=limits, where="edge", drain=state, shed=True)]


def install_edge_guard(environ: MutableMapping[str, str] | None = None) -> bool:
    """Point Serve's proxy callback at :func:`proxy_middlewares` unless something else is
    set; True when the guard's path is (now) the one set. Only processes started after
    this see it: call it before the local Ray starts (``serve run`` calls the app builder
    first); a running cluster needs the variable in its own environment."""
    env = environ if environ is not None else os.environ
    env.setdefault(EDGE_ENV, EDGE_CALLBACK)
    return env[EDGE_ENV] == EDGE_CALLBACK
