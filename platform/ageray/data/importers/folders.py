"""Identity folders (CASIA-WebFace style): ``ROOT/<identity>/<image>.jpg``, no ages; the
source of identity pretraining."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ageray.data.importers.base import (
    KeyMaker,
    Verify,
    check_verify,
    emit_file,
    is_image_name,
    iter_folder,
    require_folder,
    strip_ext,
)
from ageray.data.records import ImportReport, Record

__all__ = ["iter_folders"]


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
    Files directly in ``ROOT`` are counted as ``no_identity_folder``. A folder name that is
    not UTF-8 is an identity like any other (written with ``\\xNN`` for its undecodable
    bytes, see :func:`ageray.data.records.printable`).
    """
    check_verify(verify)
    layout = "ROOT/<identity>/<image>.jpg (one folder per person)"
    root = require_folder(path, "folders", layout)
    report.source = report.source or "folders"
    keys = KeyMaker()
    for rel, p in iter_folder(root, progress, "folders"):
        if not is_image_name(rel):
            report.skip("not_image_file", str(p))
            continue
        if "/" not in rel:
            report.skip("no_identity_folder", str(p))
            continue
        identity = rel.split("/", 1)[0]
        rec = emit_file(
            report,
            keys,
            p,
            key_text=strip_ext(rel),
            verify=verify,
            age=None,
            identity=identity,
        )
        if rec is not None:
            yield rec
