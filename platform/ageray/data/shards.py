"""The shard writer: records -> train/val/test tar shards + ``manifest.json``.

Layout and formats are fixed in docs/design.md ("Shards on disk or S3"). What this module
decides, and why:

**Two passes, bounded memory.** Splitting by identity needs every identity before the first
byte is written, and shards must be shuffled (importers often yield files sorted by age:
shards in that order would feed a training stream nothing but babies for minutes). Pass 1
iterates the importer once, optionally aligns each record (``transform``) and verifies it
decodes, in a thread pool; the image bytes are appended to one local staging file and only
~200 bytes of metadata per record stay in RAM. Pass 2 packs each shard from the staging file
(random access by offset) in parallel. RAM is O(records x metadata), never O(images); disk
is one copy of the (aligned) images under the temp folder. The importer runs once, so its
report is counted once.

**Splits.** By identity when the record has one (nobody spans two splits), else by key, with
the rule of ``ageray.data.splits`` (stable when a data set grows); or by one of the papers'
protocols (``ageray.data.protocols``: random, k-fold, leave one person out, an official list).

**Order and shard boundaries.** Within a split, samples are ordered by ``sha256(seed, key)``
(a fixed shuffle), except that the first sample of every age class comes first: the first
shard(s) then hold every age of the split, which lets a class-balanced stream start fast.
Shards are cut at ``max_count`` samples or ``max_bytes`` (tar bytes, estimated exactly from
the member sizes), named ``<split>/<split>-NNNNNN.tar``.

**Atomicity and re-runs.** Each shard is written through ``storage.atomic_write`` (local:
temp name in the same folder + ``os.replace``; S3: a complete upload, multipart above
``multipart_threshold``), so no half-written shard is ever visible under its final name.
Tar headers are fixed (mtime 0, uid/gid 0, mode 0644), so the same input gives byte-identical
shards with the same names and sha256. A re-run first deletes the old ``manifest.json``
(readers then get a clear "run make_shards first" instead of a manifest that no longer matches
the shards), writes the shards, writes the new manifest last (atomically), and only then
deletes shards of the earlier run that the new manifest does not list (e.g. it had more
shards, or other splits) and temporary files of crashed runs. A crash at any point leaves
either no manifest or a manifest whose shards all exist. One writer per output at a time.

**Manifest.** As in docs/design.md (its format lives in ``ageray.data.manifest``), plus:
each shard's ``age_hist`` (a class-balanced stream reads shards covering every age first),
``skipped`` / ``skipped_total`` / ``skipped_examples`` for records the writer dropped
(``not_image``, ``truncated``, ``duplicate_key``, ``duplicate_image`` (the same
bytes as an earlier file), ``transform_dropped``, ``transform_error``
and the label check's reasons, ``bad_age``, ``age_out_of_range``, ``bad_gender``, ...; the
importer's own skips are under ``import``) and ``align.enabled``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from PIL import Image
from tqdm import tqdm

from ageray.data import storage
from ageray.data.dedup import ContentDedup, SkipLog, content_digest
from ageray.data.labels import LabelError, check_labels
from ageray.data.manifest import (
    FORMAT,
    SHARD_NAME,
    SPLIT_NAME,
    remove_manifest,
    split_stats,
    write_manifest,
)
from ageray.data.protocols import SplitProtocol
from ageray.data.records import ImportReport, Record, printable
from ageray.data.samplers import age_class
from ageray.data.splits import DEFAULT_SPLITS, parse_splits, stable_unit
from ageray.data.transforms import CorruptImageError, decode_image

__all__ = ["align_transform", "write_shards"]

log = logging.getLogger(__name__)

_BLOCK = tarfile.BLOCKSIZE


# --------------------------------------------------------------------------------------
# Pass 1: import, transform, verify, stage
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    key: str
    offset: int
    length: int
    ext: str
    age: float | None
    age_std: float | None
    gender: int | None
    race: int | None
    identity: str | None
    box: list[float] | None
    width: int
    height: int
    order: float = 0.0
    json_len: int = 0


@dataclass
class _Checked:
    record: Record | None
    image: bytes = b""
    ext: str = ""
    size: tuple[int, int] = (0, 0)
    box: list[float] | None = None
    skip: str | None = None
    detail: str = ""
    digest: bytes = b""


def _check_record(
    record: Record, transform: Callable[[Record], Record | None] | None, verify: bool
) -> _Checked:
    """Runs in a pool thread: verify the image decodes (so a corrupt file is counted as
    ``not_image``/``truncated``, not as an alignment failure), align (optional), pick the
    member extension. Returns a skip reason instead of raising for unusable records."""
    name = record.source or record.key
    try:  # the one label check (ageray.data.labels), as the importers and the stream
        check_labels(
            {
                "age": record.age,
                "age_std": record.age_std,
                "gender": record.gender,
                "race": record.race,
            },
            require_age=False,
            identity=False,
        )
    except LabelError as exc:
        return _Checked(None, skip=exc.reason, detail=f"{name}: {exc}")
    data = record_bytes = record.image  # the file as imported: what duplicates share
    try:
        img = decode_image(data, name=name) if verify else None
        if transform is None:
            with Image.open(io.BytesIO(data)) as probe:
                fmt, size = probe.format, probe.size
    except CorruptImageError as exc:
        return _Checked(None, skip=exc.reason, detail=str(exc))
    except (OSError, SyntaxError, ValueError) as exc:  # verify=False and not an image
        return _Checked(None, skip="not_image", detail=f"{name}: {exc}")
    if transform is not None:
        try:
            out = transform(record)
        except (CorruptImageError, OSError, ValueError, RuntimeError) as exc:
            return _Checked(None, skip="transform_error", detail=f"{name}: {exc}")
        if out is None:
            return _Checked(None, skip="transform_dropped", detail=name)
        record, data = out, out.image
        try:
            img = decode_image(data, name=name) if verify else None
            with Image.open(io.BytesIO(data)) as probe:
                fmt, size = probe.format, probe.size
        except (CorruptImageError, OSError, SyntaxError, ValueError) as exc:
            return _Checked(None, skip="transform_error", detail=f"{name}: output: {exc}")
    if fmt == "JPEG":
        ext = "jpg"
    elif fmt == "PNG":
        ext = "png"
    else:  # BMP, WEBP, TIFF...: store losslessly as PNG so the contract stays jpg|png
        if img is None:
            img = decode_image(data, name=name)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data, ext = buf.getvalue(), "png"
    box = getattr(record, "box", None)
    return _Checked(
        record,
        image=data,
        ext=ext,
        size=size,
        box=list(box) if box else None,
        digest=content_digest(record_bytes),
    )


class _Staging:
    """Pass 1 output: image bytes appended to one local file, metadata in a list."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "images.bin")
        self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self.entries: list[_Entry] = []
        self.keys: set[str] = set()
        self.offset = 0
        self._fd: int | None = None

    def add(self, prep: _Checked) -> None:
        rec = prep.record
        assert rec is not None
        self._fh.write(prep.image)
        self.entries.append(
            _Entry(
                key=rec.key,
                offset=self.offset,
                length=len(prep.image),
                ext=prep.ext,
                age=None if rec.age is None else float(rec.age),
                age_std=None if rec.age_std is None else float(rec.age_std),
                gender=rec.gender,
                race=rec.race,
                identity=rec.identity,
                box=prep.box,
                width=prep.size[0],
                height=prep.size[1],
            )
        )
        self.offset += len(prep.image)

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, tmp_dir: str | None) -> Iterator[_Staging]:
        """A staging file in a fresh temp folder, closed and removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="ageray-shards-", dir=tmp_dir) as tmp:
            staging = cls(tmp)
            try:
                yield staging
            finally:
                staging.close()

    def finish(self) -> None:
        self._fh.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, entry: _Entry) -> bytes:
        assert self._fd is not None
        return os.pread(self._fd, entry.length, entry.offset)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------
# Pass 2: pack shards
# --------------------------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """Counts and sha256-hashes everything written through it to ``fh``."""

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__()
        self.fh = fh
        self.hash = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.fh.write(view)
        self.hash.update(view)
        self.nbytes += len(view)
        return len(view)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _member_bytes(size: int) -> int:
    return _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK


@dataclass
class _ShardPlan:
    split: str
    index: int
    entries: list[_Entry] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.split}-{self.index:06d}.tar"


def _labels_json(entry: _Entry, identity_index: Mapping[str, int]) -> bytes:
    labels = {
        "age": entry.age,
        "age_std": entry.age_std,
        "gender": entry.gender,
        "race": entry.race,
        "identity": None if entry.identity is None else identity_index[entry.identity],
        "identity_name": entry.identity,
        "box": entry.box,
    }
    return json.dumps(labels, separators=(",", ":")).encode()


def _write_shard(
    plan: _ShardPlan,
    staging: _Staging,
    output: str,
    identity_index: Mapping[str, int],
    multipart_threshold: int,
) -> dict[str, Any]:
    url = storage.join(output, plan.name)
    hist: Counter[int] = Counter()
    with storage.atomic_write(url, multipart_threshold=multipart_threshold) as fh:
        hw = _HashingWriter(fh)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for e in plan.entries:
                image = staging.read(e)
                labels = _labels_json(e, identity_index)
                tar.addfile(_tarinfo(f"{e.key}.{e.ext}", len(image)), io.BytesIO(image))
                tar.addfile(_tarinfo(f"{e.key}.json", len(labels)), io.BytesIO(labels))
                c = age_class(e.age, 10**9)
                if c is not None:
                    hist[c] += 1
    return {
        "name": plan.name,
        "count": len(plan.entries),
        "bytes": hw.nbytes,
        "sha256": hw.hash.hexdigest(),
        "age_hist": {str(k): v for k, v in sorted(hist.items())},
    }


def _order_split(entries: list[_Entry], seed: int, num_classes: int) -> list[_Entry]:
    """Fixed shuffle by hash of key, with one sample of every age class first."""
    for e in entries:
        e.order = stable_unit(seed, "order:" + e.key)
    entries.sort(key=lambda e: (e.order, e.key))
    head: dict[int, _Entry] = {}
    for e in entries:
        c = age_class(e.age, num_classes)
        if c is not None and c not in head:
            head[c] = e
    first = [head[c] for c in sorted(head)]
    chosen = {id(e) for e in first}
    return first + [e for e in entries if id(e) not in chosen]


def _entry_tar_bytes(e: _Entry) -> int:
    """Exact tar bytes of a sample's two members (+ a PAX header block pair per long name)."""
    total = 0
    for name_len, size in ((len(e.key) + 1 + len(e.ext), e.length), (len(e.key) + 5, e.json_len)):
        total += _member_bytes(size)
        if name_len >= tarfile.LENGTH_NAME:
            total += 2 * _BLOCK
    return total


def _cut_shards(
    split: str, entries: list[_Entry], max_count: int, max_bytes: int
) -> list[_ShardPlan]:
    """Consecutive runs of ``entries`` of at most ``max_count`` samples and ``max_bytes`` tar
    bytes (end-of-archive and record padding included). A single sample larger than
    ``max_bytes`` gets a shard of its own."""

    def tar_size(member_bytes: int) -> int:
        return -(-(member_bytes + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    plans: list[_ShardPlan] = []
    cur: _ShardPlan | None = None
    cur_bytes = 0
    for e in entries:
        size = _entry_tar_bytes(e)
        if cur is None or (
            cur.entries
            and (len(cur.entries) >= max_count or tar_size(cur_bytes + size) > max_bytes)
        ):
            cur = _ShardPlan(split, len(plans))
            plans.append(cur)
            cur_bytes = 0
        cur.entries.append(e)
        cur_bytes += size
    return plans


# --------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------


def write_shards(
    records: Iterable[Record],
    output: str | os.PathLike[str],
    *,
    splits: Mapping[str, float] | str = DEFAULT_SPLITS,
    max_count: int = 1000,
    max_bytes: int = 512 * 1024 * 1024,
    workers: int = 4,
    seed: int = 0,
    transform: Callable[[Record], Record | None] | None = None,
    report: ImportReport | None = None,
    source: str = "",
    input: str = "",
    options: Mapping[str, Any] | None = None,
    align_stats: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    verify_images: bool = True,
    multipart_threshold: int = storage.DEFAULT_MULTIPART_THRESHOLD,
    num_classes: int = 101,
    progress: bool = True,
    tmp_dir: str | None = None,
    protocol: SplitProtocol | None = None,
) -> dict[str, Any]:
    """Write ``records`` as split tar shards + ``manifest.json`` under ``output`` (a folder
    or ``s3://bucket/prefix``) and return the manifest.

    ``transform(record) -> Record | None`` runs on every record before it is staged (face
    alignment); None drops the record (counted as ``transform_dropped``). It is called from
    ``workers`` threads at once: it must be thread-safe (or pass ``workers=1``). A transform
    may set a ``box`` attribute on the record it returns; it is stored in the label JSON.
    ``report`` is the importer's report, stored under ``"import"``; pass it after the
    importer has been consumed (the writer consumes ``records`` before writing the manifest).
    ``verify_images`` decodes every image once so corrupt files are dropped here (counted by
    reason) instead of in every training epoch; identical files are kept once. ``protocol``
    (``ageray.data.protocols``) decides the splits instead of ``splits`` and ``seed``.
    """
    output = str(output).rstrip("/") if storage.is_s3(output) else str(output)
    if protocol is None:
        protocol = SplitProtocol(fractions=parse_splits(splits), seed=seed)
    cut = _Cut(max_count=max_count, max_bytes=max_bytes, seed=seed, classes=num_classes)
    workers, skips = max(1, int(workers)), SkipLog()
    header = _header(source=source, input=input, options=options, protocol=protocol, cut=cut)
    with _Staging.temporary(tmp_dir) as staging:
        _pass1(records, staging, transform, verify_images, workers, skips, progress)
        staging.finish()
        footer = {
            "import": report.to_dict() if report is not None else None,
            "align": _align_stats(align_stats, transform),
            **skips.footer(),
        }
        return _pass2(
            staging,
            output,
            protocol=protocol,
            cut=cut,
            workers=workers,
            multipart_threshold=multipart_threshold,
            progress=progress,
            header=header,
            footer=footer,
        )


@dataclass(frozen=True)
class _Cut:
    """How pass 2 orders a split (``seed``, age ``classes`` first) and cuts it into shards;
    the sizes are checked here, before anything is imported."""

    max_count: int
    max_bytes: int
    seed: int
    classes: int

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count={self.max_count} must be at least 1")
        if self.max_bytes < 4 * _BLOCK:
            raise ValueError(f"max_bytes={self.max_bytes} is too small for even one sample")


def _header(
    *,
    source: str,
    input: str,
    options: Mapping[str, Any] | None,
    protocol: SplitProtocol,
    cut: _Cut,
) -> dict[str, Any]:
    """The manifest's first keys: what was imported and with which options."""
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "input": printable(str(input)),
        "options": {
            **dict(options or {}),
            "splits": dict(protocol.fractions) if protocol.name == "fractions" else None,
            "protocol": protocol.describe(),
            "seed": cut.seed,
            "max_count": cut.max_count,
            "max_bytes": cut.max_bytes,
        },
    }


def _align_stats(
    stats: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
    transform: Callable[..., Any] | None,
) -> dict[str, Any]:
    if callable(stats):
        stats = stats()
    out = {"enabled": transform is not None}
    out.update(dict(stats or {}))
    return out


def _pass1(
    records: Iterable[Record],
    staging: _Staging,
    transform: Callable[[Record], Record | None] | None,
    verify: bool,
    workers: int,
    skip: Callable[[str, str], None],
    progress: bool,
) -> None:
    """Import -> (transform, verify) in a thread pool, results consumed in input order so the
    outcome is deterministic; at most ``4 * workers`` records in flight."""
    inflight: deque[Future[_Checked]] = deque()
    dedup = ContentDedup()
    bar = tqdm(desc="import", unit="img", disable=not progress, smoothing=0.1)

    def consume(fut: Future[_Checked]) -> None:
        prep = fut.result()
        bar.update(1)
        if prep.skip is not None:
            skip(prep.skip, prep.detail)
            return
        assert prep.record is not None
        name = prep.record.source or prep.record.key
        if prep.record.key in staging.keys:
            skip("duplicate_key", name)
            return
        first = dedup.seen(prep.digest, name)
        if first is not None:
            skip("duplicate_image", f"{name} (same bytes as {first})")
            return
        staging.keys.add(prep.record.key)
        staging.add(prep)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="shards-import") as pool:
            for rec in records:
                if not isinstance(rec, Record):
                    raise TypeError(f"write_shards expects Record objects, got {type(rec)!r}")
                inflight.append(pool.submit(_check_record, rec, transform, verify))
                while len(inflight) >= 4 * workers:
                    consume(inflight.popleft())
            while inflight:
                consume(inflight.popleft())
    finally:
        for fut in inflight:
            fut.cancel()
        bar.close()


def _pass2(
    staging: _Staging,
    output: str,
    *,
    protocol: SplitProtocol,
    cut: _Cut,
    workers: int,
    multipart_threshold: int,
    progress: bool,
    header: dict[str, Any],
    footer: dict[str, Any],
) -> dict[str, Any]:
    """Assign splits, cut shards, write them in parallel, then the manifest (last)."""
    identities = sorted({e.identity for e in staging.entries if e.identity is not None})
    identity_index = {name: i for i, name in enumerate(identities)}
    by_split, dropped = _assign(staging.entries, protocol, identity_index)
    if dropped:
        footer["skipped"] = {**footer["skipped"], "not_in_split_list": len(dropped)}
        footer["skipped_total"] += len(dropped)
        examples = {**footer["skipped_examples"], "not_in_split_list": dropped[:5]}
        footer["skipped_examples"] = examples
    plans = {
        name: _cut_shards(
            name, _order_split(entries, cut.seed, cut.classes), cut.max_count, cut.max_bytes
        )
        for name, entries in by_split.items()
    }
    all_plans = [p for ps in plans.values() for p in ps]
    remove_manifest(output)  # readers must not pair an old manifest with new shards
    infos = _write_all(
        all_plans,
        staging,
        output,
        identity_index,
        workers=workers,
        multipart_threshold=multipart_threshold,
        progress=progress,
    )
    manifest: dict[str, Any] = dict(header)
    manifest["num_identities"] = len(identities)
    manifest["splits"] = {
        name: split_stats((e for p in ps for e in p.entries), [infos[p.name] for p in ps])
        for name, ps in plans.items()
    }
    manifest.update(footer)
    write_manifest(output, manifest)
    _remove_stale(output, {p.name for p in all_plans})
    return manifest


def _assign(
    entries: list[_Entry], protocol: SplitProtocol, identity_index: Mapping[str, int]
) -> tuple[dict[str, list[_Entry]], list[str]]:
    """Entries by split (their label JSON sized for the cut) and the keys no split takes."""
    by_split: dict[str, list[_Entry]] = {name: [] for name in protocol.split_names}
    dropped = []
    for e, split in zip(entries, protocol.assign([(e.key, e.identity) for e in entries])):
        if split is None:  # an official split list that does not name this sample
            dropped.append(e.key)
            continue
        by_split[split].append(e)
        e.json_len = len(_labels_json(e, identity_index))
    return by_split, dropped


def _write_all(
    plans: list[_ShardPlan],
    staging: _Staging,
    output: str,
    identity_index: Mapping[str, int],
    *,
    workers: int,
    multipart_threshold: int,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Every shard written (``workers`` at a time); their infos by shard name."""
    infos: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(plans), desc="shards", unit="shard", disable=not progress)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="shards-write") as pool:
            futures = [
                pool.submit(
                    _write_shard, plan, staging, output, identity_index, multipart_threshold
                )
                for plan in plans
            ]
            for fut in futures:  # results read in this thread only: no lock needed
                info = fut.result()
                infos[info["name"]] = info
                bar.update(1)
    finally:
        bar.close()
    return infos


def _remove_stale(output: str, keep: set[str]) -> list[str]:
    """Delete shards of earlier runs that the new manifest does not list, and temporary files
    of crashed runs. Only names that look like ours are touched."""
    removed = []
    prefix = storage.join(output, "")
    for url in storage.list_files(output):
        rel = url[len(prefix) :] if url.startswith(prefix) else os.path.relpath(url, output)
        rel = rel.replace(os.sep, "/")
        if "/" not in rel:
            continue
        folder, base = rel.rsplit("/", 1)
        stale_shard = SHARD_NAME.match(rel) and rel not in keep
        crashed_tmp = SPLIT_NAME.match(folder) and base.startswith(".") and storage.TMP_MARK in base
        if stale_shard or crashed_tmp:
            storage.remove(url)
            removed.append(rel)
    if removed:
        log.info("removed %d stale file(s) under %s", len(removed), output)
    return removed


def align_transform(aligner: Any, *, quality: int = 95) -> Callable[[Record], Record | None]:
    """The writer's ``transform`` for a :class:`ageray.data.align.FaceAligner`: the aligned
    JPEG crop replaces the image (None when the aligner drops a face-less image) and the
    detected face box goes to the label JSON. Thread-safe as the aligner is."""
    from ageray.data.align import align_record

    def transform(record: Record) -> Record | None:
        new, result = align_record(record, aligner, quality=quality)
        if new is None:
            return None
        if result.box is not None:
            new.box = [round(float(v), 2) for v in result.box]  # type: ignore[attr-defined]
        return new

    return transform
