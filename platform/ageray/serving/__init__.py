"""Serving logic without Ray: request limits and parsing, image decoding, the served model,
answers, auth and admission, and the request guard.

Why a package apart from the Serve app: ``serve/app.py`` is wiring only (routes, the
``@serve.batch`` queue, the model swap). Every rule about what a request may contain, how
long it may take to arrive and what an answer looks like lives here, so it is unit-tested
without starting Ray and the HTTP layer cannot drift from it.

Modules, one job each:

* ``errors``     :class:`ServeError` and its named constructors; the one JSON envelope.
* ``settings``   :class:`Limits` and :class:`ServeSettings` (Serve ``user_config``), built
                 by :func:`ageray.config.build_dataclass` like every typed config.
* ``requests``   header and body limits, the capped body read with a deadline, the raw /
                 multipart / JSON parsers.
* ``guard``      :class:`RequestGuard`, the ASGI middleware that applies those limits in
                 front of the app and, through Serve's proxy callback, before routing.
* ``images``     header check (pixel bombs) and evaluation's decoder.
* ``model``      :class:`ServedModel`: load, warm up, bytes -> model input, forward, answer.
* ``admission``  bearer-token auth and the in-flight image bound.
* ``batching``   :class:`BatchWindow`, the adaptive batch wait.

Bad input is always a :class:`ServeError` (a 4xx with a code and a message naming the input
and the fix), never a 500.
"""

from ageray.serving.admission import Admission, check_auth
from ageray.serving.batch_window import BatchWindow
from ageray.serving.errors import ServeError, error_body
from ageray.serving.guard import (
    GuardCounts,
    LiveLimits,
    RequestGuard,
    install_edge_guard,
    proxy_middlewares,
)
from ageray.serving.images import check_image_header, decode_checked
from ageray.serving.requests import (
    ClientDisconnected,
    ImagePayload,
    ParsedRequest,
    check_headers,
    content_length_cap,
    parse_predict_body,
    read_body,
)
from ageray.serving.settings import Limits, ServeSettings

# The model side imports torch (~1-2 GB, seconds to import). Serve's HTTP proxy imports this
# package for the edge guard and must not pay that: it would load torch into every proxy and
# make the proxy miss its readiness checks while it imports. Loaded on first use instead.
_MODEL_NAMES = frozenset(
    {
        "ServedModel",
        "batch_buckets",
        "build_answers",
        "build_faces_answer",
        "build_prediction",
        "load_served_model",
        "warmup",
    }
)


def __getattr__(name: str):  # PEP 562
    if name in _MODEL_NAMES:
        from ageray.serving import model

        return getattr(model, name)
    raise AttributeError(f"module 'ageray.serving' has no attribute {name!r}")


__all__ = [
    "Admission",
    "BatchWindow",
    "ClientDisconnected",
    "GuardCounts",
    "ImagePayload",
    "Limits",
    "LiveLimits",
    "ParsedRequest",
    "RequestGuard",
    "ServeError",
    "ServeSettings",
    "ServedModel",
    "batch_buckets",
    "build_answers",
    "build_faces_answer",
    "build_prediction",
    "check_auth",
    "check_headers",
    "check_image_header",
    "content_length_cap",
    "decode_checked",
    "error_body",
    "install_edge_guard",
    "load_served_model",
    "parse_predict_body",
    "proxy_middlewares",
    "read_body",
    "warmup",
]
