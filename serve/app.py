"""Ray Serve application: the routed dual-classifier age model over HTTP.

Run it::

    serve run serve.app:app model_uri=models:/ageray@candidate      # or AGERAY_MODEL_URI
    serve deploy serve/config.yaml                                  # on a running cluster

Layout (why): ONE deployment is both the FastAPI ingress and the batched model. A separate
ingress deployment would add a Ray actor call (serialisation + a hop) to every request,
which at concurrency 1 costs more than the forward saves; replicas scale out as a whole
(autoscaling in serve/config.yaml).

Per request: the request guard (``ageray.serving.guard``: header caps, the body read whole
under a byte cap and a deadline) -> auth -> parse (``ageray.serving``) -> admission
(in-flight images) -> decode + preprocess in the handler (evaluation's code; large images
in a worker thread) -> each image joins the ``@serve.batch`` queue -> the batch runs the one
inference path's forward (``ServedModel.forward``: image + flip, both heads, one backbone
pass, the model's routing rule per image) in a single forward thread, so the event loop keeps
accepting and decoding requests while the model computes -> JSON.

Batching (``ageray.serving.BatchWindow``): Serve forms the next batch while the previous one
runs, so a short fixed ``batch_wait_timeout_s`` cuts a busy replica's arrivals into many
tiny batches that queue for the forward thread (measured: mean batch ~1 at 8-32 clients).
Each image therefore sets the wait of the batch it may open: 0 when the forward thread is
idle and nothing else is being decoded (concurrency 1 pays nothing), otherwise "until the
running forward is expected to end" (EMA of the per-image time), so the next batch holds
everything that arrived meanwhile. ``max_batch_size`` (``1`` = off), ``batch_wait_timeout_s``
and ``batch_wait_mode`` (``adaptive`` / ``fixed``) are live ``user_config`` knobs.

Ingress: with Serve's default proxy every request costs a proxy hop plus one RPC from the
replica back to the proxy for the body (~5-10 ms on a 2-core machine). For the lowest
latency start the cluster with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress: this
replica serves HTTP itself) and ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy on :8000 in front);
the app needs no change (benchmarks/RESULTS.md compares both).

Model swap: ``reconfigure`` (a new ``model_uri`` in ``user_config``, or a changed
``reload`` value after the alias moved) downloads and loads the new model in a thread while
the old one keeps answering, warms it up, then swaps one reference. Each queued image
carries the model it was prepared for, so in-flight batches finish on the old weights and
nothing fails. A swap that fails keeps the old model and reports ``swap_error``.

Slow clients: the guard runs in this app under every way of running, and, when Serve's
proxy callback points at ``ageray.serving.guard:proxy_middlewares``, also in Serve's proxy
(or the replica's own HTTP server under direct ingress) *before* a request is routed, so
stalled uploads never take one of the replica's request slots. ``app`` (the ``serve run``
builder) sets that callback for the local Ray that ``serve run`` starts; ``serve deploy
serve/config.yaml`` sets it through the file's ``controller_options`` (Serve's proxies
inherit the controller's environment); the RayService sets it in the pods' environment.

Stopping (``ageray.serving.lifecycle``, ``ageray.serving.drain``): run it as ``python -m
serve.run serve.app:app ...``; on SIGINT/SIGTERM the edge answers new requests 503 +
Retry-After, lets the ones in flight finish, closes its listener, and only then Serve and
Ray stop. The builder also installs that drain for plain ``serve run``.

Endpoints: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``,
the web page at ``/`` (``ageray.serving.page``: upload, drag-and-drop or camera; it calls
``/v1/predict`` like any client), OpenAPI at ``/docs``. With ``AGERAY_API_TOKEN`` set (the
variable name is the ``auth_token_env`` setting), ``/v1/*`` needs ``Authorization: Bearer
<token>``; ``/healthz``, ``/readyz``, the page and the docs stay open so probes and humans
need no secret (the page has a token field). ``require_auth: true`` refuses to start
without a token (fail closed).

Following an alias: deployed on ``models:/<name>@<alias>`` the replica asks the registry
every ``model_poll_s`` seconds where the alias points and, when it moved (``jobs.promote``
moves ``champion``), swaps the new version in through the same in-place swap as a
redeploy. Every answer names the version that computed it.

Metrics (``ageray.serving.telemetry``): requests by route and status, images, batch sizes,
queue wait, forward time, answers by head, predicted ages and the served version, recorded
with ``ray.serve.metrics`` and exported by Ray in Prometheus format on each node's metrics
export port.
"""

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from ageray.inference import PreparedImage
from ageray.redaction import install as install_redaction
from ageray.redaction import redact, remember_uris
from ageray.serving import (
    Admission,
    BatchWindow,
    GuardCounts,
    LiveLimits,
    RequestGuard,
    ServedModel,
    ServeError,
    ServeSettings,
    build_answers,
    check_auth,
    install_edge_guard,
    load_served_model,
    parse_predict_body,
    warmup,
)
from ageray.serving.guard import EDGE_CALLBACK, EDGE_ENV
from ageray.serving.lifecycle import install_stop_handlers
from ageray.serving.page import PAGE_HEADERS, render_index, static_file
from ageray.serving.schema import PREDICT_RESPONSES
from ageray.serving.telemetry import RequestMetrics, ServeMetrics

log = logging.getLogger("ray.serve")

MODEL_URI_ENV = "AGERAY_MODEL_URI"
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}

api = FastAPI(
    title="ageray",
    version="1",
    description=(
        "Facial age estimation with GLAE's routed dual-classifier model: the image and its "
        "horizontal flip go through both classifier heads; per image the head whose "
        "prediction changes least under the flip (Adaptive Routing) answers.\n\n"
        "Auth: when the service runs with a bearer token, `/v1/*` needs "
        "`Authorization: Bearer <token>`; `/healthz`, `/readyz` and these docs are open.\n\n"
        'Errors are JSON `{"error": {"code", "message"}}` with a 4xx status naming the '
        "problem (415 wrong content type, 413 too large / too many pixels / too many images, "
        "400 not an image / truncated / malformed JSON or base64, 401 auth, 408 body not "
        "sent in time, 431 headers too large); 503 with `Retry-After` when the replica is "
        "overloaded or not ready."
    ),
    docs_url="/docs",
)

# The replica's current limits (reconfigure updates them) and what the guard refused.
GUARD_LIMITS = LiveLimits()
GUARD_COUNTS = GuardCounts()
api.add_middleware(RequestGuard, limits=GUARD_LIMITS, where="app", counts=GUARD_COUNTS)
# Outermost (added last): counts every answer, the guard's refusals included.
METRICS = ServeMetrics()
api.add_middleware(RequestMetrics, metrics=METRICS)

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "description": "one image in field 'file' (or 'image'); several files "
                    "answer {'predictions': [...]}",
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64 image file"},
                        "images": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "several base64 images; answers {'predictions'}",
                        },
                        "distribution": {"type": "boolean"},
                        "faces": {
                            "type": "string",
                            "enum": ["all", "largest"],
                            "description": "as the query parameter 'faces'",
                        },
                    },
                }
            },
        },
    }
}


def _error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(ServeError)
async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    return _error_response(ServeError.invalid_request(f"invalid parameters: {problems}"))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or a failing forward (not bad input, which is always a ServeError): logged
    with its traceback, answered as JSON like every other error."""
    log.error("ageray: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_response(ServeError.internal(exc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    return _error_response(ServeError.http(exc.status_code, str(exc.detail), headers))


def _stack(tensors: list[Any]) -> Any:
    """Defined before the class: Serve pickles the class when it is decorated."""
    import torch

    return torch.stack(tensors)


@dataclass
class _QueuedImage:
    """One image in the batch queue, tied to the model it was preprocessed for."""

    tensor: Any
    served: ServedModel
    enqueued: float


@serve.deployment(
    name="AgeEstimator",
    max_ongoing_requests=64,
    max_queued_requests=128,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    # glibc malloc for the replica as serve/config.yaml sets it (why: there): RSS that
    # settles, ~150 MB lower (benchmarks/serve_soak.py)
    ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": MALLOC_ENV}},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(api)
class AgeEstimator:
    """The ingress and the batched model in one replica (see the module docstring)."""

    def __init__(self, model_uri: str | None = None, settings: dict[str, Any] | None = None):
        uri = model_uri or os.environ.get(MODEL_URI_ENV)
        # Once per replica, before anything logs: no credential (in a model URI, the
        # environment) in this replica's log records, Ray's and Serve's included, its
        # stdout/stderr or a traceback (ageray.redaction).
        install_redaction()
        if not uri:
            raise ValueError(
                "no model to serve: pass model_uri=models:/<name>@<alias> to the app builder "
                f"(serve run serve.app:app model_uri=...) or set {MODEL_URI_ENV}"
            )
        remember_uris([uri])
        self._init_settings = ServeSettings.from_mapping({**(settings or {}), "model_uri": uri})
        self._init_settings.check_auth_configured()  # fail closed before loading anything
        self._settings = self._init_settings
        self._ready = False
        self._served: ServedModel | None = None
        self._swap_lock = asyncio.Lock()
        self._swap_error: str | None = None
        self._decoding = 0  # images admitted and not yet in the batch queue
        self._window = BatchWindow()
        self._admission = Admission(self._settings.max_inflight_images)
        # One forward thread: torch runs one batch at a time with all its intra-op threads;
        # decoding pools separately so large uploads never wait behind a forward.
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="ageray-forward")
        self._decode_pool = ThreadPoolExecutor(2, thread_name_prefix="ageray-decode")
        self._apply_runtime_settings()
        self._edge_guard = os.environ.get(EDGE_ENV) == EDGE_CALLBACK
        if not self._edge_guard:
            log.info(
                "ageray: no request guard in Serve's proxy on this node (%s is not %s): a "
                "stalled upload holds a request slot until limits.body_timeout_s",
                EDGE_ENV,
                EDGE_CALLBACK,
            )
        self._served = self._load(uri, self._settings)
        self._ready = True
        self._poll_task = self._start_alias_poll()

    # ------------------------------------------------------------------ config
    def _apply_runtime_settings(self) -> None:
        import torch

        s = self._settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self._forward_batch.set_max_batch_size(s.max_batch_size)
        self._forward_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self._admission.limit = s.max_inflight_images
        GUARD_LIMITS.value = s.limits

    def _load(
        self, uri: str, settings: ServeSettings, registry: dict[str, Any] | None = None
    ) -> ServedModel:
        """Download + load + warm up (blocking; reconfigure runs it in a thread)."""
        t0 = time.perf_counter()
        served = load_served_model(
            uri,
            settings.device,
            registry,
            channels_last=settings.channels_last,
            backend=settings.backend,
            threads=settings.torch_threads,
            max_batch_size=settings.max_batch_size,
        )
        warm_ms = warmup(served, settings.warmup_batch_sizes, settings.rule)
        served.warmup_ms = round(warm_ms, 1)
        ref = served.model_ref()
        METRICS.model(ref.get("name"), ref.get("version"), ref.get("alias"))
        phases = ", ".join(f"{k} {v:.0f}" for k, v in served.predictor.load_ms.items())
        log.info(
            "ageray: loaded %s version %s on %s (%s) in %.0f ms (%s, warm-up %.0f ms)",
            served.registry.get("name"),
            served.registry.get("version"),
            served.device,
            served.backend,
            (time.perf_counter() - t0) * 1000,
            phases,
            warm_ms,
        )
        return served

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``user_config``; load a new model version when the URI (or what its alias
        points to) changed. The old model answers until the new one is loaded and warm.

        A swap that fails (unknown version, registry down, weights that do not match) keeps
        the old model answering and reports the failure in ``/v1/model`` (``swap_error``)
        and the replica log, instead of raising: Serve would replace a replica whose
        reconfigure raised, and its replacement would fail the same way, turning a bad
        deploy into an outage. Settings errors (a typo in user_config) still raise: they
        are caught before any replica changes.
        """
        async with self._swap_lock:
            # Declarative: user_config overrides the constructor's settings; a key removed
            # from user_config falls back to the constructor's value.
            new = ServeSettings.from_mapping(user_config or {}, base=self._init_settings)
            if not new.model_uri:
                new.model_uri = self._init_settings.model_uri
            new.check_auth_configured()
            remember_uris([new.model_uri or ""])  # its parts, however an error quotes them
            current = self._served
            try:
                served = await self._maybe_load(new, current)
            except Exception as exc:  # any load failure: keep serving the old model
                if current is None:
                    raise
                self._swap_error = redact(  # an API field: no credential of the URI in it
                    f"loading {new.model_uri!r} failed, still serving "
                    f"{current.registry.get('uri')!r} (version "
                    f"{current.registry.get('version')}): {type(exc).__name__}: {exc}"
                )
                log.error("ageray: %s", self._swap_error)
                new.model_uri = current.registry.get("uri")
                served = None
            else:
                self._swap_error = None
            if served is not None:
                self._served = served  # the swap: one reference, atomic for the event loop
            elif (
                current is not None and new.warmup_batch_sizes != self._settings.warmup_batch_sizes
            ):
                # same model, new warm-up sizes: warm them in the forward thread (serialised
                # with live batches) before reconfigure returns and the sizes are expected
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    self._forward_pool, warmup, current, new.warmup_batch_sizes, new.rule
                )
            self._settings = new
            self._apply_runtime_settings()

    async def _maybe_load(
        self, new: ServeSettings, current: ServedModel | None
    ) -> ServedModel | None:
        """The new model if ``new.model_uri`` names other weights than ``current``."""
        reg: dict[str, Any] = {}
        if current is not None and new.model_uri.startswith("models:/"):
            from ageray.tracking import model_info

            reg = await asyncio.to_thread(model_info, new.model_uri)
        changed = current is None or new.model_uri != current.registry.get("uri")
        changed = changed or current.backend != new.backend  # torch <-> onnxruntime
        if reg and current is not None:
            changed = changed or (reg.get("name"), reg.get("version")) != (
                current.registry.get("name"),
                current.registry.get("version"),
            )
        if not changed:
            return None
        return await asyncio.to_thread(self._load, new.model_uri, new, reg or None)

    # ------------------------------------------------------------------ alias
    def _start_alias_poll(self) -> asyncio.Task | None:
        """The background task that follows ``models:/<name>@<alias>`` (see the module
        docstring). The constructor runs on the replica's event loop; outside one (a test
        building the class directly) there is nothing to follow with."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return loop.create_task(self._follow_alias())

    async def _follow_alias(self) -> None:
        last_error: str | None = None
        while True:
            settings = self._settings  # reconfigure may change the interval or the URI
            await asyncio.sleep(settings.model_poll_s if settings.follows_alias() else 5.0)
            if not self._settings.follows_alias() or self._served is None:
                continue
            try:
                await self._follow_once()
                last_error = None
            except Exception as exc:  # registry down: keep serving, say it once
                text = f"{type(exc).__name__}: {exc}"
                if text != last_error:
                    log.warning("ageray: following %s failed: %s", settings.model_uri, text)
                last_error = text

    async def _follow_once(self) -> bool:
        """One poll: swap in the version the alias points to now, if it moved. Under the
        swap lock, so it never interleaves with a reconfigure."""
        async with self._swap_lock:
            current = self._served
            served = await self._maybe_load(self._settings, current)
            if served is None:
                return False
            old = current.registry.get("version") if current is not None else None
            self._served = served
            self._swap_error = None
            log.info(
                "ageray: %s moved from version %s to %s; swapped in place",
                self._settings.model_uri,
                old,
                served.registry.get("version"),
            )
            return True

    def check_health(self) -> None:
        """Serve's periodic health check: unhealthy only without a model (bad requests
        are answered 4xx and never make a replica unhealthy)."""
        if self._served is None:
            raise RuntimeError("no model loaded")

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=1)
    async def _forward_batch(self, items: list[_QueuedImage]) -> list[tuple[dict[str, Any], dict]]:
        """One forward per model among the queued images (normally one model; two only
        for the moments of a swap), run in the forward thread."""
        loop = asyncio.get_running_loop()
        results: list[tuple[dict[str, Any], dict] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.served), []).append(i)
        for idx in groups.values():
            served = items[idx[0]].served
            rule = self._settings.rule
            x = _stack([items[i].tensor for i in idx])
            started = time.perf_counter()
            self._window.started(len(idx), started)
            try:
                outs = await loop.run_in_executor(self._forward_pool, served.forward, x, rule)
            finally:
                ended = time.perf_counter()
                self._window.finished(len(idx), ended - started)
            METRICS.batch(
                len(idx),
                (ended - started) * 1000.0,
                [(started - items[i].enqueued) * 1000.0 for i in idx],
            )
            for j, i in enumerate(idx):
                meta = {
                    "queue_ms": (started - items[i].enqueued) * 1000.0,
                    "forward_ms": (ended - started) * 1000.0,
                    "batch_size": len(idx),
                }
                results[i] = (outs[j], meta)
        return results  # type: ignore[return-value]

    async def _infer_one(self, tensor: Any, served: ServedModel) -> tuple[dict[str, Any], dict]:
        # Serve reads the wait when a batch starts forming; set it for the batch this image
        # may open (BatchWindow: 0 for a lone request, "until the running forward ends"
        # under load).
        wait = self._window.wait(time.perf_counter(), self._decoding, self._settings)
        self._forward_batch.set_batch_wait_timeout_s(wait)
        return await self._forward_batch(_QueuedImage(tensor, served, time.perf_counter()))

    # ------------------------------------------------------------------ helpers
    def _auth(self, request: Request) -> None:
        token = os.environ.get(self._settings.auth_token_env) or None
        check_auth(request.headers.get("authorization"), token)

    async def _model_input(
        self, served: ServedModel, data: bytes, name: str, faces: str
    ) -> PreparedImage:
        limits = self._settings.limits
        big = len(data) >= self._settings.decode_in_thread_bytes
        if big or faces == "all" or served.predictor.aligner is not None:  # detection runs
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._decode_pool, served.model_faces, data, name, limits, faces
            )
        return served.model_faces(data, name, limits, faces)

    # ------------------------------------------------------------------ routes
    @api.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The web page (open: it holds no data; its calls to /v1/* carry the token)."""
        html = render_index(request.scope.get("root_path", ""))
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        body, media_type = static_file(name)
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    @api.get("/healthz", summary="Liveness (open, no auth)")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: model loaded and warmed up (open, no auth)")
    async def readyz(self) -> JSONResponse:
        served = self._served
        if not self._ready or served is None:
            return _error_response(ServeError.not_ready(self._settings.retry_after_s))
        return JSONResponse({"status": "ready", "model": served.model_ref()})

    @api.get("/v1/model", summary="The served model: registry name, version, alias, metrics")
    async def model(self, request: Request) -> JSONResponse:
        self._auth(request)
        served = self._served
        if served is None:
            raise ServeError.not_ready(self._settings.retry_after_s)
        return JSONResponse(
            {
                **served.describe(),
                "serving": self._settings.public(),
                "swap_error": self._swap_error,
                "guard": {"edge": self._edge_guard, "refused": GUARD_COUNTS.snapshot()},
            }
        )

    @api.post(
        "/v1/predict",
        summary="Estimate the age of every face in one or several images",
        openapi_extra=_PREDICT_BODY,
        responses=PREDICT_RESPONSES,
    )
    async def predict(
        self,
        request: Request,
        distribution: bool = Query(False, description="add the 101-way age distribution"),
        faces: Literal["all", "largest"] = Query(
            "all",
            description="all: an answer per detected face ({'faces': [...]}, empty with a "
            "'reason' when there is none); largest: one flat answer per image, as for face "
            "chips (the JSON field 'faces' overrides this)",
        ),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        self._auth(request)
        served = self._served
        if not self._ready or served is None:
            raise ServeError.not_ready(self._settings.retry_after_s)
        body = await request.body()  # complete already: the request guard read it
        read_ms = (time.perf_counter() - t0) * 1000.0
        parsed = parse_predict_body(
            request.headers.get("content-type"), body, self._settings.limits
        )
        del body
        n = len(parsed.images)
        if not self._admission.try_enter(n):
            raise self._admission.overloaded(self._settings.retry_after_s)
        mode = parsed.faces or faces
        try:
            self._decoding += n
            try:
                inputs = [
                    await self._model_input(served, img.data, img.name, mode)
                    for img in parsed.images
                ]
            finally:
                self._decoding -= n
            # every face of the request joins the batch queue at once: one forward for all
            queued = [self._infer_one(f.tensor, served) for p in inputs for f in p.faces]
            outs = await asyncio.gather(*queued)
        finally:
            self._admission.leave(n)
        answers = build_answers(
            inputs,
            outs,
            served,
            faces=mode,
            distribution=distribution or parsed.distribution,
            read_ms=read_ms,
            total_ms=(time.perf_counter() - t0) * 1000.0,
        )
        for a in answers:
            for one in a.get("faces", [a]):
                METRICS.answer(one["head"], one["age"])
        return JSONResponse({"predictions": answers} if parsed.many else answers[0])


# ---------------------------------------------------------------------- builders


class AppArgs(BaseModel):
    """``serve run serve.app:app model_uri=... [device=cpu] [backend=auto] [max_batch_size=32]
    [num_replicas=2] [max_replicas_per_node=1]``.

    ``backend`` defaults to torch here (a rule may then be chosen per request); serve/config.yaml
    deploys ``auto`` (ONNX Runtime on a CPU, the faster: benchmarks/RESULTS.md)."""

    model_uri: str | None = None
    device: str | None = None
    backend: Literal["torch", "onnxruntime", "auto"] | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    # deployment options, for a cluster without a config file (``serve.run`` in a job):
    num_replicas: int | None = None
    max_replicas_per_node: int | None = None  # 1 = each replica on a node of its own


DEPLOYMENT_ARGS = ("num_replicas", "max_replicas_per_node")


def build_app(
    model_uri: str | None = None,
    settings: dict[str, Any] | None = None,
    user_config: dict[str, Any] | None = None,
    **deployment_options: Any,
) -> Application:
    """The application, for Python callers (tests, benchmarks).

    ``settings`` are constructor defaults; ``user_config`` is Serve's live config (changing
    it on a running app calls ``reconfigure`` in place: model swap, batch knobs, limits);
    ``deployment_options`` go to ``AgeEstimator.options`` (``max_ongoing_requests``,
    ``ray_actor_options``, ``autoscaling_config``, ...).
    """
    uri = model_uri or os.environ.get(MODEL_URI_ENV)
    dep = AgeEstimator
    opts = dict(deployment_options)
    if user_config is not None:
        opts["user_config"] = user_config
    if opts:
        dep = dep.options(**opts)
    return dep.bind(uri, settings or {})


def app(args: AppArgs) -> Application:
    """Builder for ``serve run serve.app:app model_uri=...`` and ``serve deploy``.

    ``serve run`` calls it before it starts a local Ray: the request guard is then set as
    Serve's proxy callback for that Ray (an explicit ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_
    PATH``, empty included, is left alone), and SIGINT/SIGTERM drain the proxy before
    ``serve run`` stops Serve (``ageray.serving.lifecycle``). On a running cluster this
    changes nothing.
    """
    import ray

    install_redaction()  # the serve run console and this process's logs (ageray.redaction)
    remember_uris([args.model_uri or os.environ.get(MODEL_URI_ENV) or ""])
    if not ray.is_initialized():
        install_edge_guard()
        install_stop_handlers()
    given = {k: v for k, v in args.model_dump().items() if k != "model_uri" and v is not None}
    options = {k: given.pop(k) for k in DEPLOYMENT_ARGS if k in given}
    return build_app(args.model_uri, given, **options)
