"""UTKFace: labels from the file names ``age_gender_race_datetime.jpg.chip.jpg``, read from
a folder or a (compressed) tar without extracting it."""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from ageray.data.importers.base import (
    KeyMaker,
    SkipRow,
    Verify,
    check_verify,
    emit,
    is_image_name,
    iter_folder,
    iter_tar,
    read_file,
    require,
    stem,
)
from ageray.data.labels import LabelError, check_age, check_race
from ageray.data.records import ImportReport, InputError, Record

__all__ = ["iter_utkface", "parse_utkface_name"]

_DIGITS = re.compile(r"^[0-9]+$")
_DATE = re.compile(r"^[0-9]{8,}")  # UTKFace's 17-digit yyyymmddHHMMSSFFF date-time field


def parse_utkface_name(name: str) -> tuple[dict[str, Any], str | None]:
    """Labels from a UTKFace file name ``age_gender_race_datetime.jpg.chip.jpg``.

    Returns ``({"age", "gender", "race"}, partial_reason_or_None)``. A name whose third field
    is the date (``61_1_20170109142408075.jpg.chip.jpg``: race left out by the dataset's
    authors) yields race None and ``"missing_race"``. Raises :class:`SkipRow` ``bad_name`` or
    :class:`~ageray.data.labels.LabelError` ``age_out_of_range``, ``bad_gender``,
    ``bad_race`` (the shared label check).
    """
    fields = [f.strip() for f in stem(name).split("_")]
    if len(fields) < 2 or not _DIGITS.match(fields[0]):
        raise SkipRow("bad_name")
    age = check_age(float(fields[0]))
    if fields[1] not in ("0", "1"):
        raise SkipRow("bad_gender")
    gender = int(fields[1])
    if len(fields) == 2 or _DATE.match(fields[2]):
        return {"age": age, "gender": gender, "race": None}, "missing_race"
    if not _DIGITS.match(fields[2]):
        raise SkipRow("bad_name")
    race = check_race(float(fields[2]))
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
    check_verify(verify)
    layout = "a folder or .tar of UTKFace images named age_gender_race_datetime.jpg.chip.jpg"
    root = require(path, "utkface", layout)
    report.source = report.source or "utkface"
    keys = KeyMaker()

    def handle(rel: str, data: bytes | None, source: str) -> Record | None:
        name = rel.rsplit("/", 1)[-1]
        if not is_image_name(name):
            report.skip("not_image_file", source)
            return None
        try:
            labels, partial = parse_utkface_name(name)
        except LabelError as e:
            report.skip(e.reason, source)
            return None
        rec = emit(
            report, keys, key_text=stem(name), data=data, source=source, verify=verify, **labels
        )
        if rec is not None and partial:
            report.note_partial(partial, source)
        return rec

    if root.is_dir():
        for rel, p in iter_folder(root, progress, "utkface"):
            rec = handle(rel, read_file(p), str(p))
            if rec is not None:
                yield rec
        return
    if not tarfile.is_tarfile(root):
        raise InputError(f"utkface importer: {root} is neither a folder nor a tar file; {layout}")
    for name, data, regular in iter_tar(root, progress, "utkface"):
        source = f"{root.name}:{name}"
        if not regular:
            report.skip("not_regular_file", source)
            continue
        rec = handle(name, data, source)
        if rec is not None:
            yield rec
