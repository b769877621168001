"""The replica's knobs (Serve ``user_config``) and the per-request limits.

Why typed and built by :func:`ageray.config.build_dataclass`: a typo in ``user_config``
(``max_batch_sise``) must fail the deploy with the closest name, exactly as a typo in a
training recipe does, and ``"8"`` must become ``8`` the same way in both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ageray.config import SERVABLE_ROUTING_RULES, build_dataclass

__all__ = ["Limits", "ServeSettings"]

MiB = 1024 * 1024


@dataclass
class Limits:
    """What one request may carry, and how long its body may take. Defaults suit phone
    photos of faces.

    ``max_pixels`` (width x height from the header) bounds decoded memory: 25 MP is a 24 MP
    photo, ~75 MB as RGB; JPEGs decode at a reduced draft size anyway. ``max_request_bytes``
    bounds the whole body (a 10 MB image is ~13.4 MB as base64 JSON).

    The body must arrive within ``body_timeout_s`` plus one second per
    ``body_min_bytes_per_s`` bytes received (Apache ``mod_reqtimeout``'s MinRate): a stalled
    or trickling upload gets 408 after a few seconds, while a large image on a slow but
    moving link keeps earning time. ``max_header_bytes`` / ``max_headers`` bound the header
    block (431); Serve's HTTP server itself sets no header limit.

    Edge only (Serve's proxy, ``AGERAY_EDGE_LIMITS``; a replica's ``user_config`` cannot
    reach the proxy, so these keys are accepted there and have no effect in the app):
    ``header_timeout_s`` is the time a connection has to deliver its request line and
    headers (408, then closed; a connection that sends nothing is closed); ``max_url_bytes``
    bounds the URL (414); ``max_connections_per_client`` caps open connections per client
    address (503; 0 = off; behind a load balancer that hides client addresses every
    client shares its address: raise it or set 0); ``admission_timeout_s`` is the longest a
    request waits for its answer to start (queued in the proxy or at the replica) before
    it is shed with 503 + ``Retry-After``: a client gets a quick refusal instead of a long
    queue.
    """

    max_image_bytes: int = 10 * MiB
    max_request_bytes: int = 16 * MiB
    max_pixels: int = 25_000_000
    max_images: int = 16
    body_timeout_s: float = 5.0
    body_min_bytes_per_s: int = 16 * 1024
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_s: float = 5.0
    max_url_bytes: int = 16 * 1024
    max_connections_per_client: int = 512
    admission_timeout_s: float = 5.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, base: Limits | None = None) -> Limits:
        return build_dataclass(cls, data, base=base, what="serving limit").validate()

    def validate(self) -> Limits:
        for name in (
            "max_image_bytes",
            "max_request_bytes",
            "max_pixels",
            "max_images",
            "max_header_bytes",
            "max_headers",
            "max_url_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"serving limit {name}={getattr(self, name)} must be >= 1")
        if not self.body_timeout_s > 0:
            raise ValueError(
                f"serving limit body_timeout_s={self.body_timeout_s} must be > 0 seconds; a "
                "few seconds is typical"
            )
        for name in ("header_timeout_s", "admission_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"serving limit {name}={getattr(self, name)} must be > 0 seconds; a few "
                    "seconds is typical"
                )
        if self.max_connections_per_client < 0:
            raise ValueError(
                f"serving limit max_connections_per_client={self.max_connections_per_client} "
                "must be >= 0 (0: no cap)"
            )
        if self.body_min_bytes_per_s < 0:
            raise ValueError(
                f"serving limit body_min_bytes_per_s={self.body_min_bytes_per_s} must be >= 0 "
                "(0: the body deadline is body_timeout_s flat)"
            )
        return self


@dataclass
class ServeSettings:
    """The replica's knobs: Serve ``user_config`` keys (all optional) on top of defaults.

    ``max_batch_size`` is in images (a request with 4 images adds 4); 1 turns batching off.
    ``batch_wait_mode: adaptive`` (default) sizes the wait of a forming batch with
    :class:`~ageray.serving.batch_window.BatchWindow`: a lone request never waits; while a
    forward is running the batch stays open until that forward should end (it could not
    start earlier anyway, and this way it collects everything that arrives meanwhile);
    ``batch_wait_timeout_s`` is the wait when only other requests' decoding is pending.
    ``fixed`` always waits ``batch_wait_timeout_s`` (Serve's plain behaviour).
    ``max_inflight_images`` is the replica's admission limit: above it requests get 503 +
    ``Retry-After`` instead of queueing without bound. ``auth_token_env`` names the
    environment variable that holds the bearer token (unset or empty: auth off).
    ``decode_in_thread_bytes``: payloads at least this large are decoded in a worker thread
    so the event loop keeps accepting requests; small ones decode inline (cheaper).
    ``reload``: any string; changing it makes Serve call ``reconfigure`` so that a
    ``models:/<name>@<alias>`` whose alias was moved is resolved again (same URI, new
    version). ``channels_last``: run the CNN in NHWC memory format (oneDNN / cuDNN pick
    faster kernels: ~25% more images/s for batches on CPU; answers move by ~1e-5 years).
    Limit keys may be given flat (``max_image_bytes: 5000000``) or under ``limits``.
    """

    model_uri: str | None = None
    reload: str | None = None  # change it to re-resolve an alias that moved (same model_uri)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int | None = None
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.002
    max_inflight_images: int = 256
    retry_after_s: int = 1
    # None: the model's own rule (model.json routing.rule: eq. 11 or the fitted rule the
    # training run chose); or one of smaller, bigger, threshold, learned. Never oracle.
    rule: str | None = None
    warmup_batch_sizes: tuple[int, ...] = (1,)
    auth_token_env: str = "AGERAY_API_TOKEN"
    require_auth: bool = False
    model_poll_s: float = 30.0
    decode_in_thread_bytes: int = 256 * 1024
    batch_wait_mode: Literal["adaptive", "fixed"] = "adaptive"
    channels_last: bool = True
    # torch: eager PyTorch; onnxruntime: the model's ONNX export (CPU only); auto: the faster
    # on the replica's device (benchmarks/serve_backends.py: onnxruntime on a CPU, 1.6x at
    # batch 1 and 1.3x at 32; torch on a GPU). serve/config.yaml deploys auto; without it the
    # app runs torch, the forward of training and evaluation.
    backend: Literal["torch", "onnxruntime", "auto"] = "torch"
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, base: ServeSettings | None = None
    ) -> ServeSettings:
        """Settings from a ``user_config`` dict on top of ``base`` (not mutated) or the
        defaults; unknown keys fail with the closest known name."""
        built = build_dataclass(cls, data, base=base, what="serving setting", inline=("limits",))
        return built.validate()

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
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s} must be >= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads} must be >= 1 or null")
        if any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes={list(self.warmup_batch_sizes)} must be >= 1")
        if self.model_poll_s < 0:
            raise ValueError(
                f"model_poll_s={self.model_poll_s} must be >= 0 seconds (0: do not follow the "
                "alias between deploys)"
            )
        if self.rule is not None and self.rule not in SERVABLE_ROUTING_RULES:
            why = " (it reads the true age: an evaluation bound)" if self.rule == "oracle" else ""
            raise ValueError(
                f"rule={self.rule!r} cannot be served{why}; use one of "
                f"{list(SERVABLE_ROUTING_RULES)} or null for the model's own rule"
            )
        return self

    def auth_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The bearer token from ``auth_token_env`` (None when unset or empty: auth off)."""
        env = os.environ if environ is None else environ
        return env.get(self.auth_token_env) or None

    def check_auth_configured(self, environ: Mapping[str, str] | None = None) -> None:
        """Fail closed: with ``require_auth`` a replica without a token must not start.

        Raised from the replica's constructor (and ``reconfigure``), so ``serve run`` /
        ``serve deploy`` fail with this message instead of serving ``/v1/*`` to anyone.
        """
        if self.require_auth and not self.auth_token(environ):
            raise ValueError(
                f"require_auth is true but the token variable {self.auth_token_env} is unset "
                f"or empty in the replica's environment: set {self.auth_token_env} (a secret, "
                "or runtime_env env_vars) or set require_auth: false to serve without auth"
            )

    def follows_alias(self) -> bool:
        """Whether this replica polls the registry for its alias (``models:/n@alias``)."""
        uri = self.model_uri or ""
        return self.model_poll_s > 0 and uri.startswith("models:/") and "@" in uri

    def public(self) -> dict[str, Any]:
        """What ``/v1/model`` shows (no secrets: the token's variable name, not its value)."""
        d = dataclasses.asdict(self)
        d["auth"] = bool(os.environ.get(self.auth_token_env))
        return d
