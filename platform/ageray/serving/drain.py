"""Graceful drain: stop accepting, answer everything already accepted, then stop.

Why this exists: Serve's own shutdown (``serve.shutdown()``, which ``serve run`` calls on
Ctrl-C and ``serve shutdown`` calls on a cluster) kills the HTTP proxy actor at once: its
``shutdown`` method is a no-op followed by ``ray.kill``. Every request the proxy holds at
that moment loses its connection, even the ones a replica has already answered 200 (the
answer is on its way back to a proxy that no longer exists). Replicas themselves drain
well (Serve stops routing to a stopping replica and waits up to
``graceful_shutdown_timeout_s`` for its ongoing requests), so what is missing is the edge.

The edge guard (:func:`ageray.serving.guard.proxy_middlewares`) therefore runs an
:class:`EdgeMonitor` in every Serve proxy process. A driver that is about to stop Serve
calls :func:`drain` first: it writes the drain's start time into Ray's GCS key-value store;
each proxy sees it within :data:`POLL_S`, then

1. answers every new request (new connections included: the listener stays open, so a
   connection the kernel has just accepted is answered rather than reset) with 503 +
   ``Retry-After`` and ``Connection: close`` (:class:`DrainState`), while the requests in
   flight finish and get their responses;
2. once none is in flight, closes its listening sockets (new connections are refused),
   answers what the last accepted connections sent, and tells uvicorn to exit (its own
   graceful shutdown: idle keep-alive connections close);
3. reports in the key-value store how many requests and connections it still holds.

:func:`drain` returns when every proxy reports zero (or ``timeout_s`` passed); only then is
``serve.shutdown()`` called, and it finds nothing in flight to lose. A proxy ignores drain
records older than itself, so a drained cluster can serve again after a new ``serve
deploy``. The key-value store is used because it reaches every proxy on every node through
Ray's own connection, with no port, file or secret of ours.

:class:`DrainState` holds the rule and is tested without Ray; the rest imports Ray lazily.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ageray.serving.errors import ServeError

__all__ = [
    "DrainReport",
    "DrainState",
    "EdgeMonitor",
    "drain",
    "draining_error",
]

log = logging.getLogger("ray.serve")

KV_NAMESPACE = "ageray"
DRAIN_KEY = b"drain"  # value: the drain's start time (time.time(), text)
EDGE_PREFIX = b"edge:"  # + node ip + pid: one proxy's report (JSON)
POLL_S = 0.1  # how often a proxy reads the drain key while serving
HEARTBEAT_S = 1.0  # how often an idle proxy refreshes its report
STALE_S = 5.0  # a report older than this belongs to a proxy that is gone
SETTLE_S = 0.3  # answer what just-accepted connections sent before closing them
STOP_AFTER_S = 25.0  # stop a proxy whose requests outlast every graceful timeout


def draining_error(retry_after_s: int = 1) -> ServeError:
    """503 for a request that arrives while its server drains: retry shortly (another
    replica or the restarted server will take it), and do not reuse this connection."""
    return ServeError(
        503,
        "shutting_down",
        "the server is shutting down and takes no new requests; retry after "
        f"{retry_after_s} s (another instance or the restarted server will answer)",
        headers={"Retry-After": str(retry_after_s), "Connection": "close"},
    )


class DrainState:
    """In-flight requests of one HTTP server and whether it drains (thread-safe).

    ``enter`` admits a request unless the server drains; every admitted request must
    ``leave``. ``idle`` is true once a draining server holds nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight = 0
        self._draining_since: float | None = None
        self.refused = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def draining(self) -> bool:
        return self._draining_since is not None

    def enter(self) -> bool:
        with self._lock:
            if self._draining_since is not None:
                self.refused += 1
                return False
            self._inflight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._inflight = max(0, self._inflight - 1)

    def start(self, now: float | None = None) -> bool:
        """Begin draining; False when it already was."""
        with self._lock:
            if self._draining_since is not None:
                return False
            self._draining_since = time.monotonic() if now is None else now
            return True

    def idle(self) -> bool:
        return self.draining and self._inflight == 0


# --------------------------------------------------------------------------- proxy side


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def _uvicorn_servers() -> list[Any]:
    """The uvicorn servers of this process (Serve's proxy keeps its own reference only;
    a one-time scan at drain time costs ~0.1 s and needs no change to Serve)."""
    try:
        import uvicorn
    except ImportError:
        return []
    return [o for o in gc.get_objects() if isinstance(o, uvicorn.Server)]


class EdgeMonitor:
    """Runs in a Serve proxy process (started by the edge guard): follows the drain key
    and reports this proxy's in-flight requests (see the module docstring)."""

    def __init__(self, state: DrainState, *, where: str = "edge") -> None:
        self.state = state
        self.where = where
        self.started_at = time.time()
        self._key = EDGE_PREFIX + f"{_node_ip()}:{os.getpid()}".encode()
        self._thread: threading.Thread | None = None
        self._drain_began = 0.0
        self._stopping = False

    def start(self) -> EdgeMonitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ageray-edge-drain", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        last_report = 0.0
        while True:
            try:
                if not self.state.draining and self._drain_requested():
                    self._begin_drain()
                self._maybe_stop()
                now = time.monotonic()
                if self.state.draining or now - last_report >= HEARTBEAT_S:
                    self._report()
                    last_report = now
            except Exception as exc:  # the GCS restarting: keep serving, try again
                log.debug("ageray %s: drain monitor: %s", self.where, exc)
            time.sleep(POLL_S)

    def _drain_requested(self) -> bool:
        kv = _kv()
        if not kv._internal_kv_initialized():
            return False
        value = kv._internal_kv_get(DRAIN_KEY, namespace=KV_NAMESPACE)
        return value is not None and float(value) >= self.started_at

    def _begin_drain(self) -> None:
        """Phase 1: refuse new requests with 503 (the listener stays open, so a connection
        the kernel has just accepted is answered, not reset); phase 2 follows once nothing
        is in flight (:meth:`_maybe_stop`)."""
        if self.state.start():
            self._drain_began = time.monotonic()
            log.info(
                "ageray %s: draining: %d request(s) in flight; new requests get 503",
                self.where,
                self.state.inflight,
            )

    def _maybe_stop(self) -> None:
        """Phase 2, once nothing is in flight (or after ``STOP_AFTER_S``): close the
        listening sockets (new connections are refused), let the event loop answer what
        the last accepted connections sent (``SETTLE_S``), then uvicorn's own graceful exit
        closes the idle keep-alive connections."""
        if self._stopping or not self.state.draining:
            return
        waited = time.monotonic() - self._drain_began
        if (self.state.inflight and waited < STOP_AFTER_S) or waited < SETTLE_S:
            return
        self._stopping = True
        servers = _uvicorn_servers()
        for server in servers:
            for listener in getattr(server, "servers", ()):
                listener.get_loop().call_soon_threadsafe(listener.close)
        time.sleep(SETTLE_S)
        for server in servers:
            server.should_exit = True
        log.info("ageray %s: drained; %d HTTP server(s) stopped", self.where, len(servers))

    def _open_connections(self) -> int:
        total = 0
        for server in _uvicorn_servers() if self.state.draining else []:
            total += len(getattr(server.server_state, "connections", ()))
        return total

    def _report(self) -> None:
        kv = _kv()
        if not kv._internal_kv_initialized():
            return
        report = {
            "t": time.time(),
            "started_at": self.started_at,
            "draining": self.state.draining,
            "inflight": self.state.inflight,
            "stopped": self._stopping,
            "connections": self._open_connections(),
            "refused": self.state.refused,
        }
        kv._internal_kv_put(self._key, json.dumps(report), overwrite=True, namespace=KV_NAMESPACE)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "?"


# --------------------------------------------------------------------------- driver side


@dataclass
class DrainReport:
    """What :func:`drain` saw: proxies found, requests they still held at the end."""

    proxies: int = 0
    drained: bool = True
    seconds: float = 0.0
    left: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        if not self.proxies:
            return "no edge guard answered the drain (proxies run without it): nothing to wait for"
        state = "drained" if self.drained else f"timed out with {self.left} still in flight"
        return f"{self.proxies} HTTP proxy(ies) {state} in {self.seconds:.1f} s"


def _reports(kv: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for key in kv._internal_kv_list(EDGE_PREFIX, namespace=KV_NAMESPACE):
        raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if raw is None:
            continue
        try:
            out[key.decode()] = json.loads(raw)
        except ValueError:
            continue
    return out


def drain(timeout_s: float = 20.0, *, settle_s: float = 0.3) -> DrainReport:
    """Drain every Serve proxy of the connected cluster (module docstring); call it before
    ``serve.shutdown()``. Needs a connected Ray (``ray.init``) and returns within about
    ``timeout_s``. ``settle_s``: the proxies are considered done once they have reported
    zero in flight and no open connection for this long."""
    kv = _kv()
    t0 = time.time()
    kv._internal_kv_put(DRAIN_KEY, repr(t0), overwrite=True, namespace=KV_NAMESPACE)
    alive = {
        k: r
        for k, r in _reports(kv).items()
        if t0 - r.get("t", 0) < STALE_S and r.get("started_at", 0) <= t0
    }
    report = DrainReport(proxies=len(alive))
    quiet_since: float | None = None
    while alive:
        time.sleep(POLL_S)
        now = time.time()
        current = _reports(kv)
        left = {}
        for key in alive:
            r = current.get(key, {})
            seen = r.get("stopped") and r.get("t", 0) > t0
            busy = r.get("inflight", 0) + r.get("connections", 0)
            if not seen or busy:
                left[key] = busy if seen else -1
        if left:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        if quiet_since is not None and now - quiet_since >= settle_s:
            break
        if now - t0 > timeout_s:
            report.drained, report.left = False, left
            break
    report.seconds = time.time() - t0
    return report


def clear_drain() -> None:
    """Forget the drain record and the proxies' reports (after ``serve.shutdown()``; a
    proxy started later ignores an older record anyway)."""
    kv = _kv()
    kv._internal_kv_del(DRAIN_KEY, namespace=KV_NAMESPACE)
    kv._internal_kv_del(EDGE_PREFIX, del_by_prefix=True, namespace=KV_NAMESPACE)
