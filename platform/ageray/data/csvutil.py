"""Small csv helpers shared by the csv-driven importers (APPA-REAL, MIVIA, Morph II, generic).

Why a module of its own: each dataset ships its labels as a slightly different csv (a header
or none, a BOM, odd capitalisation, ``;`` instead of ``,``). Reading them in one place keeps
the importers about *labels* and makes every csv error name the file, the row and the fix.

Bytes that are not UTF-8 never stop a read: they are decoded with surrogate escapes, so a
path cell still names its file on disk and a label cell fails its check like any other bad
value (counted by the importer). A row the csv reader cannot parse at all (a field over the
size limit) comes out as ``None`` cells, counted as ``bad_row``. What the user must fix
(a missing or empty file, no header, a required column missing) raises
:class:`~ageray.data.records.InputError`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from ageray.data.records import InputError, MissingInputError

__all__ = [
    "CsvTable",
    "find_column",
    "is_number",
    "normalize_name",
    "read_csv",
]


def normalize_name(name: str) -> str:
    """Column names compare case-, space- and punctuation-insensitively (``Real Age`` ==
    ``real_age`` == ``realage``): datasets are inconsistent and users should not have to
    spell a header exactly."""
    return "".join(ch for ch in name.strip().lower() if ch.isalnum())


def is_number(text: str) -> bool:
    """True for a finite number such as ``26`` or ``26.5`` (used to tell headers from data)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class CsvTable:
    """A csv file: its header (or None) and its data rows with 1-based line numbers.

    Rows are read lazily so that a 575k-row MIVIA csv is not held in memory twice.
    """

    def __init__(self, path: Path, header: list[str] | None, delimiter: str) -> None:
        self.path = path
        self.header = header
        self.delimiter = delimiter

    def rows(self) -> Iterator[tuple[int, list[str] | None]]:
        """Yield ``(line_number, cells)`` for every non-blank data row (header excluded);
        ``cells`` is None for a row the csv reader cannot parse."""
        with _open(self.path) as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            i = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error:
                    i += 1
                    yield reader.line_num, None
                    continue
                i += 1
                if i == 1 and self.header is not None:
                    continue
                if not row or all(not c.strip() for c in row):
                    continue
                yield reader.line_num, [c.strip() for c in row]

    def count_rows(self) -> int:
        """Number of data rows (for progress bars)."""
        return sum(1 for _ in self.rows())

    def where(self, line: int) -> str:
        """``file.csv:12`` — how a row is named in skip examples."""
        return f"{self.path.name}:{line}"


def read_csv(
    path: Path,
    *,
    header: bool | None = None,
    numeric_column: int | None = None,
    delimiter: str | None = None,
) -> CsvTable:
    """Open a csv and decide its header and delimiter.

    ``header=None`` decides from the first row: it is a header when ``numeric_column`` (a
    column that always holds a number in data rows, e.g. MIVIA's age) is not a number there.
    Without ``numeric_column`` a header is assumed. The delimiter is sniffed among ``,;\\t|``
    unless given.
    """
    if not path.is_file():
        raise MissingInputError(f"label csv {path} does not exist")
    with _open(path) as f:
        sample = f.read(64 * 1024)
    if not sample.strip():
        raise InputError(f"label csv {path} is empty; it needs a header row and data rows")
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    try:
        first = next(csv.reader(sample.splitlines(), delimiter=delimiter), [])
    except csv.Error as exc:
        raise InputError(f"label csv {path}: its first row cannot be read ({exc})") from None
    first = [c.strip() for c in first]
    if header is None:
        if numeric_column is None:
            header = True
        else:
            header = not (len(first) > numeric_column and is_number(first[numeric_column]))
    return CsvTable(path, first if header else None, delimiter)


def find_column(
    table: CsvTable,
    candidates: Sequence[str],
    *,
    required: bool,
    option: str | None = None,
) -> int | None:
    """Index of the first column whose name matches one of ``candidates``.

    A missing required column is an :class:`~ageray.data.records.InputError` that lists the
    columns the csv does have and, when the importer has one, the option (``option``, e.g.
    ``path_col``) that selects another column.
    """
    if table.header is None:
        raise InputError(f"{table.path}: this importer needs a header row naming the columns")
    names = [normalize_name(h) for h in table.header]
    for cand in candidates:
        key = normalize_name(cand)
        if key in names:
            return names.index(key)
    if required:
        if option:
            fix = (
                f"choose the column with the importer option {option}=<column name> "
                f"(jobs.make_shards: --importer-option {option}=<column name>)"
            )
        else:
            fix = "this dataset's column names are fixed: is this its own label csv?"
        raise InputError(
            f"{table.path}: no column named {' or '.join(repr(c) for c in candidates)}; "
            f"the header has {table.header}; {fix}"
        )
    return None


def _open(path: Path) -> TextIO:
    """A csv file as text: UTF-8 (BOM dropped), undecodable bytes as surrogate escapes."""
    return path.open(newline="", encoding="utf-8-sig", errors="surrogateescape")
