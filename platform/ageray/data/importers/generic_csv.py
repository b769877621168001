"""A generic labelled csv: ``path,age[,age_std,gender,race,identity]`` with a header."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ageray.data.csvutil import find_column, read_csv
from ageray.data.importers.base import (
    KeyMaker,
    Verify,
    check_verify,
    csv_rows,
    emit_file,
    require,
    strip_ext,
)
from ageray.data.labels import LabelError, parse_age, parse_gender, parse_race
from ageray.data.records import ImportReport, InputError, Record

__all__ = ["iter_csv"]


def iter_csv(
    path: str | os.PathLike[str],
    report: ImportReport,
    *,
    images_root: str | os.PathLike[str] | None = None,
    path_col: str = "path",
    age_col: str = "age",
    verify: Verify = "header",
    progress: bool = False,
) -> Iterator[Record]:
    """A generic labelled csv with a header row.

    Required columns: ``path``, ``age`` (other names: the ``path_col`` / ``age_col``
    options). Optional: ``age_std``, ``gender`` (0/1 or
    male/female/m/f), ``race`` (0-4 or white/black/asian/indian/other), ``identity``.
    Paths are relative to ``images_root`` (default: the csv's folder) or absolute. An empty
    optional cell imports as None and is noted as partial (``missing_<column>``).
    """
    check_verify(verify)
    layout = "a csv with a header: path,age[,age_std,gender,race,identity]"
    csv_path = require(path, "csv", layout)
    if not csv_path.is_file():
        raise InputError(f"csv importer: {csv_path} is a folder; pass the csv file itself")
    base = Path(images_root).expanduser() if images_root is not None else csv_path.parent
    table = read_csv(csv_path, header=True)
    c_path = find_column(table, [path_col], option="path_col", required=True)
    c_age = find_column(table, [age_col], option="age_col", required=True)
    assert c_path is not None and c_age is not None
    optional = {
        name: find_column(table, [name], required=False)
        for name in ("age_std", "gender", "race", "identity")
    }
    report.source = report.source or "csv"
    keys = KeyMaker()
    for where, row in csv_rows(table, report, progress=progress, desc="csv"):
        try:
            rel, cells, labels = _row_labels(row, c_path=c_path, c_age=c_age, optional=optional)
        except IndexError:
            report.skip("bad_row", where)
            continue
        except LabelError as e:
            report.skip(e.reason, where)
            continue
        if not rel:
            report.skip("bad_row", where)
            continue
        located = _image_path(rel, base)
        if located is None:
            report.skip("bad_path", where)
            continue
        img, key_text = located
        rec = emit_file(report, keys, img, where=where, key_text=key_text, verify=verify, **labels)
        if rec is not None:
            for name, c in optional.items():
                if c is not None and not cells[name]:
                    report.note_partial(f"missing_{name}", where)
            yield rec


def _row_labels(
    row: list[str], *, c_path: int, c_age: int, optional: dict[str, int | None]
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(relative path, the optional columns' cells, the record's label keywords) of one row;
    raises ``IndexError`` (a short row) or ``LabelError``."""
    rel = row[c_path]
    age = parse_age(row[c_age])
    cells = {n: (row[c] if c is not None else "") for n, c in optional.items()}
    std = parse_age(cells["age_std"], field="age_std") if cells["age_std"] else None
    labels = {
        "age": age,
        "age_std": std,
        "gender": parse_gender(cells["gender"]),
        "race": parse_race(cells["race"]),
        "identity": cells["identity"] or None,
    }
    return rel, cells, labels


def _image_path(rel: str, base: Path) -> tuple[Path, str] | None:
    """(image path, key text) of a csv path, relative to ``base`` unless absolute; None for
    ``~someone/x`` naming a user this machine does not know."""
    try:
        p = Path(rel).expanduser()
    except RuntimeError:
        return None
    img = p if p.is_absolute() else base / rel
    return img, strip_ext(img.relative_to(base).as_posix() if not p.is_absolute() else rel)
