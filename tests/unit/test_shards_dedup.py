"""Identical files imported several times (issue 21, item 7): the shard writer keeps the
first, counts the others as ``duplicate_image`` with examples naming both files, and
``jobs.make_shards`` says how many. Synthetic images, no Ray."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest
from datagen import jpeg, make_records

from ageray.data.dedup import ContentDedup, SkipLog, content_digest
from ageray.data.shards import write_shards


def test_dedup_stage_remembers_the_first_name() -> None:
    dedup = ContentDedup()
    a, b = content_digest(b"face-a"), content_digest(b"face-b")
    assert dedup.seen(a, "x/a.jpg") is None
    assert dedup.seen(b, "x/b.jpg") is None
    assert dedup.seen(a, "copy/a.jpg") == "x/a.jpg"
    assert dedup.seen(a, "copy2/a.jpg") == "x/a.jpg"  # still the first, not the last copy
    log = SkipLog(max_examples=1)
    log("duplicate_image", "one")
    log("duplicate_image", "two")
    assert log.footer() == {
        "skipped": {"duplicate_image": 2},
        "skipped_total": 2,
        "skipped_examples": {"duplicate_image": ["one"]},
    }


def test_identical_files_under_other_names_are_written_once(tmp_path: Path) -> None:
    records = make_records(30, identities=None)
    # three copies of record 7 and one of record 12, under new keys and file names
    copies = [
        dataclasses.replace(records[7], key=f"copy{i}", source=f"copies/{i}.jpg") for i in range(3)
    ]
    copies.append(dataclasses.replace(records[12], key="copy12", source="copies/12.jpg"))
    # same label, same size, other bytes: not a duplicate
    other = dataclasses.replace(records[7], key="other", image=jpeg(999), source="other.jpg")
    m = write_shards(
        iter([*records, *copies, other]), tmp_path, workers=2, progress=False, max_count=8
    )
    assert m["skipped"] == {"duplicate_image": 4}
    assert m["skipped_total"] == 4
    examples = m["skipped_examples"]["duplicate_image"]
    first7 = records[7].source or records[7].key
    assert examples[0] == f"copies/0.jpg (same bytes as {first7})"
    assert len(examples) == 4
    keys = set()
    for tar_path in tmp_path.glob("*/*.tar"):
        with tarfile.open(tar_path) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    assert len(keys) == 31 and "other" in keys and not any(k.startswith("copy") for k in keys)
    assert sum(s["count"] for s in m["splits"].values()) == 31


def test_make_shards_says_how_many_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from jobs.make_shards import main

    root = tmp_path / "faces"
    for person in ("ann", "bob"):
        (root / person).mkdir(parents=True)
        for i in range(3):
            (root / person / f"{i}.jpg").write_bytes(jpeg(100 * ord(person[0]) + i))
    (root / "bob" / "again.jpg").write_bytes((root / "ann" / "0.jpg").read_bytes())
    (root / "bob" / "again2.jpg").write_bytes((root / "ann" / "1.jpg").read_bytes())
    out = tmp_path / "shards"
    argv = ["--source", "folders", "--input", str(root), "--output", str(out), "--quiet"]
    assert main([*argv, "--splits", "train=1"]) == 0
    text = capsys.readouterr().out
    assert "duplicates: 2 identical file(s) skipped" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["duplicate_image"] == 2
    assert sum(s["count"] for s in manifest["splits"].values()) == 6
