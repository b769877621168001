"""The record: one labelled face image as every importer yields it and the shard writer
stores it. Also the import report, which counts every row that could not be used.

Why one small type: seven importers (UTKFace, FG-NET, APPA-REAL, MIVIA, Morph II, identity
folders, generic csv) and a synthetic generator all feed the same writer; agreeing on one
record keeps the writer and the streams free of per-dataset cases.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KEY_RE", "ImportReport", "Record", "safe_key"]

# webdataset groups tar members by the part of the name before the first dot, so keys may
# not contain dots (or slashes). Everything else outside [A-Za-z0-9_-] is replaced.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BAD = re.compile(r"[^A-Za-z0-9_-]+")

GENDERS = ("male", "female")  # UTKFace convention: 0 male, 1 female
RACES = ("white", "black", "asian", "indian", "other")  # UTKFace convention


def safe_key(text: str) -> str:
    """Turn a path or name into a webdataset-safe key (no dots, no slashes)."""
    key = _BAD.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {text!r}")
    return key


@dataclass
class Record:
    """One labelled image.

    ``image`` is the encoded file as found on disk (JPEG/PNG bytes); it is re-encoded only
    when alignment changes the pixels. ``age`` is in years (a float: apparent-age sets have
    real-valued labels). Optional labels are None when the source does not have them.
    ``identity`` is the person's name/id as a string; the shard writer maps identities to
    contiguous integer classes for identity pretraining.
    """

    key: str
    image: bytes
    age: float | None
    age_std: float | None = None
    gender: int | None = None
    race: int | None = None
    identity: str | None = None
    source: str = ""  # original path or csv row, for error messages only

    def __post_init__(self) -> None:
        if not KEY_RE.match(self.key):
            raise ValueError(f"record key {self.key!r} must match {KEY_RE.pattern}; use safe_key()")

    def labels(self) -> dict[str, Any]:
        """The JSON label payload stored next to the image in a shard."""
        return {
            "age": self.age,
            "age_std": self.age_std,
            "gender": self.gender,
            "race": self.race,
            "identity_name": self.identity,
        }


@dataclass
class ImportReport:
    """Counts what an importer yielded and what it could not use, with the first examples.

    Nothing is dropped silently: every skip goes through :meth:`skip` with a reason, and
    :meth:`summary` is printed at the end of an import and stored in the manifest.
    """

    source: str = ""
    max_examples: int = 5
    imported: int = 0
    skipped: Counter = field(default_factory=Counter)
    partial: Counter = field(default_factory=Counter)  # imported, but a field was missing
    examples: dict[str, list[str]] = field(default_factory=dict)

    def ok(self) -> None:
        self.imported += 1

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        self._example(reason, example)

    def note_partial(self, reason: str, example: str) -> None:
        self.partial[reason] += 1
        self._example(reason, example)

    def _example(self, reason: str, example: str) -> None:
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "imported": self.imported,
            "skipped": dict(self.skipped),
            "skipped_total": self.total_skipped,
            "partial": dict(self.partial),
            "examples": self.examples,
        }

    def summary(self) -> str:
        lines = [f"{self.source}: imported {self.imported}, skipped {self.total_skipped}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n:>6} {reason}: e.g. {', '.join(self.examples[reason][:3])}")
        for reason, n in sorted(self.partial.items()):
            lines.append(f"  partial {n:>6} {reason}: e.g. {', '.join(self.examples[reason][:3])}")
        return "\n".join(lines)
