"""Why a stream dropped a member: the named skip reasons and the per-process counter.

**Corrupt input is skipped and counted, never fatal.** Every stage that drops something
(``ageray.data.tario`` for shards, ``ageray.data.stages`` for samples and images) counts it
under one of :data:`SKIP_REASONS`. A bad shard is counted once per read, by the slot that
owns it, so a training stream that repeats a bad shard counts it per pass.

Counts are made in the DataLoader worker processes; each batch carries the counts its worker
made since its previous batch (``"__skipped__"``; a worker with nothing left to batch sends
one last counts-only item), and the loader adds them to ``loader.skipped`` in the main
process (every reason present, 0 until it happens) and strips the field.
"""

from __future__ import annotations

from collections import Counter

from ageray.data.labels import LABEL_SKIP_REASONS

__all__ = ["SKIP_REASONS", "SkipCounter"]

SKIP_REASONS = (
    "not_image",  # an image member that is not an image format
    "truncated",  # an image whose data ends early or is corrupt
    "too_large",  # refused by Pillow's decompression-bomb guard
    "no_label",  # an image without its .json
    "no_image",  # a .json without its image
    "bad_label",  # a .json that is not a JSON object
    *LABEL_SKIP_REASONS,  # a label that fails the one label check (ageray.data.labels)
    "bad_shard",  # a shard that cannot be opened/read or ends before its manifest count
)


class SkipCounter:
    """Skip counts made in one process; ``take()`` returns and clears what is new."""

    def __init__(self) -> None:
        self.new: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self.new[reason] += n

    def take(self) -> dict[str, int]:
        out = dict(self.new)
        self.new.clear()
        return out
