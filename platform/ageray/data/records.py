"""The record: one labelled face image as every importer yields it and the shard writer
stores it. Also the import report, which counts every row that could not be used.

Why one small type: seven importers (UTKFace, FG-NET, APPA-REAL, MIVIA, Morph II, identity
folders, generic csv) and a synthetic generator all feed the same writer; agreeing on one
record keeps the writer and the streams free of per-dataset cases.

**Any byte sequence in a name is imported or counted, never an abort.** File and folder
names that are not UTF-8 reach Python as ``str`` with surrogate escapes (PEP 383); they
open files fine but cannot be encoded, hashed, printed or stored as JSON. A record's
``identity`` and ``source`` and every example in a report go through :func:`printable`
(undecodable bytes become ``\\xNN``), so a person whose folder is named in Latin-1 is one
identity like any other. :class:`InputError` marks what is the user's to fix (a missing
input, a csv without its column): ``jobs.make_shards`` prints it as one line, exit 2.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "KEY_RE",
    "ImportReport",
    "InputError",
    "MissingInputError",
    "Record",
    "printable",
    "safe_key",
]

# webdataset groups tar members by the part of the name before the first dot, so keys may
# not contain dots (or slashes). Everything else outside [A-Za-z0-9_-] is replaced.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class InputError(ValueError):
    """An importer's input or options cannot be used as given (wrong layout, empty csv, a
    required column missing, an option out of range). The message names the input and the
    fix; it is a usage error, not a bug, and is reported without a traceback."""


class MissingInputError(InputError, FileNotFoundError):
    """The input path (or a file the layout requires) does not exist."""


def printable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes of a non-UTF-8 file name or csv
    cell) as ``\\xNN``: deterministic, distinct per byte sequence, and safe to encode,
    hash, print and store in JSON. Other text is returned unchanged."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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
        if self.identity is not None:
            self.identity = printable(str(self.identity))
        self.source = printable(self.source)
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
        self._example(reason, printable(example))

    def note_partial(self, reason: str, example: str) -> None:
        self.partial[reason] += 1
        self._example(reason, printable(example))

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
