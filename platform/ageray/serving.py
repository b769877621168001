"""Serving logic without Ray: request parsing and limits, image decoding, the served model,
response building, bearer-token auth and admission control.

Why a separate module: the Ray Serve app (``serve/app.py``) is wiring only — routes, the
``@serve.batch`` queue, the model swap. Every rule about what a request may contain and what
an answer looks like lives here, so it is unit-tested without starting Ray (tests/unit/
test_serving.py) and the HTTP layer cannot drift from it.

Rules this module keeps:

* **Bad input is a 4xx JSON error, never a 500.** Every rejection is a :class:`ServeError`
  with an HTTP status, a machine-readable ``code`` and a message that names the input and
  the fix; :meth:`ServeError.body` is ``{"error": {"code", "message"}}``.
* **Limits are explicit.** Body bytes (checked while reading, before parsing), bytes per
  image, images per request, and pixels per image (read from the image header *before* any
  pixel is decoded, independent of ``PIL.Image.MAX_IMAGE_PIXELS``; Pillow's own
  decompression-bomb guard stays on as a second net and maps to the same 413).
* **Preprocessing is evaluation's.** Bytes are decoded with
  :func:`ageray.data.transforms.decode_image` (``target_size`` = the model's image size, as
  the eval streams do) and turned into tensors with :func:`~ageray.data.transforms.
  preprocess_for_eval` using the ``data`` section of the model's ``model.json``; a model
  saved with ``"align": true`` first goes through the shard writer's
  :class:`ageray.data.align.FaceAligner` path (``align_bytes``: align, JPEG re-encode).
* **The forward is GLAE's test protocol.** ``model.predict(x, flip=True, rule=...)``: image
  and flip in one pass, both heads on one backbone pass, Adaptive Routing per image.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import hmac
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

__all__ = [
    "Admission",
    "BatchWindow",
    "ImagePayload",
    "Limits",
    "ParsedRequest",
    "Prepared",
    "ServeError",
    "ServeSettings",
    "ServedModel",
    "build_prediction",
    "check_auth",
    "check_image_header",
    "content_length_cap",
    "decode_checked",
    "load_served_model",
    "parse_predict_body",
    "warmup",
]

MiB = 1024 * 1024
RAW_TYPES = ("image/", "application/octet-stream")
ACCEPTED = (
    "multipart/form-data (field 'file' or 'image'), image/* or application/octet-stream "
    '(raw image bytes), or application/json ({"image": "<base64>"} or '
    '{"images": ["<base64>", ...]})'
)
MULTIPART_FIELDS = ("file", "image", "images", "files")
JSON_KEYS = ("image", "images", "distribution")


# --------------------------------------------------------------------------- errors


class ServeError(Exception):
    """A request the service refuses, as an HTTP status + code + message (+ headers).

    ``code`` is stable (clients branch on it); ``message`` is for people and says which
    input was wrong and how to fix it.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def __repr__(self) -> str:
        return f"ServeError({self.status}, {self.code!r}, {self.message!r})"


# --------------------------------------------------------------------------- settings


@dataclass
class Limits:
    """What one request may carry. Defaults suit phone photos of faces.

    ``max_pixels`` (width x height from the header) bounds decoded memory: 25 MP is a 24 MP
    photo, ~75 MB as RGB; JPEGs decode at a reduced draft size anyway. ``max_request_bytes``
    bounds the whole body (a 10 MB image is ~13.4 MB as base64 JSON).
    """

    max_image_bytes: int = 10 * MiB
    max_request_bytes: int = 16 * MiB
    max_pixels: int = 25_000_000
    max_images: int = 16

    def validate(self) -> Limits:
        for name in ("max_image_bytes", "max_request_bytes", "max_pixels", "max_images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"serving limit {name}={getattr(self, name)} must be >= 1")
        return self


@dataclass
class ServeSettings:
    """The replica's knobs: Serve ``user_config`` keys (all optional) on top of defaults.

    ``max_batch_size`` is in images (a request with 4 images adds 4); 1 turns batching off.
    ``batch_wait_mode: adaptive`` (default) sizes the wait of a forming batch with
    :class:`BatchWindow`: a lone request never waits; while a forward is running the batch
    stays open until that forward should end (it could not start earlier anyway, and this
    way it collects everything that arrives meanwhile); ``batch_wait_timeout_s`` is the
    wait when only other requests' decoding is pending. ``fixed`` always waits
    ``batch_wait_timeout_s`` (Serve's plain behaviour). ``max_inflight_images`` is the
    replica's admission limit: above it requests get 503 + ``Retry-After`` instead of
    queueing without bound. ``auth_token_env`` names the
    environment variable that holds the bearer token (unset or empty: auth off).
    ``decode_in_thread_bytes``: payloads at least this large are decoded in a worker thread
    so the event loop keeps accepting requests; small ones decode inline (cheaper).
    ``reload``: any string; changing it makes Serve call ``reconfigure`` so that a
    ``models:/<name>@<alias>`` whose alias was moved is resolved again (same URI, new
    version). ``channels_last``: run the CNN in NHWC memory format (oneDNN / cuDNN pick
    faster kernels: ~25% more images/s for batches on CPU; answers move by ~1e-5 years).
    """

    model_uri: str | None = None
    reload: str | None = None  # change it to re-resolve an alias that moved (same model_uri)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int | None = None
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    max_inflight_images: int = 256
    retry_after_s: int = 1
    rule: Literal["smaller", "bigger"] = "smaller"
    warmup_batch_sizes: tuple[int, ...] = (1,)
    auth_token_env: str = "AGERAY_API_TOKEN"
    decode_in_thread_bytes: int = 256 * 1024
    batch_wait_mode: Literal["adaptive", "fixed"] = "adaptive"
    channels_last: bool = True
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, base: ServeSettings | None = None
    ) -> ServeSettings:
        """Settings from a ``user_config`` dict; unknown keys fail with a suggestion.

        Limit keys may be given flat (``max_image_bytes: 5000000``) or under ``limits``.
        """
        out = dataclasses.replace(base) if base is not None else cls()
        out.limits = dataclasses.replace(out.limits)
        limit_names = {f.name for f in dataclasses.fields(Limits)}
        names = {f.name for f in dataclasses.fields(cls)} - {"limits"}
        items = dict(data or {})
        nested = items.pop("limits", None) or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"serving setting limits={nested!r} must be a mapping")
        items.update(nested)
        for key, value in items.items():
            if key in limit_names:
                setattr(out.limits, key, int(value))
            elif key in names:
                setattr(out, key, _coerce_setting(key, value))
            else:
                close = difflib.get_close_matches(key, sorted(names | limit_names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown serving setting {key!r}{hint} (known: "
                    f"{', '.join(sorted(names | limit_names))})"
                )
        return out.validate()

    def validate(self) -> ServeSettings:
        self.limits.validate()
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1 (1 = off)")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError(
                f"batch_wait_timeout_s={self.batch_wait_timeout_s} must lie in [0, 1] "
                "seconds; a few milliseconds is typical"
            )
        if self.max_inflight_images < self.limits.max_images:
            raise ValueError(
                f"max_inflight_images={self.max_inflight_images} is below max_images="
                f"{self.limits.max_images}: a full request could never be admitted"
            )
        if self.batch_wait_mode not in ("adaptive", "fixed"):
            raise ValueError(
                f"batch_wait_mode={self.batch_wait_mode!r} must be 'adaptive' (follow the "
                "running forward) or 'fixed' (always batch_wait_timeout_s)"
            )
        if self.rule not in ("smaller", "bigger"):
            raise ValueError(f"rule={self.rule!r} must be 'smaller' (AR) or 'bigger'")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be >= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} must be >= 1 or null")
        return self

    def public(self) -> dict[str, Any]:
        """What ``/v1/model`` shows (no secrets: the token's variable name, not its value)."""
        d = dataclasses.asdict(self)
        d["auth"] = bool(os.environ.get(self.auth_token_env))
        return d


def _coerce_setting(key: str, value: Any) -> Any:
    ints = {"max_batch_size", "max_inflight_images", "retry_after_s", "decode_in_thread_bytes"}
    if key in ints:
        return int(value)
    if key == "batch_wait_timeout_s":
        return float(value)
    if key == "torch_threads":
        return None if value in (None, "", "null", "none") else int(value)
    if key == "channels_last":
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if key == "warmup_batch_sizes":
        if isinstance(value, int | str):
            value = [value]
        return tuple(int(v) for v in value)
    return None if value is None and key in ("model_uri", "reload") else str(value)


# --------------------------------------------------------------------------- auth


def check_auth(authorization: str | None, token: str | None) -> None:
    """Bearer-token check. ``token`` None/empty: auth is off and everything passes.

    Constant-time comparison (``hmac.compare_digest``) so the token cannot be guessed byte
    by byte from response times.
    """
    if not token:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="ageray"'}
    if not authorization:
        raise ServeError(
            401,
            "unauthorized",
            "missing Authorization header: send 'Authorization: Bearer <token>' (the token "
            "the service was started with in its token environment variable)",
            challenge,
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ServeError(
            401,
            "unauthorized",
            "the Authorization header must be 'Bearer <token>'",
            challenge,
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServeError(401, "unauthorized", "the bearer token is not valid", challenge)


# --------------------------------------------------------------------------- admission


class Admission:
    """Bounded in-flight work for one replica, counted in images.

    Why: Serve's ``max_ongoing_requests`` / ``max_queued_requests`` count requests, but one
    request may carry ``max_images`` images; this bound keeps decoded tensors (memory) and
    queueing delay finite. A request that does not fit is answered 503 with ``Retry-After``
    at once rather than waiting.
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self._inflight = 0
        self._lock = threading.Lock()

    @property
    def inflight(self) -> int:
        return self._inflight

    def try_enter(self, n: int) -> bool:
        with self._lock:
            if self._inflight + n > self.limit:
                return False
            self._inflight += n
            return True

    def leave(self, n: int) -> None:
        with self._lock:
            self._inflight = max(0, self._inflight - n)

    def overloaded(self, retry_after_s: int) -> ServeError:
        return ServeError(
            503,
            "overloaded",
            f"the replica already holds {self._inflight} images in flight (limit "
            f"{self.limit}); retry after {retry_after_s}s or send fewer images per request",
            {"Retry-After": str(max(0, math.ceil(retry_after_s)))},
        )


# --------------------------------------------------------------------------- batching


class BatchWindow:
    """How long a forming ``@serve.batch`` batch should wait for more images.

    Why: Serve forms the next batch while the previous one still runs (then the new batch
    waits for the forward thread). With a short fixed wait, a busy replica therefore cuts
    the arrivals of one forward's duration into many tiny batches that run one after the
    other: batching never pays. Here the wait follows the forward that is running: a batch
    that starts forming during a forward stays open until that forward is expected to end
    (estimated from an EMA of the per-image forward time), so it takes every image that
    arrived meanwhile; when the forward thread is idle and nothing else is being decoded
    the wait is 0, so a lone request at concurrency 1 pays nothing.
    """

    def __init__(self, alpha: float = 0.2, cap_s: float = 1.0) -> None:
        self.alpha = alpha
        self.cap_s = cap_s
        self.per_image_s: float | None = None
        self.busy_until = 0.0

    def started(self, n: int, now: float) -> None:
        """A forward of ``n`` images starts at ``now`` (perf_counter seconds)."""
        self.busy_until = now + (self.per_image_s or 0.0) * n

    def finished(self, n: int, seconds: float) -> None:
        per = seconds / max(1, n)
        self.per_image_s = (
            per
            if self.per_image_s is None
            else (1 - self.alpha) * self.per_image_s + self.alpha * per
        )
        self.busy_until = 0.0

    def wait(self, now: float, decoding: int, settings: ServeSettings) -> float:
        """Seconds the batch that an image joins now should stay open."""
        base = settings.batch_wait_timeout_s
        if settings.max_batch_size <= 1:
            return 0.0
        if settings.batch_wait_mode == "fixed":
            return base
        pending = base if decoding > 0 else 0.0
        return min(self.cap_s, max(self.busy_until - now, pending))


# --------------------------------------------------------------------------- parsing


@dataclass
class ImagePayload:
    """One encoded image from a request; ``name`` is how errors refer to it."""

    data: bytes
    name: str


@dataclass
class ParsedRequest:
    images: list[ImagePayload]
    many: bool  # answer {"predictions": [...]} (JSON "images" or several multipart files)
    distribution: bool = False  # JSON body may ask for it too


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def content_length_cap(content_type: str | None, limits: Limits) -> int:
    """The most body bytes worth reading for this content type (checked while reading)."""
    media = _media_type(content_type)
    if media.startswith(RAW_TYPES):
        return limits.max_image_bytes
    return limits.max_request_bytes


def _too_large_body(n: int, cap: int, media: str) -> ServeError:
    what = "an image body" if media.startswith(RAW_TYPES) else "a request body"
    return ServeError(
        413,
        "payload_too_large",
        f"the request body is larger than {cap} bytes ({n if n else 'more'} sent), the limit "
        f"for {what}; send a smaller (re-encoded or downscaled) image",
    )


def parse_predict_body(content_type: str | None, body: bytes, limits: Limits) -> ParsedRequest:
    """Split a ``POST /v1/predict`` body into encoded images, or raise :class:`ServeError`.

    Accepted: multipart/form-data (fields ``file``/``image``; several files answer a list),
    raw ``image/*`` / ``application/octet-stream``, JSON ``{"image": b64}`` or
    ``{"images": [b64, ...]}``. Images are not decoded here.
    """
    media = _media_type(content_type)
    if not media:
        raise ServeError(
            415,
            "unsupported_media_type",
            f"the request has no Content-Type; send one of: {ACCEPTED}",
        )
    if not (
        media.startswith(RAW_TYPES)
        or media == "multipart/form-data"
        or media == "application/json"
        or media.endswith("+json")
    ):
        raise ServeError(
            415,
            "unsupported_media_type",
            f"Content-Type {media!r} is not accepted; send one of: {ACCEPTED}",
        )
    if not body:
        raise ServeError(
            400, "empty_body", f"the request body is empty; send an image as {ACCEPTED}"
        )
    cap = content_length_cap(content_type, limits)
    if len(body) > cap:
        raise _too_large_body(len(body), cap, media)
    if media.startswith(RAW_TYPES):
        return ParsedRequest([ImagePayload(body, "body")], many=False)
    if media == "multipart/form-data":
        return _parse_multipart(content_type or "", body, limits)
    return _parse_json(body, limits)


def _check_count(n: int, limits: Limits) -> None:
    if n > limits.max_images:
        raise ServeError(
            413,
            "too_many_images",
            f"{n} images in one request; at most {limits.max_images} are allowed: split them "
            "over several requests",
        )


def _check_image_bytes(n: int, name: str, limits: Limits) -> None:
    if n > limits.max_image_bytes:
        raise ServeError(
            413,
            "image_too_large",
            f"image {name!r} is {n} bytes; the limit is {limits.max_image_bytes} bytes per "
            "image: send a smaller (re-encoded or downscaled) image",
        )


def _parse_json(body: bytes, limits: Limits) -> ParsedRequest:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ServeError(
            400,
            "malformed_json",
            f'the body is not valid JSON ({exc}); send {{"image": "<base64>"}} or '
            '{"images": ["<base64>", ...]}',
        ) from exc
    if not isinstance(doc, dict):
        raise ServeError(
            422,
            "invalid_request",
            f"the JSON body must be an object, got {type(doc).__name__}; send "
            '{"image": "<base64>"} or {"images": [...]}',
        )
    unknown = sorted(set(doc) - set(JSON_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], JSON_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ServeError(
            422,
            "invalid_request",
            f"unknown JSON field(s) {unknown}{hint}; allowed: {list(JSON_KEYS)}",
        )
    distribution = doc.get("distribution", False)
    if not isinstance(distribution, bool):
        raise ServeError(422, "invalid_request", "JSON field 'distribution' must be a boolean")
    if ("image" in doc) == ("images" in doc):
        raise ServeError(
            422,
            "invalid_request",
            "send exactly one of 'image' (one base64 string) or 'images' (a list of base64 "
            "strings)",
        )
    if "image" in doc:
        return ParsedRequest(
            [_b64_image(doc["image"], "image", limits)], many=False, distribution=distribution
        )
    items = doc["images"]
    if not isinstance(items, list):
        raise ServeError(
            422,
            "invalid_request",
            f"'images' must be a list of base64 strings, got {type(items).__name__}",
        )
    if not items:
        raise ServeError(422, "invalid_request", "'images' is empty; send at least one image")
    _check_count(len(items), limits)
    images = [_b64_image(v, f"images[{i}]", limits) for i, v in enumerate(items)]
    return ParsedRequest(images, many=True, distribution=distribution)


_WS = str.maketrans("", "", " \t\r\n")


def _b64_image(value: Any, name: str, limits: Limits) -> ImagePayload:
    if not isinstance(value, str):
        raise ServeError(
            422,
            "invalid_request",
            f"{name!r} must be a base64 string, got {type(value).__name__}",
        )
    text = value
    if text.startswith("data:"):  # data URL: data:image/jpeg;base64,<payload>
        head, sep, rest = text.partition(",")
        if not sep or ";base64" not in head:
            raise ServeError(
                400,
                "malformed_base64",
                f"{name!r} is a data URL without ';base64,'; send plain base64",
            )
        text = rest
    text = text.translate(_WS)
    if not text:
        raise ServeError(400, "empty_image", f"{name!r} is an empty string; send an image")
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    _check_image_bytes(len(text) // 4 * 3, name, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServeError(
            400,
            "malformed_base64",
            f"{name!r} is not valid base64 ({exc}); encode the image file's bytes with "
            "standard base64 (RFC 4648, with padding)",
        ) from exc
    _check_image_bytes(len(data), name, limits)
    return ImagePayload(data, name)


def _parse_multipart(content_type: str, body: bytes, limits: Limits) -> ParsedRequest:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError(
            400,
            "malformed_multipart",
            "multipart/form-data without a boundary parameter; let your HTTP client build "
            "the multipart body (e.g. curl -F file=@face.jpg)",
        )
    parts: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state["part"] = {"headers": {}, "chunks": [], "size": 0}
        state["field"] = b""
        state["value"] = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        key = state["field"].decode("latin-1").strip().lower()
        state["part"]["headers"][key] = state["value"].decode("latin-1")
        state["field"] = b""
        state["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = state["part"]
        part["size"] += end - start
        if part["size"] <= limits.max_image_bytes:  # keep counting, stop storing
            part["chunks"].append(data[start:end])

    def on_part_end() -> None:
        parts.append(state.pop("part"))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
        max_size=limits.max_request_bytes,
    )
    try:
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError, KeyError) as exc:
        raise ServeError(
            400,
            "malformed_multipart",
            f"the multipart/form-data body cannot be parsed ({exc}); let your HTTP client "
            "build it (e.g. curl -F file=@face.jpg)",
        ) from exc
    images: list[ImagePayload] = []
    seen: list[str] = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get("content-disposition", ""))
        field_name = disp.get(b"name", b"").decode("utf-8", "replace")
        seen.append(field_name)
        if field_name not in MULTIPART_FIELDS:
            continue
        filename = disp.get(b"filename", b"").decode("utf-8", "replace")
        name = f"{field_name}:{filename}" if filename else field_name
        _check_image_bytes(part["size"], name, limits)
        images.append(ImagePayload(b"".join(part["chunks"]), name))
        _check_count(len(images), limits)
    if not images:
        raise ServeError(
            422,
            "missing_image",
            f"the multipart body has no 'file' or 'image' field (fields sent: {seen}); "
            "upload the image as -F file=@face.jpg",
        )
    return ParsedRequest(images, many=len(images) > 1)


# --------------------------------------------------------------------------- decoding


def check_image_header(data: bytes, name: str, limits: Limits) -> tuple[int, int]:
    """Read only the header and enforce the byte and pixel limits; returns (width, height).

    Why before decoding: a 50 kB PNG can declare 100,000 x 100,000 pixels (a decompression
    bomb); the header says so before a single pixel is inflated. Pillow's own guard
    (``DecompressionBombError``, raised by ``Image.open`` above twice its global limit) is
    mapped to the same 413.
    """
    if not data:
        raise ServeError(400, "empty_image", f"image {name!r} is empty (0 bytes); send an image")
    _check_image_bytes(len(data), name, limits)
    try:
        with warnings.catch_warnings():
            # DecompressionBombWarning would only repeat what the explicit check below says.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(name, None, limits, str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _classify_unreadable(data, name, exc) from exc
    if width < 1 or height < 1:
        raise ServeError(400, "not_an_image", f"image {name!r} has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise _too_many_pixels(name, (width, height), limits)
    return width, height


def _classify_unreadable(data: bytes, name: str, exc: BaseException) -> ServeError:
    """Not an image at all, or an image cut short? Asks evaluation's decoder, whose
    ``CorruptImageError.reason`` the shard streams count by, so both agree."""
    from ageray.data.transforms import CorruptImageError, decode_image

    reason = "not_image"
    try:
        decode_image(data, name=name)
    except CorruptImageError as err:
        reason = err.reason
    except Image.DecompressionBombError:
        reason = "too_large"
    if reason == "truncated":
        return ServeError(
            400,
            "truncated_image",
            f"image {name!r} starts like an image file but is corrupt or cut short ({exc}); "
            "re-send the complete file",
        )
    return ServeError(
        400,
        "not_an_image",
        f"image {name!r} is not an image Pillow can read ({exc}); send a JPEG, PNG, WebP, "
        "BMP, GIF or TIFF file",
    )


def _too_many_pixels(
    name: str, size: tuple[int, int] | None, limits: Limits, detail: str = ""
) -> ServeError:
    what = (
        f"is {size[0]}x{size[1]} = {size[0] * size[1]} pixels"
        if size
        else f"declares a decompression-bomb size ({detail.rstrip('.')})"
    )
    return ServeError(
        413,
        "too_many_pixels",
        f"image {name!r} {what}; the limit is {limits.max_pixels} pixels: downscale it "
        "(a face needs a few hundred pixels per side)",
    )


def decode_checked(data: bytes, name: str, limits: Limits, target_size: int | None) -> Image.Image:
    """Header check, then :func:`ageray.data.transforms.decode_image` (evaluation's decoder,
    JPEG draft at ``target_size``); any mode (L, CMYK, alpha, 16-bit) comes back RGB."""
    from ageray.data.transforms import CorruptImageError, decode_image

    check_image_header(data, name, limits)
    try:
        return decode_image(data, target_size=target_size, name=name)
    except CorruptImageError as exc:
        status, code = {
            "too_large": (413, "too_many_pixels"),
            "truncated": (400, "truncated_image"),
        }.get(exc.reason, (400, "not_an_image"))
        hint = {
            "too_many_pixels": "downscale it",
            "truncated_image": "re-send the complete file",
            "not_an_image": "send a JPEG, PNG, WebP, BMP, GIF or TIFF file",
        }[code]
        raise ServeError(status, code, f"{exc}; {hint}") from exc


# --------------------------------------------------------------------------- the model


@dataclass
class Prepared:
    """One image ready for the batched forward: a (3, S, S) tensor plus what was learnt on
    the way (the face box when detection is on) and how long it took."""

    tensor: Any
    face: dict[str, Any] | None
    decode_ms: float


@dataclass
class ServedModel:
    """A loaded model with everything serving needs next to it.

    Immutable once built: the replica swaps the whole object on reconfigure, so an in-flight
    batch keeps using the object (and weights) it started with.
    """

    model: Any  # ageray.model.AgeModel
    info: dict[str, Any]  # model.json
    registry: dict[str, Any]  # name, version, alias, run_id, metrics, uri
    data_cfg: Any  # ageray.config.DataConfig (image_size, normalize)
    device: Any  # torch.device
    aligner: Any | None = None  # ageray.data.align.FaceAligner when model.json says align
    loaded_at: float = field(default_factory=time.time)
    key: str = ""  # identity of the loaded weights (uri + version) for swap decisions

    @property
    def image_size(self) -> int:
        return int(self.data_cfg.image_size)

    @property
    def head_names(self) -> list[str]:
        return list(self.model.head_names)

    def model_ref(self) -> dict[str, Any]:
        """The short model reference every prediction carries."""
        r = self.registry
        return {
            "name": r.get("name"),
            "version": r.get("version"),
            "alias": r.get("alias"),
            "uri": r.get("uri"),
        }

    def describe(self) -> dict[str, Any]:
        """``GET /v1/model``: registry facts, the metrics it was registered with, config."""
        return {
            **self.model_ref(),
            "run_id": self.registry.get("run_id"),
            "aliases": self.registry.get("aliases", []),
            "metrics": self.registry.get("metrics", {}),
            "config": {
                "model": self.info.get("model"),
                "data": {
                    "image_size": self.data_cfg.image_size,
                    "normalize": self.data_cfg.normalize,
                },
                "align": bool(self.info.get("align", False)),
                "heads": self.head_names,
                "format": self.info.get("format"),
            },
            "meta": self.info.get("meta", {}),
            "device": str(self.device),
            "loaded_at": self.loaded_at,
        }

    # ---------------------------------------------------------------- preprocessing
    def prepare(self, data: bytes, name: str, limits: Limits) -> Prepared:
        """Encoded bytes -> (3, S, S) tensor exactly as evaluation prepares a test image."""
        from ageray.data.transforms import preprocess_for_eval

        t0 = time.perf_counter()
        img = decode_checked(data, name, limits, self.image_size)
        face = None
        if self.aligner is not None:
            img, face = self._align(data, img, name, limits)
        x = preprocess_for_eval([img], self.data_cfg)[0]
        return Prepared(x, face, (time.perf_counter() - t0) * 1000.0)

    def _align(
        self, data: bytes, img: Image.Image, name: str, limits: Limits
    ) -> tuple[Image.Image, dict[str, Any]]:
        """The shard writer's path (``FaceAligner.align_bytes``: detect, align, JPEG
        re-encode), then evaluation's decoder on the crop."""
        del img  # validated above; the aligner decodes the original bytes itself
        crop, res = self.aligner.align_bytes(data)
        if crop is None:  # cannot happen with on_no_face="keep" (forced in _aligner_for)
            raise ServeError(422, "no_face", f"no face was found in image {name!r}")
        out = decode_checked(crop, name, limits, self.image_size)
        face = {
            "found": bool(res.found),
            "box": [round(float(v), 2) for v in res.box] if res.box is not None else None,
            "score": None if res.score is None else float(res.score),
            "detector": res.detector,
        }
        return out, face

    # ---------------------------------------------------------------- forward
    def forward(self, x: Any, rule: str = "smaller") -> list[dict[str, Any]]:
        """(B, 3, S, S) -> one dict per image: age, head, heads{name: age, kl}, probs.

        ``model.predict(x, flip=True)`` is GLAE's protocol in one call: x and its flip in one
        batch through the backbone once, every head on the same features, AR per image.
        """
        import torch

        x = x.to(self.device, non_blocking=True)
        pred = self.model.predict(x, flip=True, rule=rule)
        age = pred.age.float().cpu().tolist()
        head = pred.head.cpu().tolist()
        probs = pred.probs.float().cpu() if pred.probs is not None else None
        per_head: dict[str, tuple[list[float], list[float] | None]] = {}
        for hname, res in pred.heads.items():
            kl = res.get("kl")
            per_head[hname] = (
                res["age"].float().cpu().tolist(),
                kl.double().cpu().tolist() if isinstance(kl, torch.Tensor) else None,
            )
        out = []
        for i in range(len(age)):
            out.append(
                {
                    "age": float(age[i]),
                    "head": "balanced" if int(head[i]) == 1 else "vanilla",
                    "heads": {
                        n: {"age": float(a[i]), "kl": None if k is None else float(k[i])}
                        for n, (a, k) in per_head.items()
                    },
                    "probs": probs[i] if probs is not None else None,
                }
            )
        return out


def _resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"serving device={device!r} but CUDA is not available in this replica; give the "
            "deployment num_gpus (ray_actor_options) or set device: cpu"
        )
    return dev


def _aligner_for(info: dict[str, Any], image_size: int) -> Any | None:
    """The FaceAligner the shard writer used, when model.json says ``align: true``.

    ``model.json`` records only the flag; aligner settings are read from ``align_options``
    (top level or under ``meta``) when a training job stored them, else FaceAligner's
    defaults. ``on_no_face`` is forced to ``keep``: a request always gets an answer.
    """
    if not info.get("align"):
        return None
    from ageray.data.align import FaceAligner

    opts = dict(info.get("align_options") or (info.get("meta") or {}).get("align_options") or {})
    opts["on_no_face"] = "keep"
    return FaceAligner(**opts)


def load_served_model(
    uri: str,
    device: str = "auto",
    registry: Mapping[str, Any] | None = None,
    *,
    channels_last: bool = False,
) -> ServedModel:
    """Load ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a ``runs:/`` URI or a
    local model folder for serving.

    For an alias the version is resolved first and exactly that version is downloaded, so
    the version reported with every answer is the one whose weights answer (an alias moved
    during the download cannot mix them up). Downloads go to a temporary folder that is
    removed once the weights are in memory.
    """
    from ageray.config import DataConfig
    from ageray.model import load_model
    from ageray.tracking import model_info, resolve_model_dir

    reg = dict(registry) if registry is not None else model_info(uri)
    fetch = uri
    if uri.startswith("models:/") and reg.get("name") and reg.get("version"):
        fetch = f"models:/{reg['name']}/{reg['version']}"
    dev = _resolve_device(device)
    tmp = None
    try:
        if "://" in fetch or ":/" in fetch:
            tmp = tempfile.mkdtemp(prefix="ageray-serve-")
            folder = resolve_model_dir(fetch, dst=tmp)
        else:
            folder = resolve_model_dir(fetch)
        model, info = load_model(folder, map_location=dev)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    if channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True  # AgeModel.forward then converts inputs too
    data = info.get("data") or {}
    defaults = DataConfig()
    size = int(data.get("image_size") or info.get("input_size") or defaults.image_size)
    # save_model(cfg=None) writes "normalize": null; the model was then built and evaluated
    # with the DataConfig default, which is what eval_config would fall back to as well.
    normalize = data.get("normalize") or defaults.normalize
    data_cfg = dataclasses.replace(defaults, image_size=size, normalize=normalize)
    reg.setdefault("uri", uri)
    if "name" not in reg:
        reg["name"] = (info.get("meta") or {}).get("name") or Path(str(folder)).name
        reg.setdefault("version", None)
        reg.setdefault("alias", None)
    return ServedModel(
        model=model,
        info=info,
        registry=reg,
        data_cfg=data_cfg,
        device=dev,
        aligner=_aligner_for(info, size),
        key=f"{reg.get('name')}/{reg.get('version')}|{uri}",
    )


def warmup(served: ServedModel, batch_sizes: Sequence[int] = (1,), rule: str = "smaller") -> float:
    """Run the forward once per batch size before the replica reports ready; returns ms.

    Why: the first forward allocates buffers and picks kernels (hundreds of ms on CPU, more
    with cuDNN autotuning); a user request must not pay that.
    """
    import torch

    t0 = time.perf_counter()
    s = served.image_size
    for b in batch_sizes:
        x = torch.zeros(max(1, int(b)), 3, s, s)
        served.forward(x, rule)
        if served.device.type == "cuda":
            torch.cuda.synchronize(served.device)
    if served.aligner is not None:  # build the detector now, not on the first request
        served.aligner.align(Image.new("RGB", (s, s), (128, 128, 128)))
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------- responses


def build_prediction(
    result: Mapping[str, Any],
    served: ServedModel,
    *,
    distribution: bool = False,
    face: Mapping[str, Any] | None = None,
    timing_ms: Mapping[str, float] | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One image's answer as JSON-ready dict.

    ``{"age", "head", "heads": {name: {"age", "kl"}}, "model": {...}, "timing_ms": {...}}``
    plus ``distribution`` (101 probabilities over ages 0..100) on request, ``face`` when
    detection ran, and ``batch_size`` (how many images shared the forward pass).
    """
    out: dict[str, Any] = {
        "age": float(result["age"]),
        "head": result["head"],
        "heads": {
            name: {"age": float(h["age"]), "kl": None if h["kl"] is None else float(h["kl"])}
            for name, h in result["heads"].items()
        },
        "model": served.model_ref(),
    }
    if distribution:
        probs = result.get("probs")
        out["distribution"] = None if probs is None else [float(p) for p in probs.tolist()]
    if face is not None:
        out["face"] = dict(face)
    if timing_ms is not None:
        out["timing_ms"] = {k: round(float(v), 3) for k, v in timing_ms.items()}
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out
