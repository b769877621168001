"""The edge's HTTP/1.1 parser: limits that must hold before a request exists.

Why below ASGI: a middleware (the request guard) first sees a request once its header block
is complete. Three things happen before that and were uvicorn's alone: a client that
opens a connection and never finishes its headers (held open with no limit), a URL or
header block beyond the parser's buffer (uvicorn answers a plain-text
``400 Invalid HTTP request received.``), and one client opening thousands of connections.
Serve builds its uvicorn server with ``http="auto"``; :func:`install` points uvicorn's
``auto`` protocol at :class:`GuardedHttpToolsProtocol` in the process about to start that
server (the proxy callback runs first), which adds:

* a **header deadline**: the request line and headers must be complete within
  ``limits.header_timeout_s`` of the connection opening or of the request's first byte;
  otherwise 408 (JSON) and the connection closes; a connection that sent nothing is closed;
* **414** for a URL longer than ``limits.max_url_bytes`` and **431** for a header block over
  ``max_header_bytes`` / ``max_headers``, as the JSON envelope, while parsing (nothing large
  is buffered); any other malformed request is a JSON 400;
* a **connection cap per client address** (``max_connections_per_client``, 0 = off): the
  connection over the cap gets 503 + ``Retry-After`` and is closed.

The subclass only adds callbacks around uvicorn's; the check functions are plain and
tested without a server (tests/unit/test_edge_http.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any, ClassVar

from ageray.serving.errors import ServeError
from ageray.serving.settings import Limits

__all__ = ["GuardedHttpToolsProtocol", "install", "raw_response", "url_too_long"]

log = logging.getLogger("ray.serve")

PROTOCOL_PATH = "ageray.serving.edge_http:GuardedHttpToolsProtocol"


def raw_response(err: ServeError) -> bytes:
    """A complete HTTP/1.1 response with the JSON envelope, written on the transport."""
    body = json.dumps(err.body()).encode()
    phrase = HTTPStatus(err.status).phrase
    lines = [
        f"HTTP/1.1 {err.status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k.lower()}: {v}" for k, v in err.headers.items() if k.lower() != "connection"),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def url_too_long(size: int, limit: int) -> ServeError:
    return ServeError(
        414,
        "uri_too_long",
        f"the request URL is too long ({size} bytes; the limit is {limit}); send the data "
        "in the request body (POST /v1/predict) instead of the query string",
    )


def headers_too_large(size: int, count: int, limits: Limits) -> ServeError:
    return ServeError(
        431,
        "headers_too_large",
        f"the request headers are too large ({size} bytes in {count} fields; the limits are "
        f"{limits.max_header_bytes} bytes and {limits.max_headers} fields); send fewer or "
        "shorter headers",
    )


def header_timeout(limits: Limits) -> ServeError:
    return ServeError(
        408,
        "header_timeout",
        f"the request line and headers were not complete within {limits.header_timeout_s} "
        "s; send the whole header block at once",
    )


def bad_http_request() -> ServeError:
    return ServeError(
        400,
        "bad_http_request",
        "the bytes received are not a valid HTTP/1.1 request (request line, headers, "
        "chunked encoding); check the client",
    )


def too_many_connections(count: int, limits: Limits) -> ServeError:
    return ServeError(
        503,
        "too_many_connections",
        f"this client address holds {count} open connections (the limit is "
        f"{limits.max_connections_per_client}); reuse connections (keep-alive) instead of "
        "opening new ones",
        headers={"Retry-After": "1"},
    )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the protocol answers ``err``."""

    def __init__(self, err: ServeError) -> None:
        super().__init__(err.message)
        self.err = err


try:  # the parser Serve's uvicorn uses when httptools is installed (http="auto")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools absent: uvicorn falls back to h11
    _Base = None  # type: ignore[assignment,misc]


if _Base is not None:

    class GuardedHttpToolsProtocol(_Base):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol with the edge's pre-ASGI limits (module docstring)."""

        limits: Limits = Limits()
        _per_client: ClassVar[dict[str, int]] = {}

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._refusal: ServeError | None = None
            self._pending: ServeError | None = None  # set by a callback that refused
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._request_started = False
            self._counted: str | None = None

        # ------------------------------------------------------------ connection
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            cap = self.limits.max_connections_per_client
            host = self.client[0] if self.client else None
            if cap and host is not None:
                n = self._per_client.get(host, 0) + 1
                self._per_client[host] = n
                self._counted = host
                if n > cap:
                    self._answer(too_many_connections(n, self.limits))
                    return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            if self._counted is not None:
                left = self._per_client.get(self._counted, 1) - 1
                if left > 0:
                    self._per_client[self._counted] = left
                else:
                    self._per_client.pop(self._counted, None)
                self._counted = None
            super().connection_lost(exc)

        # ------------------------------------------------------------ parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._request_started = True
            if self._header_timer is None:
                self._arm_header_timer()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > self.limits.max_url_bytes:
                self._pending = url_too_long(len(self.url), self.limits.max_url_bytes)
                raise _Refused(self._pending)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            count = len(self.headers) + 1
            if self._header_bytes > self.limits.max_header_bytes or count > self.limits.max_headers:
                self._pending = headers_too_large(self._header_bytes, count, self.limits)
                raise _Refused(self._pending)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._request_started = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._refusal is not None:
                return  # answered; the connection is closing
            super().data_received(data)

        # ------------------------------------------------------------ answers
        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a parser error, as the JSON envelope (414 / 431 when a
            callback above refused, else 400)."""
            self._answer(self._pending or bad_http_request())

        def _answer(self, err: ServeError) -> None:
            self._refusal = err
            self._cancel_header_timer()
            if not self.transport.is_closing():
                self.transport.write(raw_response(err))
                self.transport.close()

        # ------------------------------------------------------------ header deadline
        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._header_deadline
            )

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self._request_started
            if self.transport.is_closing() or busy:
                return
            if self._request_started:
                self._answer(header_timeout(self.limits))
            else:  # connected and sent nothing: nothing to answer
                self._refusal = header_timeout(self.limits)
                self.transport.close()

else:  # pragma: no cover
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]


def install(limits: Limits) -> bool:
    """Make uvicorn's ``auto`` (and ``httptools``) protocol the guarded one in this
    process; True when done (False without httptools: uvicorn's own limits stay)."""
    if GuardedHttpToolsProtocol is None:
        log.warning("ageray edge: httptools is not installed; no header deadline at the edge")
        return False
    from uvicorn import config

    GuardedHttpToolsProtocol.limits = limits
    config.HTTP_PROTOCOLS["auto"] = PROTOCOL_PATH
    config.HTTP_PROTOCOLS["httptools"] = PROTOCOL_PATH
    return True
