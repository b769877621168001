"""Importers: turn a dataset as it lies on disk into :class:`~ageray.data.records.Record`\\ s.

Every importer has the same shape, ``iter_<name>(path, report, **options) -> Iterator[Record]``,
lives in a module of its own (``utkface``, ``fgnet``, ``appa_real``, ``mivia``, ``morph``,
``folders``, ``generic_csv``; what they share is in ``common``) and is registered in
:data:`IMPORTERS` so that ``jobs.make_shards`` can call
``IMPORTERS[name](input_path, report, **options)`` without per-dataset code.

Rules every importer keeps (why: a silently shrunken dataset is the hardest bug to find):

* Every unusable row or file is counted with ``report.skip(reason, example)`` — missing file,
  not an image, unreadable image, unparseable name or csv row, bad or out-of-range label. A
  row imported without some optional field goes through ``report.note_partial(reason,
  example)``. ``report.ok()`` is called once per yielded record, so ``imported + skipped``
  equals the rows (or files) looked at.
* Labels pass the one label check of :mod:`ageray.data.labels` (the one the shard writer
  and the stream use too): ages finite in ``[0, 120]``; gender 0 male / 1 female; race
  UTKFace's 0 white, 1 black, 2 asian, 3 indian, 4 other. A failure is counted under the
  check's reason (``bad_age``, ``age_out_of_range``, ``bad_gender``, ``bad_race``, ...).
* Names are bytes: a file, folder or csv cell that is not UTF-8 is imported (its identity
  and source made printable, see :func:`ageray.data.records.printable`) or counted, never
  an abort. What the user must fix (a missing input, an empty csv, a required column
  missing) raises :class:`~ageray.data.records.InputError` naming the input and the fix.
* Images are checked cheaply before they are accepted (``verify="header"``: Pillow parses the
  header, ``verify()`` runs, and a JPEG must carry its end marker so truncated downloads are
  caught); ``verify="decode"`` decodes fully, ``verify="none"`` only requires non-empty bytes.
  The bytes are passed on untouched: re-encoding happens only if alignment changes pixels.
* Order is deterministic (sorted by relative path, or csv row order for csv-driven sets), and
  keys are made unique in that order (``name``, ``name_2``, ...), so two imports of the same
  input give identical shards.
* ``progress=True`` shows a tqdm bar over the scan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ageray.data.importers.appa_real import APPA_SPLITS, iter_appa_real
from ageray.data.importers.base import IMAGE_EXTENSIONS, SkipRow, check_image
from ageray.data.importers.fgnet import iter_fgnet, parse_fgnet_name
from ageray.data.importers.folders import iter_folders
from ageray.data.importers.generic_csv import iter_csv
from ageray.data.importers.mivia import iter_mivia
from ageray.data.importers.morph import iter_morph
from ageray.data.importers.utkface import iter_utkface, parse_utkface_name
from ageray.data.labels import AGE_MAX, AGE_MIN, parse_age, parse_gender, parse_race
from ageray.data.records import ImportReport, Record
from ageray.data.synthetic import iter_synthetic

__all__ = [
    "AGE_MAX",
    "AGE_MIN",
    "APPA_SPLITS",
    "IMAGE_EXTENSIONS",
    "IMPORTERS",
    "ImportReport",
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
