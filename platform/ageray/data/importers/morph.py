"""Morph II: its metadata csv (columns found by name or chosen by options), ages from the
age column or dates of birth and of the photo, Morph's race letters."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import date, datetime

from ageray.data.csvutil import find_column, read_csv
from ageray.data.importers.common import (
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
        raise InputError(
            f"morph importer: {csv_path} has neither an age column nor dob+doa columns "
            f"(header: {table.header}); choose them with the importer options age_col=<column> "
            "or dob_col=<column> and doa_col=<column> (jobs.make_shards: --importer-option)"
        )
    header = table.header or []
    report.source = report.source or "morph"
    keys = KeyMaker()
    for where, row in csv_rows(table, report, progress=progress, desc="morph"):
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
        except LabelError as e:
            report.skip(e.reason, where)
            continue
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            report.skip("bad_path_template", where)
            continue
        if not rel:
            report.skip("bad_row", where)
            continue
        identity = (row[c_id] or None) if c_id is not None else None
        img = base / rel.replace("\\", "/")
        rec = emit_file(
            report,
            keys,
            img,
            where=where,
            key_text=strip_ext(rel.replace("\\", "/")),
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
