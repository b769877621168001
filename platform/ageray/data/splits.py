"""The split rule: which split (train / val / test ...) a sample belongs to, and the stable
hash it and every other deterministic choice of the data layer is made from.

**Deterministic and stable under growth.** Each *group* (an identity, or a sample key when
there is none) goes to the split where ``sha256(seed, group)`` (as a number in [0, 1)) falls
among the cumulative fractions. Adding records never moves an existing record to another
split, so test data never leaks into train when a data set grows. Fractions are met in
expectation (exactly for ``{"test": 1}``). ``stable_unit`` is also what the shard order and
the stream's seeds are made from: the same on every machine and Python version, unlike
``hash()``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from ageray.data.manifest import SPLIT_NAME

__all__ = ["DEFAULT_SPLITS", "assign_split", "parse_splits", "stable_unit"]

DEFAULT_SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


def parse_splits(text: str | Mapping[str, float]) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` (or a mapping) -> validated ``{name: fraction}``.

    Fractions must be >= 0 and sum to 1 (within 1e-6); ``test=1`` puts everything in test.
    """
    if isinstance(text, Mapping):
        items = [(str(k), float(v)) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(
                    f"--splits {text!r}: {part!r} must look like name=fraction, "
                    "e.g. train=0.8,val=0.1,test=0.1"
                )
            name, value = part.split("=", 1)
            try:
                items.append((name.strip(), float(value)))
            except ValueError as exc:
                raise ValueError(f"--splits {text!r}: {value!r} is not a number") from exc
    if not items:
        raise ValueError(f"--splits {text!r}: no splits given")
    out: dict[str, float] = {}
    for name, frac in items:
        if not SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must match {SPLIT_NAME.pattern}")
        if name in out:
            raise ValueError(f"split {name!r} given twice in {text!r}")
        if not (frac >= 0 and math.isfinite(frac)):
            raise ValueError(f"split {name}={frac}: fractions must be >= 0")
        out[name] = frac
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions {out} sum to {total:g}; they must sum to 1")
    return out


def stable_unit(seed: int, text: str) -> float:
    """A deterministic number in [0, 1) from ``(seed, text)``; the same on every machine and
    Python version (unlike ``hash()``)."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(group: str, splits: Mapping[str, float], seed: int = 0) -> str:
    """The split of a group (identity or key): where its stable hash falls among the
    cumulative fractions. Depends only on ``group``, ``splits`` and ``seed``."""
    u = stable_unit(seed, group)
    acc = 0.0
    last = None
    for name, frac in splits.items():
        if frac <= 0:
            continue
        acc += frac
        last = name
        if u < acc:
            return name
    assert last is not None, "parse_splits guarantees a positive fraction"
    return last
