"""Who and how much may enter a replica: the bearer-token check and the in-flight image
bound.

Why counted in images: Serve's ``max_ongoing_requests`` / ``max_queued_requests`` count
requests, but one request may carry ``max_images`` images; this bound keeps decoded tensors
(memory) and queueing delay finite. A request that does not fit is answered 503 with
``Retry-After`` at once rather than waiting.
"""

from __future__ import annotations

import hmac
import threading

from ageray.serving.errors import ServeError

__all__ = ["Admission", "check_auth"]


def check_auth(authorization: str | None, token: str | None) -> None:
    """Bearer-token check. ``token`` None/empty: auth is off and everything passes.

    Constant-time comparison (``hmac.compare_digest``) so the token cannot be guessed byte
    by byte from response times.
    """
    if not token:
        return
    if not authorization:
        raise ServeError.unauthorized(
            "missing Authorization header: send 'Authorization: Bearer <token>' (the token "
            "the service was started with in its token environment variable)"
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ServeError.unauthorized("the Authorization header must be 'Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ServeError.unauthorized("the bearer token is not valid")


class Admission:
    """Bounded in-flight work for one replica, counted in images."""

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
        return ServeError.overloaded(self._inflight, self.limit, retry_after_s)
