"""Two small stages of the shard writer's first pass: the skip log and the duplicate check.

Why duplicates by content: a data set copied into two folders, or an archive that holds a
file twice, imports the same face under two names. ``duplicate_key`` never sees those
copies, and a copy that lands in train while the other lands in test leaks the test
answer into training (and counts one face twice in every metric). The writer keeps the
first file and counts the others as ``duplicate_image``, with examples naming both files.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

__all__ = ["ContentDedup", "SkipLog", "content_digest"]


def content_digest(data: bytes) -> bytes:
    """The key duplicates share: sha256 of the bytes as imported (before alignment)."""
    return hashlib.sha256(data).digest()


class ContentDedup:
    """Remembers the first file name per content digest (32 bytes per record, so memory
    stays O(records) as the writer promises). Not thread-safe: the writer calls it from
    the thread that consumes results in input order, which keeps the choice of the kept
    file deterministic."""

    def __init__(self) -> None:
        self.first: dict[bytes, str] = {}

    def seen(self, digest: bytes, name: str) -> str | None:
        """The earlier file with these bytes, or None (remembering ``name``) when new."""
        if not digest:
            return None
        first = self.first.get(digest)
        if first is None:
            self.first[digest] = name
        return first


class SkipLog:
    """The writer's own skips by reason, with the first examples of each (the manifest's
    ``skipped`` / ``skipped_total`` / ``skipped_examples``)."""

    def __init__(self, max_examples: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples = max_examples

    def __call__(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(detail)

    def footer(self) -> dict[str, Any]:
        return {
            "skipped": dict(sorted(self.counts.items())),
            "skipped_total": sum(self.counts.values()),
            "skipped_examples": self.examples,
        }
