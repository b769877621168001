"""Shards -> batches on each Ray Train worker: ``train_loader`` and ``eval_loader``.

The pipeline is webdataset-style, a chain of small generator stages, each testable alone:

    shard_source -> open_shards -> tar_samples -> [select_modulo] -> parse_labels
      train/instance:        -> stop_on_empty_pass -> shuffled -> prepared -> batched
      train/class|age_aware: -> stop_on_empty_pass -> balanced_stream(prepare) -> batched
      eval:                  -> prepared -> batched

URLs are opened with ``webdataset.gopen``, where ``s3://`` is registered to
:func:`ageray.data.storage.open_read` (ranged GETs that resume after dropped connections);
local paths with ``storage.open_read`` directly. Tar members are read by a small header
parser (:func:`tar_members`), several times cheaper than ``tarfile``.

**Who reads what.** There are ``G = world_size * max(1, num_workers)`` reader *slots*
(rank r, DataLoader worker w -> slot ``r * W + w``). With ``S >= G`` shards, slot g reads
shards ``g, g+G, g+2G, ...`` (shard-level split; in training the shard list is first
permuted with a per-epoch seed shared by all ranks, so the split changes every epoch).
With ``S < G`` every slot reads every shard in the same order and keeps the samples whose
running index ``i`` satisfies ``i % G == g`` (sample-level split). Either way each sample of
a split belongs to exactly one slot: evaluation sees every sample exactly once across ranks
and workers. Class-balanced and age-aware training ignore the split (every slot reads all
shards with its own shard order and RNG) so that every slot can draw every age class; they
read one sample per sample emitted, so total I/O is unchanged.

**Equal steps.** Training streams repeat their shard subset forever (reshuffled each
pass); the loader yields exactly ``steps = data.steps_per_epoch or max(1, count //
(world_size * batch_size))`` batches on every rank, from the manifest count, whatever the
rank's share of shards or samples. No rank runs out early, so DDP cannot hang. A stream
that reads a whole pass without one usable sample stops instead of spinning; if all of a
rank's workers stop, the loader raises a clear error rather than returning a short epoch.

**Batches.** DataLoader workers run everything up to the augmented image; the pixels travel
to the main process as one uint8 batch in shared memory (4x fewer bytes than float32; the
buffers are recycled once normalised, see :class:`_BufferRing`) and the main process
normalises the batch (``ToNormalizedTensor.normalize_uint8``: bit-identical to the
per-image transform Serve uses), optionally on ``device`` (``"cuda"``).

**Corrupt input is skipped and counted, never fatal**: ``not_image``, ``truncated``,
``too_large`` (image members), ``no_label`` (image without json), ``no_image`` (json
without image), ``bad_label`` (json that is not a label object), ``bad_shard`` (a shard
that cannot be opened or read, or ends before its manifest count; counted once per read,
by the slot that owns it, so a training stream that repeats a bad shard counts it per pass).
Counts are made in the DataLoader worker processes; each batch carries the counts its worker
made since its previous batch (``"__skipped__"``; a worker with nothing left to batch sends
one last counts-only item), and the loader adds them to ``loader.skipped`` in the main
process (every reason present, 0 until it happens) and strips the field.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ageray.data import storage
from ageray.data.samplers import PASS_END, age_class, balanced_stream, shuffled
from ageray.data.shards import FORMAT, MANIFEST, stable_unit
from ageray.data.transforms import (
    CorruptImageError,
    ToNormalizedTensor,
    build_eval_transform,
    build_train_transform,
    decode_image,
    split_finisher,
    train_draft_size,
)

__all__ = [
    "IMAGE_EXTS",
    "SKIP_REASONS",
    "ShardLoader",
    "eval_loader",
    "plan_slot",
    "read_manifest",
    "register_gopen",
    "tar_members",
    "train_loader",
    "train_steps",
]

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "not_image",  # an image member that is not an image format
    "truncated",  # an image whose data ends early or is corrupt
    "too_large",  # refused by Pillow's decompression-bomb guard
    "no_label",  # an image without its .json
    "no_image",  # a .json without its image
    "bad_label",  # a .json that is not a label object with "age"
    "bad_shard",  # a shard that cannot be opened/read or ends before its manifest count
)
_PRELOAD = ["torch", "torchvision.transforms", "ageray.data.stream"]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
Sampler = Literal["instance", "class", "age_aware"]


# --------------------------------------------------------------------------------------
# Manifest and URLs
# --------------------------------------------------------------------------------------


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset gopen handler for ``s3://`` through our retrying storage reader."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 gopen handler only reads (mode {mode!r})")
    return storage.open_read(url, retries=int(kw.get("retries", 5)))


def register_gopen() -> None:
    """Make ``webdataset.gopen`` (and so ``wds.WebDataset("s3://...")``) use our S3 reader.
    Called on import and again in every DataLoader worker (spawned workers re-import)."""
    wds.gopen_schemes["s3"] = _gopen_s3


register_gopen()


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


def _split_of(manifest: Mapping[str, Any], split: str, shards_url: str) -> dict[str, Any]:
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


def plan_slot(num_shards: int, slot: int, num_slots: int) -> tuple[list[int], int | None]:
    """Shards read by reader slot ``slot`` of ``num_slots``, and the sample modulo.

    ``(shards, None)``: shard-level split (``num_shards >= num_slots``).
    ``(all shards, slot)``: sample-level split; keep samples with ``i % num_slots == slot``.
    Every sample belongs to exactly one slot either way.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} is outside 0..{num_slots - 1}")
    if num_shards >= num_slots:
        return list(range(slot, num_shards, num_slots)), None
    return list(range(num_shards)), slot


def train_steps(count: int, world_size: int, batch_size: int, steps_per_epoch: int | None) -> int:
    """Steps per epoch, identical on every rank: ``steps_per_epoch`` when set, else
    ``max(1, count // (world_size * batch_size))``."""
    if steps_per_epoch:
        return int(steps_per_epoch)
    return max(1, count // (world_size * batch_size))


def _seed(*parts: Any) -> int:
    return int(stable_unit(0, ":".join(str(p) for p in parts)) * 2**63)


# --------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------


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


class _Item(NamedTuple):
    key: str
    image: bytes
    age: float
    age_std: float
    gender: int
    race: int
    identity: int


def shard_source(
    urls: list[str],
    indices: list[int],
    *,
    repeat: bool = False,
    rng: random.Random | None = None,
    first_order: list[int] | None = None,
) -> Iterator[Any]:
    """``{"url", "index"}`` per shard; with ``repeat``, forever, each pass reshuffled by
    ``rng`` and followed by :data:`PASS_END`. ``first_order`` fixes the first pass's order."""
    first = True
    while True:
        order = list(indices)
        if first and first_order is not None:
            order = list(first_order)
        elif rng is not None:
            rng.shuffle(order)
        first = False
        for i in order:
            yield {"url": urls[i], "index": i}
        if not repeat:
            return
        yield PASS_END


def open_shards(
    src: Iterable[Any], *, counter: SkipCounter, owner: Callable[[int], bool], retries: int = 5
) -> Iterator[Any]:
    """Open each shard; an unopenable one is counted, not fatal. URLs with a scheme go
    through ``webdataset.gopen`` (``s3://`` is our retrying reader, see :func:`register_gopen`);
    local paths through ``storage.open_read`` with a 1 MiB buffer."""
    for shard in src:
        if shard is PASS_END:
            yield shard
            continue
        url = shard["url"]
        try:
            if "://" in url:
                stream = wds.gopen(url, "rb", retries=retries)
            else:
                stream = storage.open_read(url)
        except OSError as exc:
            if owner(shard["index"]):
                counter.add("bad_shard")
                log.warning("skipping unreadable shard %s: %s", url, exc)
            continue
        yield {**shard, "stream": stream}


_ZERO_BLOCK = bytes(512)


def _tar_number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, read sequentially.

    A minimal reader instead of ``tarfile``: parsing a header with ``tarfile`` costs ~30 us
    in Python, more than 10% of decoding a face image, and the stream does it twice per
    sample. Handles ustar/GNU/PAX names (``x`` and ``L`` headers), base-256 sizes and gzip
    compressed shards; checks every header's checksum. Raises ``tarfile.ReadError`` on a
    corrupt header and ``EOFError`` when the data ends early, so the caller can count the
    shard as bad.
    """
    if hasattr(stream, "peek") and stream.peek(2)[:2] == b"\x1f\x8b":
        import gzip

        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    read = stream.read
    long_name: str | None = None
    first = True
    while True:
        header = read(512)
        if not header and first:
            raise tarfile.ReadError("empty file")
        if len(header) < 512:
            raise EOFError(f"tar ends inside a header ({len(header)} of 512 bytes)")
        first = False
        if header == _ZERO_BLOCK:
            return
        try:
            stored = _tar_number(header[148:156])
            size = _tar_number(header[124:136])
        except ValueError as exc:
            raise tarfile.ReadError(f"invalid tar header (corrupt shard): {exc}") from exc
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise tarfile.ReadError("tar header checksum mismatch (corrupt shard)")
        kind = header[156:157]
        padded = (size + 511) & ~511
        data = read(padded)
        if len(data) < padded:
            raise EOFError(f"tar member data ends early ({len(data)} of {padded} bytes)")
        if padded != size:
            data = data[:size]
        if kind in (b"x", b"L"):
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode()
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global pax headers...
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8") + "/" + name
        yield name, data


def tar_samples(
    src: Iterable[Any],
    *,
    counter: SkipCounter,
    owner: Callable[[int], bool],
    expected: Mapping[int, int] | None = None,
) -> Iterator[Any]:
    """Open streams -> samples ``{"__key__", "__url__", "<ext>": bytes...}``.

    Members are grouped by key as webdataset does (name up to the first dot). A tar error
    (corrupt or truncated shard, dropped connection beyond the retries) counts one
    ``bad_shard``, discards the sample being assembled and moves to the next shard; so does
    a shard that ends cleanly but with fewer samples than the manifest says.
    """
    for shard in src:
        if shard is PASS_END:
            yield shard
            continue
        url, index, stream = shard["url"], shard["index"], shard["stream"]
        group: dict[str, Any] | None = None
        n = 0
        failed = False
        try:
            for name, data in tar_members(stream):
                key, ext = base_plus_ext(name)
                if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                    continue
                if group is None or group["__key__"] != key:
                    if group is not None:
                        n += 1
                        yield group
                    group = {"__key__": key, "__url__": url}
                group[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as exc:
            failed = True
            group = None
            if owner(index):
                counter.add("bad_shard")
                log.warning("skipping the rest of shard %s: %s", url, exc)
        finally:
            stream.close()
        if group is not None:
            n += 1
            yield group
        want = (expected or {}).get(index)
        if not failed and want is not None and n < want and owner(index):
            counter.add("bad_shard")
            log.warning("shard %s ended after %d of %d samples", url, n, want)


def select_modulo(src: Iterable[Any], *, slot: int, num_slots: int) -> Iterator[Any]:
    """Sample-level split: keep sample ``i`` (counted from each pass start) when
    ``i % num_slots == slot``. Every slot reads the same shards in the same order."""
    i = 0
    for sample in src:
        if sample is PASS_END:
            i = 0
            yield sample
            continue
        if i % num_slots == slot:
            yield sample
        i += 1


def _int_or_missing(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"not an integer label: {value!r}")
    return int(value)


def _float_or_nan(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def parse_labels(src: Iterable[Any], *, counter: SkipCounter) -> Iterator[Any]:
    """Raw samples -> :class:`_Item` (image bytes + typed labels); counts ``no_label``,
    ``no_image`` and ``bad_label``."""
    for sample in src:
        if sample is PASS_END:
            yield sample
            continue
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        raw = sample.get("json")
        if image is None:
            counter.add("no_image")
            continue
        if raw is None:
            counter.add("no_label")
            continue
        try:
            labels = json.loads(raw)
            if not isinstance(labels, dict) or "age" not in labels:
                raise ValueError("label json must be an object with an 'age' field")
            item = _Item(
                key=sample["__key__"],
                image=image,
                age=_float_or_nan(labels.get("age")),
                age_std=_float_or_nan(labels.get("age_std")),
                gender=_int_or_missing(labels.get("gender")),
                race=_int_or_missing(labels.get("race")),
                identity=_int_or_missing(labels.get("identity")),
            )
        except (ValueError, UnicodeDecodeError) as exc:
            counter.add("bad_label")
            log.debug("bad label json in %s: %s", sample["__key__"], exc)
            continue
        yield item


def stop_on_empty_pass(src: Iterable[Any], *, what: str = "") -> Iterator[Any]:
    """Pass everything through, but end the stream when a whole pass (between two
    :data:`PASS_END` markers) had no sample: repeating it would spin forever."""
    n = 0
    for sample in src:
        if sample is PASS_END:
            if n == 0:
                log.error("%s: a whole pass over the shards gave no usable sample", what)
                return
            n = 0
        else:
            n += 1
        yield sample


def prepared(
    src: Iterable[Any], prepare: Callable[[Any], Any], *, max_failures: int = 10_000
) -> Iterator[Any]:
    """``prepare`` each item, dropping the ones it rejects (None) and pass markers. Ends the
    stream after ``max_failures`` rejections in a row (a stream of only corrupt images)."""
    fails = 0
    for item in src:
        if item is PASS_END:
            continue
        out = prepare(item)
        if out is None:
            fails += 1
            if fails >= max_failures:
                log.error("%d images in a row failed to decode; stopping this stream", fails)
                return
            continue
        fails = 0
        yield out


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated directly in shared memory
    (as ``default_collate`` does) so sending it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class _BufferRing:
    """uint8 batch buffers (shared memory in a worker) that are reused once the main process
    has normalised the batch they carried.

    Why: the first write to a fresh shared-memory page costs a page fault in the worker and
    another in the main process (tmpfs has no huge pages), about a third of all inter-process
    cost at 112 px. The main process never hands these buffers to the caller (it normalises
    into a new float tensor at once, see :func:`_finish_batch`) and then records how many
    batches of each worker it has finished in ``released``, a shared int64 tensor. Buffer
    ``seq % size`` is reused for batch ``seq`` only when batch ``seq - size`` is released;
    otherwise (after a short wait) a fresh buffer is taken, so nothing ever blocks.
    ``released=None``: single process, where the caller finishes each batch before the next
    one is made.
    """

    def __init__(self, released: torch.Tensor | None, worker: int, size: int) -> None:
        self.released = released
        self.worker = worker
        self.size = max(1, size)
        self.slots: list[torch.Tensor | None] = [None] * self.size
        self.seq = 0
        self.reused = 0

    def get(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        seq = self.seq
        self.seq += 1
        slot = seq % self.size
        buf = self.slots[slot]
        if buf is not None and tuple(buf.shape) == shape and self._released(seq - self.size):
            self.reused += 1
            return buf, seq
        buf = _new_batch(shape, torch.uint8)
        self.slots[slot] = buf
        return buf, seq

    def _released(self, seq: int, wait: float = 0.02) -> bool:
        if self.released is None:
            return True
        deadline = time.monotonic() + wait
        while int(self.released[self.worker]) <= seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True


def _collate(
    items: list[tuple[Any, _Item]],
    finisher: Any,
    skipped: dict[str, int],
    ring: _BufferRing | None = None,
) -> dict[str, Any]:
    """Worker-side batch.

    With a ``finisher`` (the transform's final ToNormalizedTensor) the augmented images go
    into one uint8 (B, 3, H, W) tensor in shared memory, row by row, and the main process
    normalises the whole batch (:func:`_finish_batch`): the same operations as the per-image
    transform with identical output, but 4x fewer bytes through shared memory (whose page
    faults cost ~100 us per 112 px float image on Linux tmpfs) and one vectorised pass.
    Labels stay Python lists (one small pickle instead of a shared-memory segment per label
    tensor) and become tensors in the main process.
    """
    first = items[0][0]
    buffer: tuple[int, int] | None = None
    if finisher is not None:
        w, h = first.size
        shape = (len(items), 3, h, w)
        if ring is not None:
            images, seq = ring.get(shape)
            buffer = (ring.worker, seq)
        else:
            images = _new_batch(shape, torch.uint8)
        for row, (img, _) in zip(images, items):
            finisher.to_uint8(img, out=row)
        key = "image_u8"
    else:
        images = _new_batch((len(items), *first.shape), first.dtype)
        torch.stack([t for t, _ in items], out=images)
        key = "image"
    labels = [it for _, it in items]
    return {
        key: images,
        "labels": [tuple(getattr(it, f) for it in labels) for f in _LABELS],
        "key": [it.key for it in labels],
        "__skipped__": skipped,
        "__buffer__": buffer,
    }


_LABELS = ("age", "age_std", "gender", "race", "identity")
_LABEL_DTYPES = (torch.float32, torch.float32, torch.int64, torch.int64, torch.int64)


def _finish_batch(
    item: dict[str, Any], normalizer: ToNormalizedTensor, device: torch.device | None
) -> dict[str, Any]:
    """Main-process side of :func:`_collate`: uint8 images -> normalised float32 (on
    ``device`` when given: move 1 byte per pixel, normalise there), label lists -> tensors.
    Returns the batch format of docs/design.md."""
    out: dict[str, Any] = {}
    if "image_u8" in item:
        x = item["image_u8"]
        if device is not None:
            x = x.to(device, non_blocking=True)
        out["image"] = normalizer.normalize_uint8(x)
    else:
        out["image"] = item["image"] if device is None else item["image"].to(device)
    for name, dtype, values in zip(_LABELS, _LABEL_DTYPES, item["labels"]):
        t = torch.tensor(values, dtype=dtype)
        out[name] = t if device is None else t.to(device, non_blocking=True)
    out["key"] = item["key"]
    return out


def _no_convert(item: Any) -> Any:
    """DataLoader collate_fn for ready-made batches (skips ``default_convert``'s walk)."""
    return item


def batched(
    src: Iterable[tuple[Any, _Item]],
    *,
    batch_size: int,
    partial: bool,
    counter: SkipCounter,
    finisher: Any = None,
    ring: _BufferRing | None = None,
) -> Iterator[dict[str, Any]]:
    """Group prepared samples into batches, each carrying the skip counts made since the
    previous batch. Samples are (PIL image, item) when ``finisher`` turns images into
    tensor rows, else (tensor, item)."""
    buf: list[tuple[Any, _Item]] = []
    for item in src:
        buf.append(item)
        if len(buf) == batch_size:
            yield _collate(buf, finisher, counter.take(), ring)
            buf = []
    if buf and partial:
        yield _collate(buf, finisher, counter.take(), ring)


# --------------------------------------------------------------------------------------
# The per-worker dataset
# --------------------------------------------------------------------------------------


@dataclass
class _StreamSpec:
    """Everything a DataLoader worker needs; small and picklable (spawn/forkserver)."""

    cfg: Any  # DataConfig
    split: str
    urls: list[str]
    counts: list[int]
    mode: Literal["train", "eval"]
    sampler: Sampler = "instance"
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    epoch: int = 0
    seed: int = 0
    batch_size: int = 32
    classes: list[int] = field(default_factory=list)
    shard_classes: list[list[int]] = field(default_factory=list)
    per_class: int = 16
    max_pending: int = 4096
    num_classes: int = 101
    # AWS_* settings of the process that built the loader. forkserver workers are forked
    # from a server started earlier and would otherwise see that server's environment (an
    # endpoint or profile set later would be silently ignored). Never printed.
    aws_env: dict[str, str] = field(default_factory=dict, repr=False)


def _aws_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


class ShardStream(torch.utils.data.IterableDataset):
    """The stream of one rank; each DataLoader worker iterates its own slot of it."""

    def __init__(self, spec: _StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        # set by ShardLoader before each iteration: batches finished per worker (shared)
        self.released: torch.Tensor | None = None
        self.ring_size = 4

    def __iter__(self) -> Iterator[dict[str, Any]]:
        register_gopen()
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        if info is not None:
            os.environ.update(spec.aws_env)
        worker = info.id if info is not None else 0
        num_workers = max(1, spec.num_workers)
        slot = spec.rank * num_workers + worker
        num_slots = spec.world_size * num_workers
        counter = SkipCounter()
        if info is not None and spec.mode == "train":
            # augmentation randomness per (seed, epoch, rank, worker); only in worker
            # processes: with num_workers=0 we must not reseed the trainer's own RNG
            torch.manual_seed(_seed("torch", spec.seed, spec.epoch, spec.rank, worker))
        ring = _BufferRing(self.released if info is not None else None, worker, self.ring_size)
        pipeline = self._pipeline(slot, num_slots, counter, ring)
        yield from pipeline
        rest = counter.take()
        if rest:
            yield {"__skipped__": rest}

    def _pipeline(
        self, slot: int, num_slots: int, counter: SkipCounter, ring: _BufferRing | None = None
    ) -> Iterator[Any]:
        spec, cfg = self.spec, self.spec.cfg
        n = len(spec.urls)
        balanced = spec.mode == "train" and spec.sampler in ("class", "age_aware")
        epoch_rng = random.Random(_seed("epoch", spec.seed, spec.epoch))
        slot_rng = random.Random(_seed("slot", spec.seed, spec.epoch, slot))
        expected = dict(enumerate(spec.counts))
        source_kw: dict[str, Any]
        modulo: int | None
        if balanced:
            indices = list(range(n))
            owner = functools.partial(_owner, slot, num_slots)  # count each bad shard once
            source_kw = {
                "repeat": True,
                "rng": slot_rng,
                "first_order": _cover_order(spec.shard_classes, slot_rng),
            }
            modulo = None
        else:
            order = list(range(n))
            if spec.mode == "train":
                epoch_rng.shuffle(order)  # the shard -> slot split changes every epoch
            positions, modulo = plan_slot(n, slot, num_slots)
            indices = [order[p] for p in positions]
            if modulo is None:
                owner = _owner_all
                source_kw = {"repeat": spec.mode == "train", "rng": slot_rng}
            else:  # all slots must read the same order: a shared per-epoch rng
                owner = functools.partial(_owner, slot, num_slots)
                source_kw = {"repeat": spec.mode == "train", "rng": epoch_rng}
        if spec.mode == "train":
            transform = build_train_transform(cfg)
            draft = train_draft_size(cfg)
        else:
            transform = build_eval_transform(cfg)
            draft = cfg.image_size
        # image ops per sample; the final to-tensor/normalise step writes into the batch
        transform, finisher = split_finisher(transform)

        def prepare(item: _Item) -> tuple[Any, _Item] | None:
            try:
                img = decode_image(item.image, target_size=draft, name=item.key)
            except CorruptImageError as exc:
                counter.add(exc.reason)
                log.debug("%s", exc)
                return None
            return transform(img), item

        stages: list[Any] = [
            functools.partial(shard_source, spec.urls, indices, **source_kw),
            functools.partial(
                open_shards, counter=counter, owner=owner, retries=int(cfg.s3_retries)
            ),
            functools.partial(tar_samples, counter=counter, owner=owner, expected=expected),
        ]
        if modulo is not None:
            stages.append(functools.partial(select_modulo, slot=modulo, num_slots=num_slots))
        stages.append(functools.partial(parse_labels, counter=counter))
        what = f"split {spec.split!r} rank {spec.rank} slot {slot}"
        if spec.mode == "train":
            stages.append(functools.partial(stop_on_empty_pass, what=what))
        if balanced:
            stages.append(
                functools.partial(
                    balanced_stream,
                    class_of=functools.partial(_item_class, num_classes=spec.num_classes),
                    prepare=prepare,
                    classes=spec.classes or None,
                    mode=spec.sampler,
                    per_class=spec.per_class,
                    max_pending=spec.max_pending,
                    rng=slot_rng,
                )
            )
        else:
            if spec.mode == "train":
                buf = int(cfg.shuffle_buffer)
                stages.append(
                    functools.partial(
                        shuffled, bufsize=buf, rng=slot_rng, initial=max(1, min(buf, 100))
                    )
                )
            stages.append(functools.partial(prepared, prepare=prepare))
        stages.append(
            functools.partial(
                batched,
                batch_size=spec.batch_size,
                partial=spec.mode == "eval",
                counter=counter,
                finisher=finisher,
                ring=ring,
            )
        )
        return iter(wds.DataPipeline(*stages))


def _owner(slot: int, num_slots: int, index: int) -> bool:
    return index % num_slots == slot


def _owner_all(index: int) -> bool:
    return True


def _item_class(item: _Item, num_classes: int) -> int | None:
    return age_class(None if math.isnan(item.age) else item.age, num_classes)


def _cover_order(shard_classes: list[list[int]], rng: random.Random) -> list[int] | None:
    """A shard order whose first shards cover every age class (greedy set cover on the
    manifest's per-shard histograms), so a balanced stream finds every class early."""
    if not shard_classes:
        return None
    remaining = list(range(len(shard_classes)))
    rng.shuffle(remaining)
    uncovered = set().union(*map(set, shard_classes))
    order: list[int] = []
    while uncovered and remaining:
        best = max(remaining, key=lambda i: len(uncovered.intersection(shard_classes[i])))
        if not uncovered.intersection(shard_classes[best]):
            break
        order.append(best)
        remaining.remove(best)
        uncovered -= set(shard_classes[best])
    return order + remaining


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------


class ShardLoader:
    """Iterable of batch dicts for one rank; a new iteration starts a new DataLoader.

    ``steps`` (training): the exact number of batches each iteration yields, identical on
    every rank. ``len(loader)``: ``steps`` for training, the expected number of batches for
    evaluation. ``skipped``: cumulative skip counts by reason, over all iterations.
    """

    def __init__(
        self,
        dataset: ShardStream,
        *,
        steps: int | None,
        num_batches: int,
        num_samples: int,
        multiprocessing_context: str | None = "forkserver",
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        device: str | torch.device | None = None,
    ) -> None:
        self.dataset = dataset
        self.spec = dataset.spec
        self.normalizer = ToNormalizedTensor(self.spec.cfg.normalize)
        self.device = torch.device(device) if device is not None else None
        self.steps = steps
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.multiprocessing_context = multiprocessing_context
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        # every reason present (0 until it happens), as in docs/design.md
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.worker_pids: list[int] = []  # of the current iteration (benchmarks read CPU time)

    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.num_batches

    def _dataloader(self) -> torch.utils.data.DataLoader:
        nw = self.spec.num_workers
        kw: dict[str, Any] = {}
        if nw > 0:
            ctx = multiprocessing.get_context(self.multiprocessing_context)
            if self.multiprocessing_context == "forkserver":
                # workers fork from a server that already imported torch and this module:
                # starting a worker then costs milliseconds instead of seconds
                ctx.set_forkserver_preload(_PRELOAD)
            kw.update(
                multiprocessing_context=ctx,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=_no_convert,
            num_workers=nw,
            pin_memory=self.pin_memory,
            **kw,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = self.spec.num_workers
        released = torch.zeros(max(1, nw), dtype=torch.int64).share_memory_()
        self.dataset.released = released
        self.dataset.ring_size = self.prefetch_factor * max(1, nw) + 2
        # keep each worker's last buffers mapped here, so a reused buffer arrives as a
        # cache hit (no new mmap, no page faults) in torch's shared-storage cache
        mapped: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=self.dataset.ring_size)
        )
        it = iter(self._dataloader())
        self.worker_pids = [w.pid for w in getattr(it, "_workers", [])]
        produced = 0
        try:
            for item in it:
                for reason, n in (item.pop("__skipped__", None) or {}).items():
                    self.skipped[reason] = self.skipped.get(reason, 0) + n
                if "key" not in item:
                    continue  # a counts-only item from a worker that had nothing left
                batch = _finish_batch(item, self.normalizer, self.device)
                if item.get("__buffer__") is not None and nw > 0:
                    worker, seq = item["__buffer__"]
                    mapped[worker].append(item["image_u8"])
                    released[worker] = seq + 1  # the worker may now reuse that buffer
                yield batch
                produced += 1
                if self.steps is not None and produced >= self.steps:
                    return
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self.steps is not None and produced < self.steps:
            raise RuntimeError(
                f"split {self.spec.split!r} (rank {self.spec.rank}) ran dry after {produced} of "
                f"{self.steps} steps: no readable samples left (skipped so far: "
                f"{ {k: v for k, v in self.skipped.items() if v} }); check the shards under "
                f"{self.spec.cfg.shards} or re-create them with jobs.make_shards"
            )


def _common(
    cfg: Any, split: str, rank: int, world_size: int
) -> tuple[dict[str, Any], list[str], list[int]]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    manifest = read_manifest(cfg.shards)
    info = _split_of(manifest, split, cfg.shards)
    urls = [storage.join(cfg.shards, s["name"]) for s in info["shards"]]
    counts = [int(s["count"]) for s in info["shards"]]
    return info, urls, counts


def train_loader(
    cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    sampler: Sampler = "instance",
    num_classes: int = 101,
    per_class: int = 16,
    max_pending: int = 4096,
    multiprocessing_context: str | None = "forkserver",
    pin_memory: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The training stream of ``split`` for one rank (``cfg`` is a ``DataConfig``).

    ``sampler``: ``instance`` (shuffle buffer of ``cfg.shuffle_buffer``), ``class``
    (LAE/GLAE stage 2) or ``age_aware`` (Xing et al.); see ``ageray.data.samplers``.
    Extra knobs not (yet) in DataConfig: ``num_classes`` (age classes 0..K-1 for balancing),
    ``per_class`` / ``max_pending`` (balanced buffers), ``multiprocessing_context`` for the
    DataLoader workers (forkserver or spawn: fork is unsafe inside Ray workers), ``device``
    (e.g. ``"cuda"``: batches arrive there, images moved as uint8 with pinned memory and
    normalised on the device; default: CPU tensors).
    """
    if sampler not in ("instance", "class", "age_aware"):
        raise ValueError(f"sampler={sampler!r} must be one of instance, class, age_aware")
    info, urls, counts = _common(cfg, split, rank, world_size)
    classes: list[int] = []
    shard_classes: list[list[int]] = []
    if sampler != "instance":
        classes = sorted({age_class(int(k), num_classes) for k in info.get("age_hist", {})})
        if not classes:
            raise ValueError(
                f"sampler={sampler} balances age classes, but split {split!r} under "
                f"{cfg.shards} has no ages (its manifest age_hist is empty); use "
                "sampler=instance"
            )
        shard_classes = [
            sorted({age_class(int(k), num_classes) for k in s.get("age_hist", {})})
            for s in info["shards"]
        ]
    steps = train_steps(int(info["count"]), world_size, cfg.batch_size, cfg.steps_per_epoch)
    spec = _StreamSpec(
        cfg=cfg,
        split=split,
        urls=urls,
        counts=counts,
        mode="train",
        sampler=sampler,
        rank=rank,
        world_size=world_size,
        num_workers=int(cfg.num_workers),
        epoch=epoch,
        seed=seed,
        batch_size=int(cfg.batch_size),
        classes=classes,
        shard_classes=shard_classes,
        per_class=per_class,
        max_pending=max_pending,
        num_classes=num_classes,
        aws_env=_aws_env(),
    )
    return ShardLoader(
        ShardStream(spec),
        steps=steps,
        num_batches=steps,
        num_samples=steps * cfg.batch_size,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        device=device,
    )


def eval_loader(
    cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    multiprocessing_context: str | None = "forkserver",
    pin_memory: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The evaluation stream of ``split`` for one rank: every sample of the split exactly
    once across all ranks and workers, in a fixed order, last batch of each worker partial.
    Batches are ``cfg.eval_batch_size``; images get ``build_eval_transform(cfg)``."""
    _, urls, counts = _common(cfg, split, rank, world_size)
    nw = max(1, int(cfg.num_workers))
    num_slots = world_size * nw
    num_samples = num_batches = 0
    total = sum(counts)
    for w in range(nw):
        shards, modulo = plan_slot(len(urls), rank * nw + w, num_slots)
        if modulo is None:
            n = sum(counts[i] for i in shards)
        else:
            n = len(range(modulo, total, num_slots))
        num_samples += n
        num_batches += -(-n // cfg.eval_batch_size)
    spec = _StreamSpec(
        cfg=cfg,
        split=split,
        urls=urls,
        counts=counts,
        mode="eval",
        rank=rank,
        world_size=world_size,
        num_workers=int(cfg.num_workers),
        batch_size=int(cfg.eval_batch_size),
        aws_env=_aws_env(),
    )
    return ShardLoader(
        ShardStream(spec),
        steps=None,
        num_batches=num_batches,
        num_samples=num_samples,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        device=device,
    )
