"""What the endpoint measures about itself, exported as Ray metrics (Prometheus format).

Why Ray's metrics (``ray.serve.metrics``): every Ray node already runs an exporter on its
metrics export port (``ray start --metrics-export-port``); metrics recorded in a replica
show up there with the ``deployment``, ``replica`` and ``application`` tags added by Serve,
so Prometheus scrapes the same endpoint it scrapes for Ray's own metrics and nothing extra
runs. In Prometheus every name below gets Ray's ``ray_`` prefix (counters also ``_total``):

==============================  ===========  ==================================================
metric (as recorded)            kind         what it says
==============================  ===========  ==================================================
``ageray_requests``             counter      HTTP requests by ``route`` and ``status`` (every
                                             answer, 4xx from the request guard included)
``ageray_images``               counter      images answered (a request may carry several)
``ageray_batch_size``           histogram    images per forward pass (batching at work)
``ageray_queue_wait_ms``        histogram    per image: batch queue -> forward start
``ageray_forward_ms``           histogram    per forward pass (image + flip, both heads)
``ageray_routed``               counter      answers by the ``head`` that answered (routing
                                             share; balanced ~ the tails of the age range)
``ageray_predicted_age``        histogram    the ages answered (drift in what is asked)
``ageray_model_version``        gauge        the registry version served (``model``, ``alias``)
==============================  ===========  ==================================================

The recording rules (which route label, which buckets) live here and are unit-tested with
:class:`MemoryRecorder`; inside a Ray process :class:`ServeMetrics` records into Ray's
metric objects instead. Recording never fails a request: a metrics backend that breaks is
dropped with one log line.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = [
    "AGE_BOUNDARIES",
    "BATCH_BOUNDARIES",
    "METRICS",
    "MS_BOUNDARIES",
    "MemoryRecorder",
    "RequestMetrics",
    "ServeMetrics",
    "route_label",
]

log = logging.getLogger("ray.serve")

BATCH_BOUNDARIES: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
MS_BOUNDARIES: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
AGE_BOUNDARIES: tuple[float, ...] = tuple(float(a) for a in range(5, 101, 5))

#: name -> (kind, description, tag keys, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "ageray_requests": (
        "counter",
        "HTTP requests answered, by route and status code",
        ("route", "status"),
        None,
    ),
    "ageray_images": ("counter", "images answered", (), None),
    "ageray_batch_size": ("histogram", "images per forward pass", (), BATCH_BOUNDARIES),
    "ageray_queue_wait_ms": (
        "histogram",
        "per image: milliseconds from joining the batch queue to its forward's start",
        (),
        MS_BOUNDARIES,
    ),
    "ageray_forward_ms": (
        "histogram",
        "milliseconds per forward pass (image + flip through both heads)",
        (),
        MS_BOUNDARIES,
    ),
    "ageray_routed": (
        "counter",
        "answers by the head that answered (Adaptive Routing share)",
        ("head",),
        None,
    ),
    "ageray_predicted_age": ("histogram", "ages answered, in years", (), AGE_BOUNDARIES),
    "ageray_model_version": (
        "gauge",
        "registry version of the model being served (0: not a registry model)",
        ("model", "alias"),
        None,
    ),
}

#: Routes with a label of their own; anything else is "other" (bounded label cardinality:
#: a scanner probing random paths must not create a time series per path).
KNOWN_ROUTES = ("/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/docs", "/openapi.json")


def route_label(path: str, root_path: str = "") -> str:
    """The ``route`` label for a request path (the app's route, without its prefix)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :] or "/"
    if path.startswith("/static/"):
        return "/static"
    return path if path in KNOWN_ROUTES else "other"


def _version_number(version: Any) -> float:
    try:
        return float(int(str(version)))
    except (TypeError, ValueError):
        return 0.0


class MemoryRecorder:
    """Counts in memory: the recorder outside Ray (tests, ``serve`` code run in-process).

    ``values[name][tags]`` is a counter's total, a gauge's value, or a histogram's list of
    observations, where ``tags`` is a sorted tuple of (key, value) pairs.
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[tuple[str, str], ...], Any]] = {}
        self._lock = threading.Lock()

    def record(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        kind = METRICS[name][0]
        key = tuple(sorted(tags.items()))
        with self._lock:
            series = self.values.setdefault(name, {})
            if kind == "counter":
                series[key] = series.get(key, 0.0) + value
            elif kind == "gauge":
                series[key] = value
            else:
                series.setdefault(key, []).append(value)

    def total(self, name: str, **tags: str) -> float:
        """A counter's sum (or a histogram's count) over the series matching ``tags``."""
        out = 0.0
        for key, v in self.values.get(name, {}).items():
            if all((k, val) in key for k, val in tags.items()):
                out += len(v) if isinstance(v, list) else v
        return out


class _RayRecorder:
    """Ray's metric objects, created on first use inside a Ray process."""

    def __init__(self) -> None:
        self._objects: dict[str, Any] = {}

    def _get(self, name: str) -> Any:
        obj = self._objects.get(name)
        if obj is None:
            from ray.serve import metrics as serve_metrics

            kind, description, tag_keys, boundaries = METRICS[name]
            keys = tag_keys or None
            if kind == "counter":
                obj = serve_metrics.Counter(name, description=description, tag_keys=keys)
            elif kind == "gauge":
                obj = serve_metrics.Gauge(name, description=description, tag_keys=keys)
            else:
                obj = serve_metrics.Histogram(
                    name, description=description, boundaries=list(boundaries), tag_keys=keys
                )
            self._objects[name] = obj
        return obj

    def record(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        obj = self._get(name)
        kind = METRICS[name][0]
        tags = dict(tags) or None
        if kind == "counter":
            obj.inc(value, tags=tags)
        elif kind == "gauge":
            obj.set(value, tags=tags)
        else:
            obj.observe(value, tags=tags)


def _in_ray() -> bool:
    ray = sys.modules.get("ray")  # only when this process already runs Ray
    return ray is not None and bool(getattr(ray, "is_initialized", lambda: False)())


class ServeMetrics:
    """The replica's metrics (see the module docstring for names and meanings).

    ``recorder``: where values go; default Ray's metrics inside a Ray process, else a
    :class:`MemoryRecorder`.
    """

    def __init__(self, recorder: Any | None = None) -> None:
        self._recorder = recorder
        self._broken = False

    @property
    def recorder(self) -> Any:
        """Chosen on first use, not at import: ``serve.app`` is imported by the driver
        too, and only the replica (a Ray process) records into Ray."""
        if self._recorder is None:
            self._recorder = _RayRecorder() if _in_ray() else MemoryRecorder()
        return self._recorder

    def _record(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        if self._broken:
            return
        try:
            self.recorder.record(name, float(value), dict(tags or {}))
        except Exception as exc:  # metrics are best effort; answers never fail on them
            self._broken = True
            log.warning("ageray: metrics recording disabled after an error: %s", exc)

    def request(self, route: str, status: int) -> None:
        self._record("ageray_requests", 1, {"route": route, "status": str(int(status))})

    def batch(self, size: int, forward_ms: float, queue_ms: Sequence[float]) -> None:
        """One forward pass of ``size`` images, and each image's wait in the queue."""
        self._record("ageray_batch_size", size)
        self._record("ageray_forward_ms", forward_ms)
        for q in queue_ms:
            self._record("ageray_queue_wait_ms", q)

    def answer(self, head: str, age: float) -> None:
        """One image answered by ``head`` with ``age``."""
        self._record("ageray_images", 1)
        self._record("ageray_routed", 1, {"head": str(head)})
        self._record("ageray_predicted_age", age)

    def model(self, name: Any, version: Any, alias: Any) -> None:
        """The model now served (after load and after every swap)."""
        tags = {"model": str(name or ""), "alias": str(alias or "")}
        self._record("ageray_model_version", _version_number(version), tags)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


class RequestMetrics:
    """ASGI middleware: counts every HTTP response by route and status.

    Outermost in the app, so refusals by the request guard (408, 413, 431) and Serve-side
    validation errors are counted like answers; an exception that escapes the app is a
    ``500``. A request that ends without any response (the client went away) is counted
    with status ``499`` (nginx's "client closed request").
    """

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counting_send(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status.append(int(message.get("status", 0)))
            await send(message)

        route = route_label(scope.get("path", ""), scope.get("root_path", ""))
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # answered 500 by Starlette's outermost error middleware
            self.metrics.request(route, status[0] if status else 500)
            raise
        except BaseException:  # cancelled: the client went away
            self.metrics.request(route, status[0] if status else 499)
            raise
        self.metrics.request(route, status[0] if status else 499)
