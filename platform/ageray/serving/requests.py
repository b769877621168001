"""From HTTP request to encoded images: header and body limits, the capped body read with a
deadline, and the parsers for raw, multipart and JSON bodies.

Why here and not in the web app: each rule (what a body may weigh, how long it may take to
arrive, which JSON fields exist) is checked by unit tests without a server, and the
request guard in front of the app (:mod:`ageray.serving.guard`, also usable in Serve's
proxy) reads bodies with exactly this code. Nothing here decodes pixels.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ageray.serving.errors import ServeError
from ageray.serving.settings import Limits

__all__ = [
    "ClientDisconnected",
    "ImagePayload",
    "ParsedRequest",
    "check_headers",
    "content_length_cap",
    "declared_length",
    "is_raw_media",
    "media_type",
    "parse_predict_body",
    "read_body",
]

RAW_TYPES = ("image/", "application/octet-stream")
MULTIPART_FIELDS = ("file", "image", "images", "files")
JSON_KEYS = ("image", "images", "distribution", "faces")
FACE_MODES = ("all", "largest")  # ageray.inference.inputs.FACE_MODES (not imported: no torch)


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
    faces: str | None = None  # JSON "faces": all | largest (None: the query's or the default)


class ClientDisconnected(Exception):
    """The client went away before its body was complete: nobody to answer, nothing to
    log beyond one line (it is the client's choice, not a failure of the service)."""

    def __init__(self, received: int, declared: int | None) -> None:
        of = f" of {declared}" if declared is not None else ""
        super().__init__(f"client disconnected after {received}{of} body bytes")
        self.received = received
        self.declared = declared


# --------------------------------------------------------------------------- headers


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_raw_media(content_type: str | None) -> bool:
    return media_type(content_type).startswith(RAW_TYPES)


def content_length_cap(content_type: str | None, limits: Limits) -> int:
    """The most body bytes worth reading for this content type (checked while reading)."""
    return limits.max_image_bytes if is_raw_media(content_type) else limits.max_request_bytes


def check_headers(
    headers: Iterable[tuple[bytes, bytes]], limits: Limits, target: bytes = b""
) -> None:
    """431 when the header block has more than ``max_headers`` fields or more than
    ``max_header_bytes`` bytes (names + values + separators as on the wire, plus the request
    target: a megabyte URL costs the same as a megabyte header)."""
    count = 0
    size = len(target)
    for name, value in headers:
        count += 1
        size += len(name) + len(value) + 4  # ": " and CRLF
    if count > limits.max_headers:
        raise ServeError.headers_too_large(f"{count} fields; the limit is {limits.max_headers}")
    if size > limits.max_header_bytes:
        raise ServeError.headers_too_large(f"{size} bytes; the limit is {limits.max_header_bytes}")


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(Content-Length or None, whether a body is coming at all).

    HTTP/1.1: a request carries a body only with Content-Length or Transfer-Encoding; a GET
    probe has neither and its (empty) body need not be waited for.
    """
    length: int | None = None
    chunked = False
    for name, value in headers:
        key = name.lower()
        if key == b"content-length":
            text = value.strip()
            length = int(text) if text.isdigit() else None
        elif key == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


# --------------------------------------------------------------------------- body


async def read_body(
    receive: Callable[[], Awaitable[dict[str, Any]]],
    *,
    content_type: str | None,
    declared: int | None,
    limits: Limits,
    clock: Callable[[], float] = time.monotonic,
) -> bytes:
    """Read a whole ASGI request body under the byte cap and the body deadline.

    413 at once when Content-Length is over the cap for this content type, or as soon as
    the bytes read pass it (a missing or lying Content-Length is no way around the cap);
    408 when the body is not complete within ``body_timeout_s`` plus one second per
    ``body_min_bytes_per_s`` received (a stalled or trickling upload); on a client
    disconnect :class:`ClientDisconnected`.
    """
    cap = content_length_cap(content_type, limits)
    raw = is_raw_media(content_type)
    if declared is not None and declared > cap:
        raise ServeError.payload_too_large(cap, sent=declared, raw=raw)
    start = clock()
    chunks: list[bytes] = []
    size = 0
    rate = limits.body_min_bytes_per_s
    while True:
        allowed = limits.body_timeout_s + (size / rate if rate else 0.0)
        remaining = start + allowed - clock()
        if remaining <= 0:
            raise ServeError.body_timeout(clock() - start, size, declared)
        try:
            message = await asyncio.wait_for(receive(), remaining)
        except TimeoutError:
            raise ServeError.body_timeout(clock() - start, size, declared) from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected(size, declared)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise ServeError.payload_too_large(cap, raw=raw)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# --------------------------------------------------------------------------- parsing


def parse_predict_body(content_type: str | None, body: bytes, limits: Limits) -> ParsedRequest:
    """Split a ``POST /v1/predict`` body into encoded images, or raise :class:`ServeError`.

    Accepted: multipart/form-data (fields ``file``/``image``; several files answer a list),
    raw ``image/*`` / ``application/octet-stream``, JSON ``{"image": b64}`` or
    ``{"images": [b64, ...]}``. Images are not decoded here.
    """
    media = media_type(content_type)
    if not (
        media.startswith(RAW_TYPES)
        or media == "multipart/form-data"
        or media == "application/json"
        or media.endswith("+json")
    ):
        raise ServeError.unsupported_media_type(media or None)
    if not body:
        raise ServeError.empty_body()
    cap = content_length_cap(content_type, limits)
    if len(body) > cap:
        raise ServeError.payload_too_large(cap, sent=len(body), raw=media.startswith(RAW_TYPES))
    if media.startswith(RAW_TYPES):
        return ParsedRequest([ImagePayload(body, "body")], many=False)
    if media == "multipart/form-data":
        return _parse_multipart(content_type or "", body, limits)
    return _parse_json(body, limits)


def check_count(n: int, limits: Limits) -> None:
    if n > limits.max_images:
        raise ServeError.too_many_images(n, limits.max_images)


def check_image_bytes(n: int, name: str, limits: Limits) -> None:
    if n > limits.max_image_bytes:
        raise ServeError.image_too_large(name, n, limits.max_image_bytes)


def _malformed_json(detail: Any) -> ServeError:
    return ServeError.bad_request(
        "malformed_json",
        f'the body is not valid JSON ({detail}); send {{"image": "<base64>"}} or '
        '{"images": ["<base64>", ...]}',
    )


def _parse_json(body: bytes, limits: Limits) -> ParsedRequest:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and the int-string digit
        # limit (an integer literal of more than sys.get_int_max_str_digits() digits).
        raise _malformed_json(exc) from exc
    if not isinstance(doc, dict):
        raise ServeError.invalid_request(
            f"the JSON body must be an object, got {type(doc).__name__}; send "
            '{"image": "<base64>"} or {"images": [...]}'
        )
    unknown = sorted(set(doc) - set(JSON_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], JSON_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ServeError.invalid_request(
            f"unknown JSON field(s) {unknown[:5]}{hint}; allowed: {list(JSON_KEYS)}"
        )
    distribution = doc.get("distribution", False)
    if not isinstance(distribution, bool):
        raise ServeError.invalid_request("JSON field 'distribution' must be a boolean")
    faces = doc.get("faces")
    if faces is not None and faces not in FACE_MODES:
        raise ServeError.invalid_request(
            f"JSON field 'faces' must be one of {list(FACE_MODES)}, got {faces!r}"
        )
    if ("image" in doc) == ("images" in doc):
        raise ServeError.invalid_request(
            "send exactly one of 'image' (one base64 string) or 'images' (a list of base64 strings)"
        )
    if "image" in doc:
        return ParsedRequest(
            [_b64_image(doc["image"], "image", limits)],
            many=False,
            distribution=distribution,
            faces=faces,
        )
    items = doc["images"]
    if not isinstance(items, list):
        raise ServeError.invalid_request(
            f"'images' must be a list of base64 strings, got {type(items).__name__}"
        )
    if not items:
        raise ServeError.invalid_request("'images' is empty; send at least one image")
    check_count(len(items), limits)
    images = [_b64_image(v, f"images[{i}]", limits) for i, v in enumerate(items)]
    return ParsedRequest(images, many=True, distribution=distribution, faces=faces)


_WS = str.maketrans("", "", " \t\r\n")


def _b64_image(value: Any, name: str, limits: Limits) -> ImagePayload:
    if not isinstance(value, str):
        raise ServeError.invalid_request(
            f"{name!r} must be a base64 string, got {type(value).__name__}"
        )
    text = value
    if text.startswith("data:"):  # data URL: data:image/jpeg;base64,<payload>
        head, sep, rest = text.partition(",")
        if not sep or ";base64" not in head:
            raise ServeError.bad_request(
                "malformed_base64", f"{name!r} is a data URL without ';base64,'; send plain base64"
            )
        text = rest
    text = text.translate(_WS)
    if not text:
        raise ServeError.bad_request("empty_image", f"{name!r} is an empty string; send an image")
    # Refuse before decoding: base64 is 4 characters per 3 bytes.
    check_image_bytes(len(text) // 4 * 3, name, limits)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServeError.bad_request(
            "malformed_base64",
            f"{name!r} is not valid base64 ({exc}); encode the image file's bytes with "
            "standard base64 (RFC 4648, with padding)",
        ) from exc
    check_image_bytes(len(data), name, limits)
    return ImagePayload(data, name)


def _malformed_multipart(detail: Any) -> ServeError:
    return ServeError.bad_request(
        "malformed_multipart",
        f"the multipart/form-data body cannot be parsed ({detail}); let your HTTP client "
        "build it (e.g. curl -F file=@face.jpg)",
    )


def _parse_multipart(content_type: str, body: bytes, limits: Limits) -> ParsedRequest:
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServeError.bad_request(
            "malformed_multipart",
            "multipart/form-data without a boundary parameter; let your HTTP client build "
            "the multipart body (e.g. curl -F file=@face.jpg)",
        )
    parts = _multipart_parts(boundary, body, limits)
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
        check_image_bytes(part["size"], name, limits)
        images.append(ImagePayload(b"".join(part["chunks"]), name))
        check_count(len(images), limits)
    if not images:
        raise ServeError.missing_image(seen)
    return ParsedRequest(images, many=len(images) > 1)


def _multipart_parts(boundary: bytes, body: bytes, limits: Limits) -> list[dict[str, Any]]:
    """Each part's ``headers``, data ``chunks`` and ``size`` (data past the image limit is
    counted, not stored); a body python-multipart cannot parse is a 400."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

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
        raise _malformed_multipart(exc) from exc
    return parts
