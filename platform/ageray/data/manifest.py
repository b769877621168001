"""``manifest.json``: the format constants, reading it (and one split of it), writing it.

The manifest is the contract between the shard writer (``ageray.data.shards``) and the
readers (``ageray.data.loader``, jobs that need a split's size or identity count): its
format tag, the shard naming rule, which label fields a split carries, counts and per-age
histograms (docs/design.md, "Shards on disk or S3"). Keeping the reading and the writing in
one module keeps the two sides of that contract from drifting apart.

Why writing is three small calls and not one: a re-run must first *remove* the old manifest
(readers then get a clear "run make_shards first" instead of a manifest that no longer
matches the shards being rewritten), and the new one is written *last*, atomically, after
every shard it lists exists.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ageray.data import storage
from ageray.data.samplers import age_class

__all__ = [
    "FORMAT",
    "LABEL_FIELDS",
    "MANIFEST",
    "SHARD_NAME",
    "SPLIT_NAME",
    "manifest_summary",
    "read_manifest",
    "remove_manifest",
    "split_info",
    "split_stats",
    "write_manifest",
]

FORMAT = "ageray-shards/1"
MANIFEST = "manifest.json"
LABEL_FIELDS = ("age", "age_std", "gender", "race", "identity", "box")
SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)/(?P=split)-\d{6}\.tar$")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_manifest(shards_url: str) -> dict[str, Any]:
    """The ``manifest.json`` under a shard folder / ``s3://`` prefix, checked for format."""
    url = storage.join(shards_url, MANIFEST)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no {MANIFEST} under {shards_url}: run `python -m jobs.make_shards --source "
            f"synthetic --output {shards_url}` (or another --source) first, or point "
            "data.shards at a folder written by jobs.make_shards"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
        raise ValueError(
            f"{url}: format {found!r} is not {FORMAT!r}; re-create the shards with "
            "python -m jobs.make_shards"
        )
    return manifest


def split_info(manifest: Mapping[str, Any], split: str, shards_url: str) -> dict[str, Any]:
    """One split's entry of ``manifest``; a clear error when it is absent or empty."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"split {split!r} is not in {storage.join(shards_url, MANIFEST)} "
            f"(it has {sorted(splits)}); set data.train_split / val_split / test_split to one "
            "of those, or re-run jobs.make_shards with --splits naming it"
        )
    info = splits[split]
    if not info.get("shards") or not info.get("count"):
        raise ValueError(
            f"split {split!r} under {shards_url} has no samples; re-run jobs.make_shards with "
            "a larger --splits fraction for it or more input"
        )
    return info


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def split_stats(entries: Iterable[Any], shard_infos: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's manifest entry from the samples written to it.

    ``entries`` have the label attributes of :data:`LABEL_FIELDS` (``identity`` a name or
    None) and the image ``width`` / ``height``; ``shard_infos`` are the per-shard entries
    (name, count, bytes, sha256, age_hist) in shard order.
    """
    entries = list(entries)
    hist: Counter[int] = Counter()
    present: set[str] = set()
    identities: set[str] = set()
    for e in entries:
        c = age_class(e.age, 10**9)  # keep real ages (e.g. 116) in the histogram
        if c is not None:
            hist[c] += 1
        for name in LABEL_FIELDS:
            if getattr(e, name) is not None:
                present.add(name)
        if e.identity is not None:
            identities.add(e.identity)
    if entries:
        ws = [e.width for e in entries]
        hs = [e.height for e in entries]
        size = {
            "min": [min(ws), min(hs)],
            "max": [max(ws), max(hs)],
            "mean": [round(sum(ws) / len(ws), 2), round(sum(hs) / len(hs), 2)],
        }
    else:
        size = {"min": None, "max": None, "mean": None}
    return {
        "count": len(entries),
        "shards": shard_infos,
        "age_hist": {str(k): v for k, v in sorted(hist.items())},
        "fields": [f for f in LABEL_FIELDS if f in present],
        "image_size": size,
        "identities": len(identities),
    }


def remove_manifest(output: str) -> None:
    """Delete the manifest under ``output`` (if any) before its shards are rewritten."""
    storage.remove(storage.join(output, MANIFEST))


def write_manifest(output: str, manifest: Mapping[str, Any]) -> str:
    """Write ``manifest`` atomically under ``output`` (last, after every shard it lists);
    returns its URL."""
    url = storage.join(output, MANIFEST)
    storage.write_json(url, dict(manifest))
    return url


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def manifest_summary(manifest: Mapping[str, Any], where: str = "") -> str:
    """A few lines a person can read at the end of ``jobs.make_shards``."""
    lines = []
    total = 0
    for name, split in manifest.get("splits", {}).items():
        total += split["count"]
        ids = f", {split['identities']} identities" if split.get("identities") else ""
        lines.append(
            f"  {name:<6} {split['count']:>7} samples in {len(split['shards']):>4} shard(s)"
            f"{ids}; labels: {', '.join(split['fields']) or '-'}"
        )
    imp = manifest.get("import") or {}
    skipped = manifest.get("skipped") or {}
    head = f"{manifest.get('source') or 'records'}: {total} samples written"
    if imp:
        head += (
            f" (imported {imp.get('imported', 0)}, importer skipped {imp.get('skipped_total', 0)})"
        )
    lines.insert(0, head)
    if skipped:
        lines.append(
            "  writer skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        )
    align = manifest.get("align") or {}
    if align.get("enabled"):
        stats = {k: v for k, v in align.items() if k != "enabled"}
        lines.append("  alignment: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    if where:
        lines.append(f"  manifest: {storage.join(where, MANIFEST)}")
    return "\n".join(lines)
