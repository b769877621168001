"""FG-NET: ``<subject>A<age>[letter].JPG`` files; identity = the subject number."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from ageray.data.importers.base import (
    KeyMaker,
    SkipRow,
    Verify,
    check_verify,
    emit_file,
    is_image_name,
    iter_folder,
    require,
    stem,
)
from ageray.data.labels import LabelError, check_age
from ageray.data.records import ImportReport, InputError, Record

__all__ = ["iter_fgnet", "parse_fgnet_name"]

_FGNET = re.compile(r"^([0-9]+)A([0-9]+)([a-z]?)$", re.IGNORECASE)


def parse_fgnet_name(name: str) -> tuple[str, float]:
    """``001A02.JPG`` -> ``("001", 2.0)``; ``001A43a.JPG`` -> ``("001", 43.0)``.
    Raises :class:`SkipRow` ``bad_name`` / :class:`~ageray.data.labels.LabelError`
    ``age_out_of_range``."""
    m = _FGNET.match(stem(name))
    if not m:
        raise SkipRow("bad_name")
    age = check_age(float(m.group(2)))
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
    check_verify(verify)
    root = require(path, "fgnet", "a folder of FG-NET images named like 001A02.JPG")
    if not root.is_dir():
        raise InputError(f"fgnet importer: {root} is not a folder of 001A02.JPG images")
    report.source = report.source or "fgnet"
    keys = KeyMaker()
    for rel, p in iter_folder(root, progress, "fgnet"):
        if not is_image_name(rel):
            report.skip("not_image_file", str(p))
            continue
        try:
            identity, age = parse_fgnet_name(rel)
        except LabelError as e:
            report.skip(e.reason, str(p))
            continue
        rec = emit_file(
            report,
            keys,
            p,
            key_text=stem(rel),
            verify=verify,
            age=age,
            identity=identity,
        )
        if rec is not None:
            yield rec
