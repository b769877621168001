"""Importers: turn a dataset as it lies on disk into :class:`~ageray.data.records.Record`\\ s.

Every importer has the same shape, ``iter_<name>(path, report, **options) -> Iterator[Record]``,
and is registered in :data:`IMPORTERS` so that ``jobs.make_shards`` can call
``IMPORTERS[name](input_path, report, **options)`` without per-dataset code.

Rules every importer keeps (why: a silently shrunken dataset is the hardest bug to find):

* Every unusable row or file is counted with ``report.skip(reason, example)`` — missing file,
  not an image, unreadable image, unparseable name, bad or out-of-range label. A row imported
  without some optional field goes through ``report.note_partial(reason, example)``.
  ``report.ok()`` is called once per yielded record, so ``imported + skipped`` equals the rows
  (or files) looked at.
* Images are checked cheaply before they are accepted (``verify="header"``: Pillow parses the
  header, ``verify()`` runs, and a JPEG must carry its end marker so truncated downloads are
  caught); ``verify="decode"`` decodes fully, ``verify="none"`` only requires non-empty bytes.
  The bytes are passed on untouched: re-encoding happens only if alignment changes pixels.
* Order is deterministic (sorted by relative path, or csv row order for csv-driven sets), and
  keys are made unique in that order (``name``, ``name_2``, ...), so two imports of the same
  input give identical shards.
* ``progress=True`` shows a tqdm bar over the scan.
* Ages must lie in ``[0, 120]``; gender is 0 male / 1 female; race is UTKFace's
  0 white, 1 black, 2 asian, 3 indian, 4 other.
"""

from __future__ import annotations

import io
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError

from ageray.data.csvutil import CsvTable, find_column, read_csv
from ageray.data.records import RACES, ImportReport, Record, safe_key
from ageray.data.synthetic import iter_synthetic

__all__ = [
    "AGE_MAX",
    "AGE_MIN",
    "IMAGE_EXTENSIONS",
    "IMPORTERS",
    "SkipRow",
    "check_image",
    "iter_appa_real",
    "iter_csv",
    "iter_fgnet",
    "iter_folders",
    "iter_mivia",
    "iter_morph",
    "iter_utkface",
    "parse_age",
    "parse_fgnet_name",
    "parse_gender",
    "parse_race",
    "parse_utkface_name",
]

AGE_MIN, AGE_MAX = 0.0, 120.0
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
Verify = Literal["header", "decode", "none"]
T = TypeVar("T")


class SkipRow(Exception):
    """Raised by the label parsers: the row cannot be used, ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- label parsing

_GENDER_WORDS = {
    "0": 0, "m": 0, "male": 0, "man": 0, "boy": 0,
    "1": 1, "f": 1, "female": 1, "woman": 1, "girl": 1,
}  # fmt: skip
_RACE_WORDS = {
    **{str(i): i for i in range(len(RACES))},
    **{name: i for i, name in enumerate(RACES)},
    "w": 0, "caucasian": 0, "b": 1, "african": 1, "a": 2, "i": 3,
    "h": 4, "hispanic": 4, "latino": 4, "o": 4,
}  # fmt: skip


def parse_age(text: str | float | int, *, field: str = "age") -> float:
    """A finite age in ``[AGE_MIN, AGE_MAX]``; raises :class:`SkipRow` with ``bad_<field>``
    (not a number) or ``<field>_out_of_range``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise SkipRow(f"bad_{field}") from None
    if not math.isfinite(value):
        raise SkipRow(f"bad_{field}")
    if not AGE_MIN <= value <= AGE_MAX:
        raise SkipRow(f"{field}_out_of_range")
    return value


def _int_text(text: str) -> str:
    """``"1.0"`` -> ``"1"`` so that pandas-written csvs (floats for ints) parse too."""
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else text


def parse_gender(text: str) -> int | None:
    """0 male / 1 female from ints or words (``m``, ``female``...); empty -> None;
    anything else raises :class:`SkipRow` ``bad_gender``."""
    t = text.strip().lower()
    if not t:
        return None
    g = _GENDER_WORDS.get(_int_text(t))
    if g is None:
        raise SkipRow("bad_gender")
    return g


def parse_race(text: str) -> int | None:
    """UTKFace race code from ints 0-4 or words (``white``, ``black``, ``asian``, ``indian``,
    ``other``; Morph letters B/W/A/H/O); empty -> None; else :class:`SkipRow` ``bad_race``."""
    t = text.strip().lower()
    if not t:
        return None
    r = _RACE_WORDS.get(_int_text(t))
    if r is None:
        raise SkipRow("bad_race")
    return r


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


def _check_verify(verify: str) -> None:
    if verify not in ("header", "decode", "none"):
        raise ValueError(f"verify={verify!r}: use 'header' (default), 'decode' or 'none'")


# --------------------------------------------------------------------------- shared plumbing


class _Keys:
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


def _progress(
    items: Iterable[T], enabled: bool, desc: str, total: int | None = None
) -> Iterable[T]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="img", mininterval=1.0)


def _require(path: str | os.PathLike[str] | None, importer: str, layout: str) -> Path:
    """The input path, or a FileNotFoundError that says what layout the importer expects."""
    if path is None:
        raise FileNotFoundError(f"{importer} importer needs an input path; expected {layout}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{importer} importer: {p} does not exist; expected {layout}")
    return p


def _list_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively), sorted by relative posix path."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            out.append(Path(dirpath) / name)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    return out


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _stem(name: str) -> str:
    """File name without folders and without everything after the first dot
    (``25_0_1_x.jpg.chip.jpg`` -> ``25_0_1_x``): webdataset keys cannot hold dots."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def _strip_ext(rel: str) -> str:
    return os.path.splitext(rel)[0]


def _emit(
    report: ImportReport,
    keys: _Keys,
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


# --------------------------------------------------------------------------- file sources

_GZIP, _BZ2, _XZ, _ZSTD = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"


def _iter_tar(path: Path, progress: bool, desc: str) -> Iterator[tuple[str, bytes | None, bool]]:
    """Yield ``(member name, bytes, is_regular_file)`` from a tar without extracting to disk.

    Uncompressed tars are read by seeking, in sorted member order. Compressed tars cannot
    seek cheaply, so they are streamed once in archive order (still deterministic).
    """
    with path.open("rb") as f:
        magic = f.read(6)
    compressed = magic.startswith((_GZIP, _BZ2, _XZ, _ZSTD))
    if compressed:
        with tarfile.open(path, mode="r|*") as tf:
            for m in _progress(tf, progress, desc):
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
        for m in _progress(members, progress, desc, total=len(members)):
            if not m.isfile():
                yield m.name, None, False
                continue
            fobj = tf.extractfile(m)
            yield m.name, fobj.read() if fobj else None, True


def _iter_folder(root: Path, progress: bool, desc: str) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative posix path, path)`` for every file under ``root``, sorted."""
    files = _list_files(root)
    for p in _progress(files, progress, desc, total=len(files)):
        yield p.relative_to(root).as_posix(), p


# --------------------------------------------------------------------------- UTKFace

_DIGITS = re.compile(r"^[0-9]+$")
_DATE = re.compile(r"^[0-9]{8,}")  # UTKFace's 17-digit yyyymmddHHMMSSFFF date-time field


def parse_utkface_name(name: str) -> tuple[dict[str, Any], str | None]:
    """Labels from a UTKFace file name ``age_gender_race_datetime.jpg.chip.jpg``.

    Returns ``({"age", "gender", "race"}, partial_reason_or_None)``. A name whose third field
    is the date (``61_1_20170109142408075.jpg.chip.jpg``: race left out by the dataset's
    authors) yields race None and ``"missing_race"``. Raises :class:`SkipRow` with
    ``bad_name``, ``age_out_of_range``, ``bad_gender`` or ``bad_race``.
    """
    fields = [f.strip() for f in _stem(name).split("_")]
    if len(fields) < 2 or not _DIGITS.match(fields[0]):
        raise SkipRow("bad_name")
    age = float(int(fields[0]))
    if not AGE_MIN <= age <= AGE_MAX:
        raise SkipRow("age_out_of_range")
    if fields[1] not in ("0", "1"):
        raise SkipRow("bad_gender")
    gender = int(fields[1])
    if len(fields) == 2 or _DATE.match(fields[2]):
        return {"age": age, "gender": gender, "race": None}, "missing_race"
    if not _DIGITS.match(fields[2]):
        raise SkipRow("bad_name")
    race = int(fields[2])
    if race >= len(RACES):
        raise SkipRow("bad_race")
    return {"age": age, "gender": gender, "race": race}, None


def iter_utkface(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """UTKFace (``UTKFace/``, ``crop_part1/`` or the aligned ``*.chip.jpg`` set).

    ``path`` is a folder (searched recursively) or a tar file (plain or compressed; members
    are read in memory, never extracted). Labels come from the file name
    ``age_gender_race_datetime.jpg.chip.jpg`` (gender 0 male / 1 female; race 0-4). A name
    missing the race imports with race None and is noted as ``missing_race``. UTKFace has no
    identities. Key: the name before its first dot, made safe and unique.
    """
    _check_verify(verify)
    layout = "a folder or .tar of UTKFace images named age_gender_race_datetime.jpg.chip.jpg"
    root = _require(path, "utkface", layout)
    report.source = report.source or "utkface"
    keys = _Keys()

    def handle(rel: str, data: bytes | None, source: str) -> Record | None:
        name = rel.rsplit("/", 1)[-1]
        if not _is_image_name(name):
            report.skip("not_image_file", source)
            return None
        try:
            labels, partial = parse_utkface_name(name)
        except SkipRow as e:
            report.skip(e.reason, source)
            return None
        rec = _emit(
            report, keys, key_text=_stem(name), data=data, source=source, verify=verify, **labels
        )
        if rec is not None and partial:
            report.note_partial(partial, source)
        return rec

    if root.is_dir():
        for rel, p in _iter_folder(root, progress, "utkface"):
            rec = handle(rel, _read(p), str(p))
            if rec is not None:
                yield rec
        return
    if not tarfile.is_tarfile(root):
        raise ValueError(f"utkface importer: {root} is neither a folder nor a tar file; {layout}")
    for name, data, regular in _iter_tar(root, progress, "utkface"):
        source = f"{root.name}:{name}"
        if not regular:
            report.skip("not_regular_file", source)
            continue
        rec = handle(name, data, source)
        if rec is not None:
            yield rec


# --------------------------------------------------------------------------- FG-NET

_FGNET = re.compile(r"^([0-9]+)A([0-9]+)([a-z]?)$", re.IGNORECASE)


def parse_fgnet_name(name: str) -> tuple[str, float]:
    """``001A02.JPG`` -> ``("001", 2.0)``; ``001A43a.JPG`` -> ``("001", 43.0)``.
    Raises :class:`SkipRow` ``bad_name`` / ``age_out_of_range``."""
    m = _FGNET.match(_stem(name))
    if not m:
        raise SkipRow("bad_name")
    age = float(int(m.group(2)))
    if not AGE_MIN <= age <= AGE_MAX:
        raise SkipRow("age_out_of_range")
    return m.group(1), age


def iter_fgnet(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """FG-NET: a folder (recursive) of ``<subject>A<age>[letter].JPG`` files, e.g.
    ``001A02.JPG`` (subject 001 at 2) and ``001A43a.JPG`` (a second photo at 43).

    Identity = the subject number as written (``"001"``); gender and race are not in the
    names (None). Point the importer at the ``images/`` folder: other files (the ``.pts``
    landmark files) are counted as ``not_image_file``.
    """
    _check_verify(verify)
    root = _require(path, "fgnet", "a folder of FG-NET images named like 001A02.JPG")
    if not root.is_dir():
        raise NotADirectoryError(f"fgnet importer: {root} is not a folder of 001A02.JPG images")
    report.source = report.source or "fgnet"
    keys = _Keys()
    for rel, p in _iter_folder(root, progress, "fgnet"):
        if not _is_image_name(rel):
            report.skip("not_image_file", str(p))
            continue
        try:
            identity, age = parse_fgnet_name(rel)
        except SkipRow as e:
            report.skip(e.reason, str(p))
            continue
        rec = _emit(
            report,
            keys,
            key_text=_stem(rel),
            data=_read(p),
            source=str(p),
            verify=verify,
            age=age,
            identity=identity,
        )
        if rec is not None:
            yield rec


# --------------------------------------------------------------------------- APPA-REAL

APPA_SPLITS = ("train", "valid", "test")


def iter_appa_real(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    label: Literal["real", "apparent"] = "real",
    face: bool = True,
    splits: Iterable[str] = APPA_SPLITS,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """APPA-REAL (``appa-real-release``). Expected layout::

        ROOT/
          gt_avg_train.csv  gt_avg_valid.csv  gt_avg_test.csv
          train/000000.jpg  train/000000.jpg_face.jpg  ...
          valid/...  test/...

    (a ``gt_avg_<split>.csv`` inside its split folder is accepted too). The csv columns are
    ``file_name, num_ratings, apparent_age_avg, apparent_age_std, real_age``.

    ``label="real"``: age = ``real_age`` (no std). ``label="apparent"``: age =
    ``apparent_age_avg`` and age_std = ``apparent_age_std`` (the epsilon-error needs it).
    ``face=True`` (default) reads the dataset's cropped ``<file_name>_face.jpg``; ``False``
    the full image. The official split is kept in the key (``train_000000``); Record has no
    split field, so the shard writer makes its own split.
    """
    _check_verify(verify)
    if label not in ("real", "apparent"):
        raise ValueError(f"appa-real importer: label={label!r}; use 'real' or 'apparent'")
    layout = "ROOT/gt_avg_<split>.csv and ROOT/<split>/<file_name>[_face.jpg]"
    root = _require(path, "appa-real", layout)
    if not root.is_dir():
        raise NotADirectoryError(f"appa-real importer: {root} is not a folder; expected {layout}")
    report.source = report.source or "appa-real"
    splits = [splits] if isinstance(splits, str) else list(splits)
    tables: list[tuple[str, CsvTable]] = []
    for split in splits:
        cands = [root / f"gt_avg_{split}.csv", root / split / f"gt_avg_{split}.csv"]
        csv_path = next((c for c in cands if c.is_file()), None)
        if csv_path is None:
            raise FileNotFoundError(
                f"appa-real importer: no gt_avg_{split}.csv in {root} or {root / split}; "
                f"expected {layout}, or pass splits=[...] naming only the splits you have"
            )
        tables.append((split, read_csv(csv_path, header=True)))
    keys = _Keys()
    for split, table in tables:
        c_file = find_column(table, ["file_name", "file"], option="(csv)", required=True)
        c_real = find_column(table, ["real_age"], option="(csv)", required=label == "real")
        c_app = find_column(
            table, ["apparent_age_avg"], option="(csv)", required=label == "apparent"
        )
        c_std = find_column(table, ["apparent_age_std"], option="(csv)", required=False)
        rows = list(table.rows())
        for line, row in _progress(rows, progress, f"appa-real {split}", total=len(rows)):
            where = table.where(line)
            try:
                file_name = row[c_file]
                if label == "real":
                    age, std = parse_age(row[c_real]), None
                else:
                    age = parse_age(row[c_app])
                    std = None
                    if c_std is not None and row[c_std]:
                        std = parse_age(row[c_std], field="age_std")
            except IndexError:
                report.skip("bad_row", where)
                continue
            except SkipRow as e:
                report.skip(e.reason, where)
                continue
            img = root / split / (f"{file_name}_face.jpg" if face else file_name)
            if not img.is_file():
                report.skip("missing_file", f"{where} {img}")
                continue
            rec = _emit(
                report,
                keys,
                key_text=f"{split}_{_stem(file_name)}",
                data=_read(img),
                source=str(img),
                verify=verify,
                age=age,
                age_std=std,
            )
            if rec is not None:
                if label == "apparent" and std is None:
                    report.note_partial("missing_age_std", where)
                yield rec


# --------------------------------------------------------------------------- MIVIA (GTA 2021)


def _find_csv(root: Path, importer: str, preferred: str, layout: str) -> Path:
    """``root`` itself if it is a file, else ``root/preferred``, else its only csv."""
    if root.is_file():
        return root
    if (root / preferred).is_file():
        return root / preferred
    found = sorted(root.glob("*.csv"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"{importer} importer: {root} holds {len(found)} csv files and no {preferred}; "
        f"pass the csv path itself. Expected {layout}"
    )


def _images_root(csv_path: Path, images_root: str | os.PathLike[str] | None) -> Path:
    """Where relative image paths start: the option, else ``<csv folder>/<csv stem>/`` when
    it exists (the GTA 2021 release unpacks next to its csv that way), else the csv folder."""
    if images_root is not None:
        p = Path(images_root).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"images_root={str(p)!r} is not a folder")
        return p
    beside = csv_path.parent / csv_path.stem
    return beside if beside.is_dir() else csv_path.parent


def iter_mivia(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    images_root: str | os.PathLike[str] | None = None,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """MIVIA age dataset (CAIP 2021 Guess The Age contest).

    ``path`` is ``training_caip_contest.csv`` (or a folder holding it). Rows are
    ``path,age`` without a header (a header row is recognised and ignored), e.g.
    ``n000002/0001_01.jpg,26``. Image paths are relative to ``images_root``: by default
    ``<csv folder>/training_caip_contest/`` when that folder exists, else the csv's folder.
    Identity = the first path component (``n000002``, the VGGFace2 identity).
    """
    _check_verify(verify)
    layout = "training_caip_contest.csv with rows 'n000002/0001_01.jpg,26' beside the images"
    root = _require(path, "mivia", layout)
    csv_path = _find_csv(root, "mivia", "training_caip_contest.csv", layout)
    base = _images_root(csv_path, images_root)
    table = read_csv(csv_path, numeric_column=1)
    report.source = report.source or "mivia"
    keys = _Keys()
    total = table.count_rows() if progress else None
    for line, row in _progress(table.rows(), progress, "mivia", total=total):
        where = table.where(line)
        if len(row) < 2 or not row[0]:
            report.skip("bad_row", where)
            continue
        rel = row[0].replace("\\", "/")
        try:
            age = parse_age(row[1])
        except SkipRow as e:
            report.skip(e.reason, where)
            continue
        img = base / rel
        if not img.is_file():
            report.skip("missing_file", f"{where} {img}")
            continue
        parts = rel.strip("/").split("/")
        identity = parts[0] if len(parts) > 1 else None
        rec = _emit(
            report,
            keys,
            key_text=_strip_ext(rel),
            data=_read(img),
            source=str(img),
            verify=verify,
            age=age,
            identity=identity,
        )
        if rec is not None:
            if identity is None:
                report.note_partial("missing_identity", where)
            yield rec


# --------------------------------------------------------------------------- Morph II

_DATE_FORMATS = ("%m/%d/%Y", "%Y-%m-%d", "%m/%d/%y", "%d.%m.%Y", "%Y%m%d")


def _parse_date(text: str) -> date:
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    raise SkipRow("bad_date")


def _years_between(dob: date, doa: date) -> float:
    """Whole years of age at ``doa`` (birthday not reached yet: one less)."""
    years = doa.year - dob.year - ((doa.month, doa.day) < (dob.month, dob.day))
    return float(years)


def iter_morph(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    images_root: str | os.PathLike[str] | None = None,
    path_col: str | None = None,
    path_template: str | None = None,
    id_col: str | None = None,
    age_col: str | None = None,
    gender_col: str | None = None,
    race_col: str | None = None,
    dob_col: str | None = None,
    doa_col: str | None = None,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """Morph II from its metadata csv (header row required).

    Columns are found by name (case- and punctuation-insensitive); override with the
    ``*_col`` options. Defaults: path ``photo|file|filename|file_name|path|image``, identity
    ``id_num|id|subject_id``, ``age``, ``gender|sex``, ``race|ethnicity``, ``dob``, ``doa``.
    Without a path column give ``path_template``, formatted with the row's columns, e.g.
    ``"Album2/{id_num:0>6}_{picture_num}{gender}{age}.JPG"``. Paths are relative to
    ``images_root`` (default: the csv's folder) or absolute.

    Labels: age from the age column, else whole years between ``dob`` and ``doa``. Race
    letters map to our codes (W->0 white, B->1 black, A->2 asian, H/O->4 other; words and
    ints work too); gender M/F -> 0/1. Identity = ``id_num``.
    """
    _check_verify(verify)
    layout = "a Morph II csv with a header (id_num, photo/file, dob, doa, race, gender, age)"
    root = _require(path, "morph", layout)
    csv_path = _find_csv(root, "morph", "morph.csv", layout)
    base = _images_root(csv_path, images_root) if images_root else csv_path.parent
    table = read_csv(csv_path, header=True)

    def col(opt: str, value: str | None, cands: list[str], required: bool) -> int | None:
        return find_column(table, [value] if value else cands, option=opt, required=required)

    c_path = col(
        "path_col",
        path_col,
        ["photo", "file", "filename", "file_name", "path", "image"],
        required=path_template is None,
    )
    c_id = col("id_col", id_col, ["id_num", "id", "subject_id", "subject"], required=False)
    c_age = col("age_col", age_col, ["age"], required=False)
    c_gender = col("gender_col", gender_col, ["gender", "sex"], required=False)
    c_race = col("race_col", race_col, ["race", "ethnicity"], required=False)
    c_dob = col("dob_col", dob_col, ["dob"], required=False)
    c_doa = col("doa_col", doa_col, ["doa"], required=False)
    if c_age is None and (c_dob is None or c_doa is None):
        raise ValueError(
            f"morph importer: {csv_path} has neither an age column nor dob+doa columns "
            f"(header: {table.header}); pass age_col= or dob_col=/doa_col="
        )
    header = table.header or []
    report.source = report.source or "morph"
    keys = _Keys()
    total = table.count_rows() if progress else None
    for line, row in _progress(table.rows(), progress, "morph", total=total):
        where = table.where(line)
        if len(row) < len(header):
            report.skip("bad_row", where)
            continue
        try:
            if c_path is not None:
                rel = row[c_path]
            else:
                assert path_template is not None
                rel = path_template.format(**dict(zip(header, row)))
            if c_age is not None and row[c_age]:
                age = parse_age(row[c_age])
            elif c_dob is not None and c_doa is not None:
                age = parse_age(_years_between(_parse_date(row[c_dob]), _parse_date(row[c_doa])))
            else:
                raise SkipRow("bad_age")
            gender = parse_gender(row[c_gender]) if c_gender is not None else None
            race = parse_race(row[c_race]) if c_race is not None else None
        except SkipRow as e:
            report.skip(e.reason, where)
            continue
        except (KeyError, IndexError, ValueError):
            report.skip("bad_path_template", where)
            continue
        if not rel:
            report.skip("bad_row", where)
            continue
        identity = (row[c_id] or None) if c_id is not None else None
        img = base / rel.replace("\\", "/")
        if not img.is_file():
            report.skip("missing_file", f"{where} {img}")
            continue
        rec = _emit(
            report,
            keys,
            key_text=_strip_ext(rel.replace("\\", "/")),
            data=_read(img),
            source=str(img),
            verify=verify,
            age=age,
            gender=gender,
            race=race,
            identity=identity,
        )
        if rec is not None:
            for name, c, v in (("gender", c_gender, gender), ("race", c_race, race)):
                if c is not None and v is None:
                    report.note_partial(f"missing_{name}", where)
            yield rec


# --------------------------------------------------------------------------- identity folders


def iter_folders(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """Identity folders (CASIA-WebFace style): ``ROOT/<identity>/<image>.jpg``.

    Identity = the folder name directly under ``ROOT`` (images may sit deeper inside it).
    Age is None: this source feeds identity pretraining (LAE's AM-softmax stage), which needs
    identities, not ages — it is the only importer that yields records without an age.
    Files directly in ``ROOT`` are counted as ``no_identity_folder``.
    """
    _check_verify(verify)
    layout = "ROOT/<identity>/<image>.jpg (one folder per person)"
    root = _require(path, "folders", layout)
    if not root.is_dir():
        raise NotADirectoryError(f"folders importer: {root} is not a folder; expected {layout}")
    report.source = report.source or "folders"
    keys = _Keys()
    for rel, p in _iter_folder(root, progress, "folders"):
        if not _is_image_name(rel):
            report.skip("not_image_file", str(p))
            continue
        if "/" not in rel:
            report.skip("no_identity_folder", str(p))
            continue
        identity = rel.split("/", 1)[0]
        rec = _emit(
            report,
            keys,
            key_text=_strip_ext(rel),
            data=_read(p),
            source=str(p),
            verify=verify,
            age=None,
            identity=identity,
        )
        if rec is not None:
            yield rec


# --------------------------------------------------------------------------- generic csv


def iter_csv(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    images_root: str | os.PathLike[str] | None = None,
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """A generic labelled csv with a header row.

    Required columns: ``path``, ``age``. Optional: ``age_std``, ``gender`` (0/1 or
    male/female/m/f), ``race`` (0-4 or white/black/asian/indian/other), ``identity``.
    Paths are relative to ``images_root`` (default: the csv's folder) or absolute. An empty
    optional cell imports as None and is noted as partial (``missing_<column>``).
    """
    _check_verify(verify)
    layout = "a csv with a header: path,age[,age_std,gender,race,identity]"
    csv_path = _require(path, "csv", layout)
    if not csv_path.is_file():
        raise IsADirectoryError(f"csv importer: {csv_path} is a folder; pass the csv file itself")
    base = Path(images_root).expanduser() if images_root is not None else csv_path.parent
    table = read_csv(csv_path, header=True)
    c_path = find_column(table, ["path"], option="(rename the column)", required=True)
    c_age = find_column(table, ["age"], option="(rename the column)", required=True)
    optional = {
        name: find_column(table, [name], option="(csv)", required=False)
        for name in ("age_std", "gender", "race", "identity")
    }
    report.source = report.source or "csv"
    keys = _Keys()
    total = table.count_rows() if progress else None
    for line, row in _progress(table.rows(), progress, "csv", total=total):
        where = table.where(line)
        try:
            rel = row[c_path]
            age = parse_age(row[c_age])
            cells = {n: (row[c] if c is not None else "") for n, c in optional.items()}
            std = parse_age(cells["age_std"], field="age_std") if cells["age_std"] else None
            gender = parse_gender(cells["gender"])
            race = parse_race(cells["race"])
        except IndexError:
            report.skip("bad_row", where)
            continue
        except SkipRow as e:
            report.skip(e.reason, where)
            continue
        if not rel:
            report.skip("bad_row", where)
            continue
        identity = cells["identity"] or None
        p = Path(rel).expanduser()
        img = p if p.is_absolute() else base / rel
        if not img.is_file():
            report.skip("missing_file", f"{where} {img}")
            continue
        key_text = _strip_ext(img.relative_to(base).as_posix() if not p.is_absolute() else rel)
        rec = _emit(
            report,
            keys,
            key_text=key_text,
            data=_read(img),
            source=str(img),
            verify=verify,
            age=age,
            age_std=std,
            gender=gender,
            race=race,
            identity=identity,
        )
        if rec is not None:
            for name, c in optional.items():
                if c is not None and not cells[name]:
                    report.note_partial(f"missing_{name}", where)
            yield rec


# --------------------------------------------------------------------------- registry


Importer = Callable[..., Iterator[Record]]

IMPORTERS: dict[str, Importer] = {
    "utkface": iter_utkface,
    "fgnet": iter_fgnet,
    "appa-real": iter_appa_real,
    "mivia": iter_mivia,
    "morph": iter_morph,
    "folders": iter_folders,
    "csv": iter_csv,
    "synthetic": iter_synthetic,
}
"""Importer name -> ``iter_<name>(path, report, **options)``."""
