"""APPA-REAL: real or apparent age (with its std) from ``gt_avg_<split>.csv``, the dataset's
face crops or full images; the official split is kept in the key."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from ageray.data.csvutil import CsvTable, find_column, read_csv
from ageray.data.importers.base import (
    KeyMaker,
    Verify,
    check_verify,
    csv_rows,
    emit_file,
    require_folder,
    stem,
)
from ageray.data.labels import LabelError, parse_age
from ageray.data.records import ImportReport, InputError, MissingInputError, Record

__all__ = ["APPA_SPLITS", "iter_appa_real"]

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
    check_verify(verify)
    if label not in ("real", "apparent"):
        raise InputError(f"appa-real importer: label={label!r}; use 'real' or 'apparent'")
    layout = "ROOT/gt_avg_<split>.csv and ROOT/<split>/<file_name>[_face.jpg]"
    root = require_folder(path, "appa-real", layout)
    report.source = report.source or "appa-real"
    splits = [splits] if isinstance(splits, str) else list(splits)
    tables = [_split_table(root, split, label, layout) for split in splits]  # all checked first
    keys = KeyMaker()
    for split, table, cols in tables:
        for where, row in csv_rows(table, report, progress=progress, desc=f"appa-real {split}"):
            try:
                file_name, age, std = _row_labels(row, cols)
            except IndexError:
                report.skip("bad_row", where)
                continue
            except LabelError as e:
                report.skip(e.reason, where)
                continue
            img = root / split / (f"{file_name}_face.jpg" if face else file_name)
            rec = emit_file(
                report,
                keys,
                img,
                where=where,
                key_text=f"{split}_{stem(file_name)}",
                verify=verify,
                age=age,
                age_std=std,
            )
            if rec is not None:
                if label == "apparent" and std is None:
                    report.note_partial("missing_age_std", where)
                yield rec


def _split_table(root: Path, split: str, label: str, layout: str) -> tuple[str, CsvTable, _Columns]:
    """(split, its ``gt_avg_<split>.csv``, the columns ``label`` reads), found at the root or
    inside the split folder."""
    cands = [root / f"gt_avg_{split}.csv", root / split / f"gt_avg_{split}.csv"]
    csv_path = next((c for c in cands if c.is_file()), None)
    if csv_path is None:
        raise MissingInputError(
            f"appa-real importer: no gt_avg_{split}.csv in {root} or {root / split}; "
            f"expected {layout}, or pass splits=[...] naming only the splits you have"
        )
    table = read_csv(csv_path, header=True)
    return split, table, _columns(table, label)


def _row_labels(row: list[str], cols: _Columns) -> tuple[str, float, float | None]:
    """(file name, age, age std or None) of one row; raises ``IndexError`` (a short row) or
    ``LabelError``."""
    c_file, c_real, c_app, c_std = cols
    file_name = row[c_file]
    if c_real is not None:
        return file_name, parse_age(row[c_real]), None
    assert c_app is not None
    age = parse_age(row[c_app])
    std = None
    if c_std is not None and row[c_std]:
        std = parse_age(row[c_std], field="age_std")
    return file_name, age, std


_Columns = tuple[int, int | None, int | None, int | None]


def _columns(table: CsvTable, label: str) -> _Columns:
    """(file, real_age, apparent_age_avg, apparent_age_std) column indices; the one ``label``
    reads is required (None for the other)."""
    c_file = find_column(table, ["file_name", "file"], required=True)
    c_real = c_app = None
    if label == "real":
        c_real = find_column(table, ["real_age"], required=True)
    else:
        c_app = find_column(table, ["apparent_age_avg"], required=True)
    c_std = find_column(table, ["apparent_age_std"], required=False)
    assert c_file is not None
    return c_file, c_real, c_app, c_std
