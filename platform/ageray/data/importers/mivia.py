"""MIVIA age dataset (CAIP 2021 Guess The Age): ``path,age`` csv rows; identity = the
VGGFace2 folder of each image."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ageray.data.csvutil import read_csv
from ageray.data.importers.base import (
    KeyMaker,
    Verify,
    check_verify,
    csv_rows,
    emit_file,
    find_csv,
    images_root_of,
    require,
    strip_ext,
)
from ageray.data.labels import LabelError, parse_age
from ageray.data.records import ImportReport, Record

__all__ = ["iter_mivia"]


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
    check_verify(verify)
    layout = "training_caip_contest.csv with rows 'n000002/0001_01.jpg,26' beside the images"
    root = require(path, "mivia", layout)
    csv_path = find_csv(root, "mivia", "training_caip_contest.csv", layout)
    base = images_root_of(csv_path, images_root)
    table = read_csv(csv_path, numeric_column=1)
    report.source = report.source or "mivia"
    keys = KeyMaker()
    for where, row in csv_rows(table, report, progress=progress, desc="mivia"):
        if len(row) < 2 or not row[0]:
            report.skip("bad_row", where)
            continue
        rel = row[0].replace("\\", "/")
        try:
            age = parse_age(row[1])
        except LabelError as e:
            report.skip(e.reason, where)
            continue
        img = base / rel
        parts = rel.strip("/").split("/")
        identity = parts[0] if len(parts) > 1 else None
        rec = emit_file(
            report,
            keys,
            img,
            where=where,
            key_text=strip_ext(rel),
            verify=verify,
            age=age,
            identity=identity,
        )
        if rec is not None:
            if identity is None:
                report.note_partial("missing_identity", where)
            yield rec
