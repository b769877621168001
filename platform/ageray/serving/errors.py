"""Every answer the service refuses, as one exception with one JSON envelope.

Why one class with named constructors: a status, a stable ``code`` and a message that
names the input and the fix belong together; written once here, the 413 for a body and the
503 for a replica that is still loading read the same wherever they are raised (the
handler, the request guard in front of it, Serve's proxy). Clients branch on ``code``;
people read ``message``. The envelope is always ``{"error": {"code", "message"}}``, and
every message is redacted (``ageray.redaction``) when the error is built: whatever it
quotes (a URL, a header, an exception text) leaves with no credential in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ageray.redaction import redact

__all__ = ["ACCEPTED", "ServeError", "error_body"]

#: What POST /v1/predict accepts, for messages that tell the client what to send instead.
ACCEPTED = (
    "multipart/form-data (field 'file' or 'image'), image/* or application/octet-stream "
    '(raw image bytes), or application/json ({"image": "<base64>"} or '
    '{"images": ["<base64>", ...]})'
)


def error_body(code: str, message: str) -> dict[str, Any]:
    """The one error envelope."""
    return {"error": {"code": code, "message": message}}


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(0, math.ceil(seconds)))}


class ServeError(Exception):
    """A request the service refuses, as an HTTP status + code + message (+ headers).

    Build it with the named constructors below rather than by status number, so each kind
    of refusal has one message.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        message = redact(message)  # it may quote a URI or a header the client sent
        super().__init__(message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)

    def __repr__(self) -> str:
        return f"ServeError({self.status}, {self.code!r}, {self.message!r})"

    async def send(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Answer on a raw ASGI ``send`` (the request guard runs outside FastAPI)."""
        payload = json.dumps(self.body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    # ------------------------------------------------------------------ 400 / 422
    @classmethod
    def bad_request(cls, code: str, message: str) -> ServeError:
        """400: the bytes are not what they claim (malformed JSON, base64, multipart, not an
        image, truncated, empty)."""
        return cls(400, code, message)

    @classmethod
    def invalid_request(cls, message: str) -> ServeError:
        """422: well-formed, but the fields are wrong (unknown key, wrong type)."""
        return cls(422, "invalid_request", message)

    @classmethod
    def missing_image(cls, fields_sent: list[str]) -> ServeError:
        return cls(
            422,
            "missing_image",
            f"the multipart body has no 'file' or 'image' field (fields sent: {fields_sent}); "
            "upload the image as -F file=@face.jpg",
        )

    @classmethod
    def empty_body(cls) -> ServeError:
        return cls.bad_request(
            "empty_body", f"the request body is empty; send an image as {ACCEPTED}"
        )

    # ------------------------------------------------------------------ 401
    @classmethod
    def unauthorized(cls, message: str) -> ServeError:
        return cls(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="ageray"'})

    # ------------------------------------------------------------------ 408
    @classmethod
    def body_timeout(cls, seconds: float, received: int, declared: int | None) -> ServeError:
        """408: the body did not arrive in time (stalled or trickling upload)."""
        of = f" of {declared}" if declared is not None else ""
        return cls(
            408,
            "body_timeout",
            f"the request body did not arrive in time: {received}{of} bytes after "
            f"{seconds:.1f}s; send the whole body at once (a stalled or very slow upload is "
            "cut off so it cannot hold a request slot)",
            # the client is stalled mid-body: this connection cannot carry another request
            {"Connection": "close"},
        )

    # ------------------------------------------------------------------ 413
    @classmethod
    def payload_too_large(cls, cap: int, *, sent: int | None = None, raw: bool) -> ServeError:
        """413 for the whole body: declared by Content-Length, or counted while reading."""
        what = "an image body" if raw else "a request body"
        size = f"{sent} bytes" if sent is not None else "larger than that"
        return cls(
            413,
            "payload_too_large",
            f"the request body is {size}; the limit for {what} is {cap} bytes: send a "
            "smaller (re-encoded or downscaled) image",
        )

    @classmethod
    def image_too_large(cls, name: str, size: int, cap: int) -> ServeError:
        return cls(
            413,
            "image_too_large",
            f"image {name!r} is {size} bytes; the limit is {cap} bytes per image: send a "
            "smaller (re-encoded or downscaled) image",
        )

    @classmethod
    def too_many_images(cls, count: int, cap: int) -> ServeError:
        return cls(
            413,
            "too_many_images",
            f"{count} images in one request; at most {cap} are allowed: split them over "
            "several requests",
        )

    @classmethod
    def too_many_pixels(cls, name: str, what: str, cap: int) -> ServeError:
        return cls(
            413,
            "too_many_pixels",
            f"image {name!r} {what}; the limit is {cap} pixels: downscale it (a face needs a "
            "few hundred pixels per side)",
        )

    # ------------------------------------------------------------------ 415 / 431
    @classmethod
    def unsupported_media_type(cls, media: str | None) -> ServeError:
        if media:
            said = f"Content-Type {media!r} is not accepted"
        else:
            said = "the request has no Content-Type"
        return cls(415, "unsupported_media_type", f"{said}; send one of: {ACCEPTED}")

    @classmethod
    def headers_too_large(cls, what: str) -> ServeError:
        """431: the header block is over the size or count limit."""
        return cls(
            431,
            "headers_too_large",
            f"the request headers are too large ({what}); send fewer or shorter headers "
            "(cookies and tokens are the usual cause)",
        )

    # ------------------------------------------------------------------ 5xx
    @classmethod
    def not_ready(cls, retry_after_s: float) -> ServeError:
        return cls(
            503,
            "not_ready",
            "the model is still loading; retry shortly",
            _retry_after(retry_after_s),
        )

    @classmethod
    def overloaded(cls, inflight: int, limit: int, retry_after_s: float) -> ServeError:
        return cls(
            503,
            "overloaded",
            f"the replica already holds {inflight} images in flight (limit {limit}); retry "
            f"after {retry_after_s}s or send fewer images per request",
            _retry_after(retry_after_s),
        )

    @classmethod
    def internal(cls, exc: BaseException) -> ServeError:
        """500: a bug or a failing forward (never bad input, which has its own 4xx)."""
        return cls(
            500,
            "internal_error",
            f"the service failed on this request ({type(exc).__name__}); it is logged on the "
            "replica, retry or report it",
        )

    @classmethod
    def http(cls, status: int, detail: str, headers: Mapping[str, str] | None = None) -> ServeError:
        """Routing errors raised by the web framework (404 unknown path, 405 method)."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return cls(status, code, detail, headers)
