"""The papers' evaluation protocols: which split each sample goes to.

==================  ===========================================================  ==========
protocol            what it is                                                   papers
==================  ===========================================================  ==========
fractions           ``--splits train=0.8,val=0.1,test=0.1`` by identity (nobody   default
                    in two splits) or, ``--split-by random``, by sample
                    (Morph II's "random 80-20": a person may be in train and
                    test)
k-fold              ``--folds K --fold i``: the groups are dealt into K folds of  Xing 5-fold
                    equal size; fold i is the test split, a ``val_fraction`` of
                    the other folds' groups is validation, the rest trains
leave one person    ``--lopo --fold i``: the i-th person (sorted by identity) is  FG-NET
out (LOPO)          the test split; K = the number of persons
splits from a file  ``--splits-from FILE``: a data set's official list,           official
                    ``name split`` per line (name = sample key, its file name,   lists
                    or identity); samples the list does not name are dropped
                    (counted)
==================  ===========================================================  ==========

Every protocol is deterministic (a seeded sha256 of the group, never ``hash()``), and the
manifest records it (``options.protocol``) so a run can say which protocol its numbers
follow. Validation never comes out of a test fold: in k-fold and LOPO it is carved from the
training folds, by group, so no person is in validation and test either.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ageray.data.records import InputError
from ageray.data.splits import DEFAULT_SPLITS, assign_split, parse_splits, stable_unit

__all__ = ["SplitProtocol", "read_split_list"]

SplitBy = Literal["identity", "random"]


@dataclass(frozen=True)
class SplitProtocol:
    """One of the protocols of the module docstring. ``assign(samples)`` maps every sample
    ``(key, identity)`` to a split name, or None (dropped: not in the ``splits_from`` list).

    ``split_by``: the unit that never straddles two splits -- ``identity`` (a sample without
    an identity is its own group) or ``random`` (every sample alone). ``folds``/``fold``:
    k-fold; ``lopo``: leave one person out (``fold`` = which person, sorted by identity);
    ``split_list``: {name: split} from :func:`read_split_list`; ``val_fraction``: the share
    of the training folds' groups that validate (k-fold, LOPO); ``seed``: the hash seed.
    """

    fractions: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    split_by: SplitBy = "identity"
    folds: int | None = None
    fold: int | None = None
    lopo: bool = False
    split_list: Mapping[str, str] | None = None
    split_list_source: str = ""
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split_by not in ("identity", "random"):
            raise InputError(f"--split-by {self.split_by!r} must be identity or random")
        modes = [self.folds is not None, self.lopo, self.split_list is not None]
        if sum(modes) > 1:
            raise InputError("choose one of --folds, --lopo and --splits-from, not several")
        if self.folds is not None and self.folds < 2:
            raise InputError(f"--folds {self.folds}: k-fold needs at least 2 folds")
        if (self.folds is not None or self.lopo) and self.fold is None:
            raise InputError("--folds / --lopo need --fold i: which fold is the test split")
        if self.fold is not None and not (self.folds is not None or self.lopo):
            raise InputError("--fold needs --folds K or --lopo")
        if self.fold is not None and self.fold < 0:
            raise InputError(f"--fold {self.fold} must be >= 0")
        if self.folds is not None and self.fold is not None and self.fold >= self.folds:
            raise InputError(f"--fold {self.fold} is out of range for --folds {self.folds}")
        if self.lopo and self.split_by != "identity":
            raise InputError("--lopo leaves one PERSON out; it needs --split-by identity")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        parse_splits(dict(self.fractions))  # validates names and the sum

    # ------------------------------------------------------------------ description

    @property
    def name(self) -> str:
        if self.split_list is not None:
            return "splits-from"
        if self.lopo:
            return "lopo"
        if self.folds is not None:
            return "k-fold"
        return "fractions"

    def describe(self) -> dict[str, Any]:
        """What the manifest records (``options.protocol``)."""
        out: dict[str, Any] = {"name": self.name, "split_by": self.split_by, "seed": self.seed}
        if self.name == "fractions":
            out["fractions"] = dict(self.fractions)
        if self.name in ("k-fold", "lopo"):
            out.update(folds=self.folds, fold=self.fold, val_fraction=self.val_fraction)
        if self.name == "splits-from":
            out["source"] = self.split_list_source
        return out

    @property
    def split_names(self) -> list[str]:
        if self.split_list is not None:
            return sorted(set(self.split_list.values()))
        if self.name in ("k-fold", "lopo"):
            return ["train", "val", "test"]
        return list(self.fractions)

    # ------------------------------------------------------------------ assignment

    def group(self, key: str, identity: str | None) -> str:
        """The unit that stays in one split."""
        if self.split_by == "identity" and identity is not None:
            return f"identity:{identity}"
        return f"key:{key}"

    def assign(self, samples: Sequence[tuple[str, str | None]]) -> list[str | None]:
        """The split of every ``(key, identity)`` sample (None = dropped), in order."""
        groups = [self.group(k, i) for k, i in samples]
        if self.split_list is not None:
            return [self._listed(k, i) for k, i in samples]
        if self.name == "fractions":
            fr = dict(self.fractions)
            return [assign_split(g, fr, self.seed) for g in groups]
        test_groups = self._test_groups(groups)
        fr = {"train": 1.0 - self.val_fraction, "val": self.val_fraction}
        return ["test" if g in test_groups else assign_split(g, fr, self.seed + 1) for g in groups]

    def fold_count(self, samples: Sequence[tuple[str, str | None]]) -> int:
        """K: ``folds``, or for LOPO the number of persons."""
        if self.lopo:
            return len(_persons(samples))
        return int(self.folds or 0)

    def _test_groups(self, groups: list[str]) -> set[str]:
        unique = sorted(set(groups))
        if self.lopo:
            persons = [g for g in unique if g.startswith("identity:")]
            if not persons:
                raise InputError("--lopo needs records with identities; this source has none")
            if self.fold is not None and self.fold >= len(persons):
                raise InputError(
                    f"--lopo --fold {self.fold}: there are {len(persons)} persons "
                    f"(folds 0..{len(persons) - 1})"
                )
            return {persons[int(self.fold or 0)]}
        # k-fold: deal the groups, in a seeded order, round-robin into K folds, so the folds
        # differ by at most one group and every group is in exactly one fold.
        k = int(self.folds or 0)
        order = sorted(unique, key=lambda g: (stable_unit(self.seed, g), g))
        return {g for i, g in enumerate(order) if i % k == self.fold}

    def _listed(self, key: str, identity: str | None) -> str | None:
        assert self.split_list is not None
        for name in (key, os.path.basename(key), identity):
            if name is not None and name in self.split_list:
                return self.split_list[name]
        return None


def _persons(samples: Iterable[tuple[str, str | None]]) -> list[str]:
    return sorted({i for _, i in samples if i is not None})


def read_split_list(text: str, source: str = "splits file") -> dict[str, str]:
    """``{name: split}`` from an official split list: one ``name split`` per line, separated
    by a comma, a tab or spaces; ``#`` comments, blank lines and a ``name,split`` header
    are ignored. A name listed twice with two splits is an error (the list contradicts
    itself)."""
    out: dict[str, str] = {}
    dialect_delims = ",\t"
    for lineno, raw in enumerate(io.StringIO(text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if any(d in line for d in dialect_delims):
            row = next(csv.reader([line], delimiter="," if "," in line else "\t"))
        else:
            row = line.split()
        row = [c.strip() for c in row if c.strip()]
        if len(row) != 2:
            raise InputError(
                f"{source} line {lineno}: {raw.strip()!r} must be 'name split' (two fields)"
            )
        name, split = row
        if lineno == 1 and (name.lower(), split.lower()) in (
            ("name", "split"),
            ("key", "split"),
            ("file", "split"),
            ("identity", "split"),
        ):
            continue
        try:
            parse_splits({split: 1.0})
        except ValueError as exc:
            raise InputError(f"{source} line {lineno}: {exc}") from exc
        if out.get(name, split) != split:
            raise InputError(
                f"{source} line {lineno}: {name!r} is listed in both {out[name]!r} and {split!r}"
            )
        out[name] = split
    if not out:
        raise InputError(f"{source} lists no sample; expected lines like 'img_0001.jpg,test'")
    return out
