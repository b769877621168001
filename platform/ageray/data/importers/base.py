"""What every importer shares: image checks, unique keys, input paths, file, tar and csv
sources, and :func:`emit`, which turns checked labels and bytes into a counted Record."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError

from ageray.data.csvutil import CsvTable
from ageray.data.labels import LabelError
from ageray.data.records import ImportReport, InputError, MissingInputError, Record, safe_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "KeyMaker",
    "SkipRow",
    "Verify",
    "check_image",
    "check_verify",
    "csv_rows",
    "emit",
    "emit_file",
    "find_csv",
    "images_root_of",
    "is_image_name",
    "iter_folder",
    "iter_tar",
    "list_files",
    "progress_bar",
    "read_file",
    "require",
    "require_folder",
    "stem",
    "strip_ext",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
Verify = Literal["header", "decode", "none"]
T = TypeVar("T")


class SkipRow(LabelError):
    """Raised by the name and row parsers: the row cannot be used, ``reason`` says why
    (``bad_name``, ``bad_date``, ...). A :class:`~ageray.data.labels.LabelError`, so one
    ``except LabelError`` counts both kinds."""


# --------------------------------------------------------------------------- image checks


def check_image(data: bytes, verify: Verify = "header") -> str | None:
    """Return None if ``data`` is a usable image, else the skip reason.

    ``header`` is cheap (~tens of microseconds): Pillow identifies the format and size from
    the header and ``verify()`` runs (full CRC check for PNG); JPEGs must contain the end of
    image marker near their end, which catches truncated files without decoding.
    """
    if not data:
        return "empty_file"
    if verify == "none":
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            width, height = im.size
            if verify == "decode":
                im.load()
            else:
                im.verify()
    except UnidentifiedImageError:
        return "not_image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "unreadable_image"
    if width < 1 or height < 1:
        return "unreadable_image"
    if verify == "header" and fmt == "JPEG" and b"\xff\xd9" not in data[-4096:]:
        return "truncated_image"
    return None


def check_verify(verify: str) -> None:
    if verify not in ("header", "decode", "none"):
        raise InputError(f"verify={verify!r}: use 'header' (default), 'decode' or 'none'")


# --------------------------------------------------------------------------- shared plumbing


class KeyMaker:
    """Unique, webdataset-safe keys in a deterministic order (``x``, ``x_2``, ``x_3``...)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def make(self, text: str) -> str:
        base = safe_key(text)
        key, n = base, 1
        while key in self.used:
            n += 1
            key = f"{base}_{n}"
        self.used.add(key)
        return key


def progress_bar(
    items: Iterable[T], enabled: bool, desc: str, total: int | None = None
) -> Iterable[T]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="img", mininterval=1.0)


def require(path: str | os.PathLike[str] | None, importer: str, layout: str) -> Path:
    """The input path, or a :class:`MissingInputError` that says what layout the importer
    expects."""
    if path is None:
        raise MissingInputError(f"{importer} importer needs an input path; expected {layout}")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(f"{importer} importer: {p} does not exist; expected {layout}")
    return p


def require_folder(path: str | os.PathLike[str] | None, importer: str, layout: str) -> Path:
    """:func:`require`, and the path must be a folder."""
    p = require(path, importer, layout)
    if not p.is_dir():
        raise InputError(f"{importer} importer: {p} is not a folder; expected {layout}")
    return p


def list_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively), sorted by relative posix path."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            out.append(Path(dirpath) / name)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    return out


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def stem(name: str) -> str:
    """File name without folders and without everything after the first dot
    (``25_0_1_x.jpg.chip.jpg`` -> ``25_0_1_x``): webdataset keys cannot hold dots."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]


def emit(
    report: ImportReport,
    keys: KeyMaker,
    *,
    key_text: str,
    data: bytes | None,
    source: str,
    verify: Verify,
    age: float | None,
    age_std: float | None = None,
    gender: int | None = None,
    race: int | None = None,
    identity: str | None = None,
) -> Record | None:
    """Check the bytes, make the key and the record, and count it (ok or skip)."""
    if data is None:
        report.skip("unreadable_file", source)
        return None
    reason = check_image(data, verify)
    if reason is not None:
        report.skip(reason, source)
        return None
    try:
        key = keys.make(key_text)
    except ValueError:
        report.skip("bad_name", source)
        return None
    report.ok()
    return Record(
        key=key,
        image=data,
        age=age,
        age_std=age_std,
        gender=gender,
        race=race,
        identity=identity,
        source=source,
    )


def emit_file(
    report: ImportReport,
    keys: KeyMaker,
    path: Path,
    *,
    key_text: str,
    verify: Verify,
    where: str | None = None,
    **labels: Any,
) -> Record | None:
    """:func:`emit` for the image file at ``path``. ``where`` (a csv row that names the
    file): a file that is not there is counted as ``missing_file`` first."""
    if where is not None and not path.is_file():
        report.skip("missing_file", f"{where} {path}")
        return None
    return emit(
        report, keys, key_text=key_text, data=read_file(path), source=str(path), verify=verify,
        **labels,
    )  # fmt: skip


# --------------------------------------------------------------------------- file sources

_GZIP, _BZ2, _XZ, _ZSTD = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"


def iter_tar(path: Path, progress: bool, desc: str) -> Iterator[tuple[str, bytes | None, bool]]:
    """Yield ``(member name, bytes, is_regular_file)`` from a tar without extracting to disk.

    Uncompressed tars are read by seeking, in sorted member order. Compressed tars cannot
    seek cheaply, so they are streamed once in archive order (still deterministic).
    """
    with path.open("rb") as f:
        magic = f.read(6)
    compressed = magic.startswith((_GZIP, _BZ2, _XZ, _ZSTD))
    if compressed:
        with tarfile.open(path, mode="r|*") as tf:
            for m in progress_bar(tf, progress, desc):
                if m.isdir():
                    continue
                if not m.isfile():
                    yield m.name, None, False
                    continue
                fobj = tf.extractfile(m)
                yield m.name, fobj.read() if fobj else None, True
        return
    with tarfile.open(path, mode="r:") as tf:
        members = sorted((m for m in tf.getmembers() if not m.isdir()), key=lambda m: m.name)
        for m in progress_bar(members, progress, desc, total=len(members)):
            if not m.isfile():
                yield m.name, None, False
                continue
            fobj = tf.extractfile(m)
            yield m.name, fobj.read() if fobj else None, True


def iter_folder(root: Path, progress: bool, desc: str) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` for every file under ``root``, sorted."""
    files = list_files(root)
    for p in progress_bar(files, progress, desc, total=len(files)):
        yield p.relative_to(root).as_posix(), p


# --------------------------------------------------------------------------- csv sources


def find_csv(root: Path, importer: str, preferred: str, layout: str) -> Path:
    """``root`` itself if it is a file, else ``root/preferred``, else its only csv."""
    if root.is_file():
        return root
    if (root / preferred).is_file():
        return root / preferred
    found = sorted(root.glob("*.csv"))
    if len(found) == 1:
        return found[0]
    raise MissingInputError(
        f"{importer} importer: {root} holds {len(found)} csv files and no {preferred}; "
        f"pass the csv path itself. Expected {layout}"
    )


def images_root_of(csv_path: Path, images_root: str | os.PathLike[str] | None) -> Path:
    """Where relative image paths start: the option, else ``<csv folder>/<csv stem>/`` when
    it exists (the GTA 2021 release unpacks next to its csv that way), else the csv folder."""
    if images_root is not None:
        p = Path(images_root).expanduser()
        if not p.is_dir():
            raise MissingInputError(f"images_root={str(p)!r} is not a folder")
        return p
    beside = csv_path.parent / csv_path.stem
    return beside if beside.is_dir() else csv_path.parent


def csv_rows(
    table: CsvTable, report: ImportReport, *, progress: bool, desc: str
) -> Iterator[tuple[str, list[str]]]:
    """``(where, cells)`` for every data row of ``table`` (``where`` = ``file.csv:12``, how a
    row is named in skip examples), with a progress bar. A row the csv reader cannot parse
    is counted as ``bad_row`` here and not yielded."""
    total = table.count_rows() if progress else None
    for line, row in progress_bar(table.rows(), progress, desc, total=total):
        where = table.where(line)
        if row is None:
            report.skip("bad_row", where)
            continue
        yield where, row
