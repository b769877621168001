"""How long a forming ``@serve.batch`` batch should wait for more images.

Why not a fixed wait: Serve forms the next batch while the previous one still runs (then
the new batch waits for the forward thread). With a short fixed wait, a busy replica
therefore cuts the arrivals of one forward's duration into many tiny batches that run one
after the other: batching never pays. Here the wait follows the forward that is running: a
batch that starts forming during a forward stays open until that forward is expected to
end (estimated from an EMA of the per-image forward time), so it takes every image that
arrived meanwhile; when the forward thread is idle and nothing else is being decoded the
wait is 0, so a lone request at concurrency 1 pays nothing.
"""

from __future__ import annotations

from ageray.serving.settings import ServeSettings

__all__ = ["BatchWindow"]


class BatchWindow:
    """The wait of the batch an image may open (see the module docstring)."""

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
