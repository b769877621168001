"""Morph II: its metadata csv (columns found by name or chosen by options), ages from the
age column or dates of birth and of the photo, Morph's race letters."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import NamedTuple

from ageray.data.csvutil import CsvTable, find_column, read_csv
from ageray.data.importers.base import (
    KeyMaker,
    SkipRow,
    Verify,
    check_verify,
    csv_rows,
    emit_file,
    find_csv,
    images_root_of,
    require,
    strip_ext,
)
from ageray.data.labels import LabelError, parse_age, parse_gender, parse_race
from ageray.data.records import ImportReport, InputError, Record

__all__ = ["iter_morph"]

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
    check_verify(verify)
    layout = "a Morph II csv with a header (id_num, photo/file, dob, doa, race, gender, age)"
    root = require(path, "morph", layout)
    csv_path = find_csv(root, "morph", "morph.csv", layout)
    base = images_root_of(csv_path, images_root) if images_root else csv_path.parent
    table = read_csv(csv_path, header=True)
    chosen = {
        "path_col": path_col,
        "id_col": id_col,
        "age_col": age_col,
        "gender_col": gender_col,
        "race_col": race_col,
        "dob_col": dob_col,
        "doa_col": doa_col,
    }
    cols = _find_columns(table, chosen, csv_path=csv_path, need_path=path_template is None)
    report.source = report.source or "morph"
    yield from _records(
        table,
        report,
        cols,
        base=base,
        path_template=path_template,
        verify=verify,
        progress=progress,
    )


# option -> the header names it defaults to (case- and punctuation-insensitive)
_COLUMN_NAMES = {
    "path_col": ["photo", "file", "filename", "file_name", "path", "image"],
    "id_col": ["id_num", "id", "subject_id", "subject"],
    "age_col": ["age"],
    "gender_col": ["gender", "sex"],
    "race_col": ["race", "ethnicity"],
    "dob_col": ["dob"],
    "doa_col": ["doa"],
}


class _Columns(NamedTuple):
    """Column indices of one Morph csv (None: the csv has no such column)."""

    path: int | None
    id: int | None
    age: int | None
    gender: int | None
    race: int | None
    dob: int | None
    doa: int | None


def _find_columns(
    table: CsvTable, chosen: dict[str, str | None], *, csv_path: Path, need_path: bool
) -> _Columns:
    """The columns the options name, else the first default name found; the path column is
    required unless a ``path_template`` builds the paths, and an age needs age or dob+doa."""
    cols = _Columns(
        *(
            find_column(
                table,
                [chosen[opt]] if chosen[opt] else names,
                option=opt,
                required=need_path and opt == "path_col",
            )
            for opt, names in _COLUMN_NAMES.items()
        )
    )
    if cols.age is None and (cols.dob is None or cols.doa is None):
        raise InputError(
            f"morph importer: {csv_path} has neither an age column nor dob+doa columns "
            f"(header: {table.header}); choose them with the importer options age_col=<column> "
            "or dob_col=<column> and doa_col=<column> (jobs.make_shards: --importer-option)"
        )
    return cols


def _records(
    table: CsvTable,
    report: ImportReport,
    cols: _Columns,
    *,
    base: Path,
    path_template: str | None,
    verify: Verify,
    progress: bool,
) -> Iterator[Record]:
    """One record per usable row; every other row is counted in ``report`` by its reason."""
    header = table.header or []
    keys = KeyMaker()
    for where, row in csv_rows(table, report, progress=progress, desc="morph"):
        if len(row) < len(header):
            report.skip("bad_row", where)
            continue
        try:
            rel, age, gender, race = _row_labels(row, header, cols, path_template)
        except LabelError as e:
            report.skip(e.reason, where)
            continue
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            report.skip("bad_path_template", where)
            continue
        if not rel:
            report.skip("bad_row", where)
            continue
        identity = (row[cols.id] or None) if cols.id is not None else None
        rec = emit_file(
            report,
            keys,
            base / rel.replace("\\", "/"),
            where=where,
            key_text=strip_ext(rel.replace("\\", "/")),
            verify=verify,
            age=age,
            gender=gender,
            race=race,
            identity=identity,
        )
        if rec is not None:
            for name, c, v in (("gender", cols.gender, gender), ("race", cols.race, race)):
                if c is not None and v is None:
                    report.note_partial(f"missing_{name}", where)
            yield rec


def _row_labels(
    row: list[str], header: list[str], cols: _Columns, path_template: str | None
) -> tuple[str, float, int | None, int | None]:
    """(relative image path, age, gender, race) of one row; raises ``LabelError`` (a bad
    label) or what a ``path_template`` that does not fit the row raises."""
    if cols.path is not None:
        rel = row[cols.path]
    else:
        assert path_template is not None
        rel = path_template.format(**dict(zip(header, row)))
    if cols.age is not None and row[cols.age]:
        age = parse_age(row[cols.age])
    elif cols.dob is not None and cols.doa is not None:
        age = parse_age(_years_between(_parse_date(row[cols.dob]), _parse_date(row[cols.doa])))
    else:
        raise SkipRow("bad_age")
    gender = parse_gender(row[cols.gender]) if cols.gender is not None else None
    race = parse_race(row[cols.race]) if cols.race is not None else None
    return rel, age, gender, race
