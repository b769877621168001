"""The BentoML peer: ONNX Runtime behind BentoML's adaptive batching, in its own venv.

    AGERAY_PEER_ONNX=DIR/export/onnx/model.onnx /work/peers-venv/bentoml/bin/bentoml serve \
        bentoml_onnx:Front --working-dir benchmarks/peers --host 127.0.0.1 --port P

Two services, as BentoML batches: ``Front`` (one worker) takes ``POST /predict`` with a raw
image body (a Starlette route mounted on the service: BentoML's own API types read JSON or
multipart, not a raw ``image/jpeg`` body), preprocesses in a thread (preprocess.py: ageray's,
in numpy) and calls ``AgeModel.forward`` (``batchable=True``, ``max_batch_size``
AGERAY_PEER_MAX_BATCH = 32, ``max_latency_ms`` 10000 so nothing is shed) in the second
service's one worker, whose dispatcher merges concurrent calls into one ONNX Runtime run with
AGERAY_PEER_THREADS intra-op threads. Answers ``{"age": ...}``.

``runner_connection``: BentoML's client to a dependency closes its aiohttp session every
``max_requests`` (default 100) calls and opens a new one, and the calls still in flight on the
old session fail ("Server disconnected", a 500 to the client): at 8 clients ~5% of the answers
were errors (BentoML 1.4.40). The session is kept for the whole run instead, as a deployment
that serves without errors would have to."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import bentoml
import numpy as np
from preprocess import Preprocess, onnx_session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ONNX = os.environ.get("AGERAY_PEER_ONNX", "")
MAX_BATCH = int(os.environ.get("AGERAY_PEER_MAX_BATCH", "32"))
THREADS = int(os.environ.get("AGERAY_PEER_THREADS", "1"))


# one session for the run: BentoML's refresh fails the calls in flight (module docstring)
KEEP_SESSION = {"max_requests": 2**31 - 1, "max_age": 1e9}


@bentoml.service(
    workers=1,
    traffic={"timeout": 120},
    logging={"access": {"enabled": False}},
    runner_connection=KEEP_SESSION,
)
class AgeModel:
    def __init__(self) -> None:
        self.session = onnx_session(ONNX, THREADS)
        self.input_name = self.session.get_inputs()[0].name
        self.age_index = [o.name for o in self.session.get_outputs()].index("age")

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=10000)
    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.astype(np.float32)})[self.age_index]


_front: list[Any] = []


async def predict(request: Request) -> JSONResponse:
    service = _front[0]
    data = await request.body()
    try:
        x = await asyncio.get_running_loop().run_in_executor(None, service.pre, data)
    except Exception as exc:  # a bad image is a 400
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)
    age = await service.model.to_async.forward(x[None])
    return JSONResponse({"age": float(np.asarray(age).reshape(-1)[0])})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])


@bentoml.service(workers=1, traffic={"timeout": 120}, logging={"access": {"enabled": False}})
@bentoml.asgi_app(app, path="/")
class Front:
    model = bentoml.depends(AgeModel)

    def __init__(self) -> None:
        self.pre = Preprocess.from_export(ONNX)
        _front.append(self)
