"""Tar shards as a stream of samples: opening URLs, shard sources, tar members, samples.

The first stages of the webdataset-style pipeline (``ageray.data.loader`` chains them)::

    shard_source -> open_shards -> tar_samples -> ...

URLs are opened with ``webdataset.gopen``, where ``s3://`` is registered to
:func:`ageray.data.storage.open_read` (ranged GETs that resume after dropped connections);
local paths with ``storage.open_read`` directly. Tar members are read by a small header
parser (:func:`tar_members`), several times cheaper than ``tarfile``. A shard that cannot be
opened or read, or that ends before its manifest count, is counted as ``bad_shard`` (see
``ageray.data.skips``) by the slot that owns it, never fatal.
"""

from __future__ import annotations

import logging
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ageray.data import storage
from ageray.data.samplers import PASS_END
from ageray.data.skips import SkipCounter

__all__ = [
    "open_shards",
    "register_gopen",
    "shard_source",
    "tar_members",
    "tar_samples",
]

log = logging.getLogger(__name__)


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
