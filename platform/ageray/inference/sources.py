"""What batch prediction reads: image files, tar archives of images, ageray shards and video
files -- in a local folder or under ``s3://`` -- as a list of small work items and, per item,
the images.

Why two steps: the driver lists cheaply (names only; a tar or a shard is one item, files are
grouped :data:`FILES_PER_ITEM` to an item) and Ray Data spreads the items over read tasks,
which stream the bytes through the project's storage layer
(:mod:`ageray.data.storage`: local paths and ``s3://`` with resumable reads) and tar reader
(:mod:`ageray.data.tario`). Nothing here imports Ray; the functions are tested alone.

An image's ``key`` is its path relative to the input (a file), ``<tar name>/<member>`` (a tar
archive), or the sample key (a shard: members ``<key>.jpg`` + ``<key>.json`` as written by
``jobs.make_shards``). A file or tar that cannot be read becomes one row with ``error`` set;
corrupt image bytes are found later, by the decoder, and become error rows there.

A video (:data:`~ageray.inference.video.VIDEO_EXTENSIONS`) is one item of its own and
yields one image per sampled frame (:func:`ageray.inference.video.read_frames`, ``fps``
frames a second), keyed ``<video key>#frame=<index>``, with ``frame_index`` and
``timestamp_s`` set (None for every other image): the frames go through the one inference
path like photos, and ``jobs.predict`` follows their faces across frames afterwards.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

from ageray.data import storage

from .video import DEFAULT_FPS, VIDEO_EXTENSIONS, frame_key, is_video

__all__ = [
    "FILES_PER_ITEM",
    "IMAGE_EXTENSIONS",
    "TAR_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "expected_images",
    "list_items",
    "read_item",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
FILES_PER_ITEM = 256
MANIFEST = "manifest.json"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def _relative(url: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return url[len(prefix) :] if url.startswith(prefix) else storage.basename(url)


def list_items(
    source: str,
    *,
    splits: list[str] | None = None,
    files_per_item: int = FILES_PER_ITEM,
    fps: float = DEFAULT_FPS,
) -> list[dict[str, Any]]:
    """Work items for ``source``: a folder or ``s3://`` prefix (image files, tar archives
    and/or video files, or shards with a ``manifest.json``), one tar, image or video file.

    Items are ``{"kind": "files", "urls": [...], "root": ...}``, ``{"kind": "tar", "url"}``,
    ``{"kind": "shard", "url"}`` or ``{"kind": "video", "url", "root", "fps"}`` (``fps``:
    frames sampled a second). ``splits`` limits shards to those splits (default: every split
    in the manifest). Raises FileNotFoundError naming ``source`` when there is nothing to
    predict, ValueError for an ``fps`` that is not > 0.
    """
    if not float(fps) > 0:
        raise ValueError(f"--fps {fps}: frames per second to sample must be > 0 (e.g. 2)")
    src = str(source).rstrip("/") if str(source) not in ("/", "s3://") else str(source)
    if _is_tar(src) and storage.exists(src):
        return [{"kind": "tar", "url": src}]
    if _is_image(src) and storage.exists(src):
        return [{"kind": "files", "urls": [src], "root": _parent(src)}]
    if is_video(src) and storage.exists(src):
        return [{"kind": "video", "url": src, "root": _parent(src), "fps": float(fps)}]
    manifest_url = storage.join(src, MANIFEST)
    if storage.exists(manifest_url):
        return _shard_items(src, storage.read_json(manifest_url), splits)
    urls = storage.list_files(src)
    images = [u for u in urls if _is_image(u)]
    tars = [u for u in urls if _is_tar(u)]
    videos = [u for u in urls if is_video(u)]
    if not images and not tars and not videos:
        raise FileNotFoundError(
            f"--input {source!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}), tar archives, "
            f"videos ({', '.join(VIDEO_EXTENSIONS)}) or shards (a folder with {MANIFEST}) "
            "found there; check the path"
        )
    step = max(1, int(files_per_item))
    items: list[dict[str, Any]] = [
        {"kind": "files", "urls": images[i : i + step], "root": src}
        for i in range(0, len(images), step)
    ]
    items += [{"kind": "tar", "url": u} for u in tars]
    items += [{"kind": "video", "url": u, "root": src, "fps": float(fps)} for u in videos]
    return items


def expected_images(items: list[dict[str, Any]]) -> int | None:
    """How many images the items yield (files, plus the sampled frames of local videos, read
    from their headers), for a progress bar's total; None when unknown beforehand (tar
    archives and shards are counted only as they are read; videos under ``s3://``)."""
    from .video import expected_samples, probe

    total = 0
    for item in items:
        if item["kind"] == "files":
            total += len(item["urls"])
        elif item["kind"] == "video" and not storage.is_s3(item["url"]):
            try:
                total += expected_samples(probe(item["url"]), item["fps"])
            except ValueError:  # not a readable video: its one error row
                total += 1
        else:
            return None
    return total


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _shard_items(
    root: str, manifest: dict[str, Any], splits: list[str] | None
) -> list[dict[str, Any]]:
    available = manifest.get("splits") or {}
    names = list(splits) if splits else list(available)
    unknown = [s for s in names if s not in available]
    if unknown:
        raise ValueError(
            f"--split {unknown}: the shards at {root} have splits {sorted(available)} only"
        )
    return [
        {"kind": "shard", "url": storage.join(root, shard["name"])}
        for split in names
        for shard in available[split].get("shards", [])
    ]


def _row(
    key: str,
    source: str,
    image: bytes | None,
    error: str | None = None,
    *,
    frame_index: int | None = None,
    timestamp_s: float | None = None,
) -> dict[str, Any]:
    return {
        "key": key,
        "source": source,
        "image": image,
        "error": error,
        "frame_index": frame_index,
        "timestamp_s": timestamp_s,
    }


def read_item(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The images of one work item: ``{"key", "source", "image" (bytes or None),
    "error" (None or why the bytes could not be read), "frame_index", "timestamp_s"
    (a video's sampled frames; None otherwise)}``."""
    kind = item["kind"]
    if kind == "video":
        yield from _read_video(item)
        return
    if kind == "files":
        for url in item["urls"]:
            key = _relative(url, item["root"])
            try:
                yield _row(key, url, storage.read_bytes(url))
            except OSError as exc:
                yield _row(key, url, None, f"unreadable: {exc}")
        return
    if kind not in ("tar", "shard"):
        raise ValueError(f"unknown work item kind {kind!r}")
    yield from _read_tar(item["url"], shard=kind == "shard")


def _read_tar(url: str, *, shard: bool) -> Iterator[dict[str, Any]]:
    """Stream a tar: every image member (``shard``: one image per sample key, labels
    ignored). A tar that ends early or is corrupt yields what was read, then one error row."""
    from ageray.data.tario import tar_members

    name = storage.basename(url)
    for ext in TAR_EXTENSIONS:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    try:
        with storage.open_read(url) as stream:
            for member, data in tar_members(stream):
                base = member.rsplit("/", 1)[-1]
                if base.startswith(("__", ".")) or not _is_image(member):
                    continue
                if shard:
                    key = member.split(".", 1)[0] if "/" not in member else _shard_key(member)
                else:
                    key = f"{name}/{member}"
                yield _row(key, url, data)
    except (OSError, EOFError, tarfile.TarError, ValueError, zlib.error) as exc:
        yield _row(f"{name}/", url, None, f"bad_tar: {url}: {exc}")


def _read_video(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A video's sampled frames; one error row (key: the video) when it cannot be read,
    after the frames read before a failure."""
    from .video import local_copy, read_frames

    url = item["url"]
    key = _relative(url, item["root"])
    try:
        with local_copy(url) as path:
            for frame in read_frames(path, fps=item.get("fps", DEFAULT_FPS)):
                yield _row(
                    frame_key(key, frame.index),
                    url,
                    frame.image,
                    frame_index=frame.index,
                    timestamp_s=frame.timestamp_s,
                )
    except (OSError, ValueError) as exc:
        yield _row(key, url, None, f"bad_video: {exc}")


def _shard_key(member: str) -> str:
    """webdataset's key: the member name up to the first dot of its last component."""
    folder, base = member.rsplit("/", 1)
    return f"{folder}/{base.split('.', 1)[0]}"
