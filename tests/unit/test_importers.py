"""Importers: exact records and exact skip counts on tiny fake datasets, plus the real
UTKFace tarball when it is present."""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ageray.data.importers import (
    IMPORTERS,
    check_image,
    iter_appa_real,
    iter_csv,
    iter_fgnet,
    iter_folders,
    iter_mivia,
    iter_morph,
    iter_utkface,
    parse_gender,
    parse_race,
)
from ageray.data.records import KEY_RE, ImportReport, Record
from ageray.data.synthetic import iter_synthetic


def jpeg_bytes(color: tuple[int, int, int] = (200, 120, 90), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def noisy_jpeg_bytes(size: int = 64) -> bytes:
    """A JPEG with real entropy-coded data, so that cutting its tail leaves a valid header."""
    noise = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    return buf.getvalue()


def png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def run(fn, path, **opts) -> tuple[list[Record], ImportReport]:
    report = ImportReport()
    recs = list(fn(path, report, **opts))
    return recs, report


def labels(recs: list[Record]) -> dict[str, tuple]:
    return {r.key: (r.age, r.age_std, r.gender, r.race, r.identity) for r in recs}


# ------------------------------------------------------------------------------- helpers


def test_registry_names() -> None:
    assert set(IMPORTERS) == {
        "utkface", "fgnet", "appa-real", "mivia", "morph", "folders", "csv", "synthetic"
    }  # fmt: skip
    assert IMPORTERS["synthetic"] is iter_synthetic


def test_check_image_reasons() -> None:
    good = noisy_jpeg_bytes()
    assert check_image(good) is None
    assert check_image(png_bytes()) is None
    assert check_image(b"") == "empty_file"
    assert check_image(b"hello, not an image") == "not_image"
    assert check_image(good[: len(good) // 2]) == "truncated_image"
    assert check_image(good[: len(good) // 2], "decode") == "unreadable_image"
    assert check_image(png_bytes()[:-20]) == "unreadable_image"  # PNG verify reads the chunks
    assert check_image(b"hello", "none") is None


def test_label_word_parsers() -> None:
    assert [parse_gender(x) for x in ["0", "1", "M", "female", "f", "Male", "1.0", ""]] == [
        0, 1, 0, 1, 1, 0, 1, None
    ]  # fmt: skip
    words = ["white", "Black", "asian", "INDIAN", "other", "3", "B", ""]
    assert [parse_race(x) for x in words] == [0, 1, 2, 3, 4, 3, 1, None]


def test_missing_input_names_path_and_layout(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for name, fn in IMPORTERS.items():
        if name == "synthetic":
            continue
        with pytest.raises(FileNotFoundError, match="expected") as e:
            list(fn(missing, ImportReport()))
        assert str(missing) in str(e.value)


# ------------------------------------------------------------------------------- UTKFace

UTK_FILES = {
    "25_0_1_20170116174525125.jpg.chip.jpg": ("ok", 25.0, 0, 1),
    "61_1_20170109142408075.jpg.chip.jpg": ("partial", 61.0, 1, None),
    "sub/3_1_2_20161219140619394.jpg.chip.jpg": ("ok", 3.0, 1, 2),
    "24_0_1_20170116220224657 .jpg.chip.jpg": ("ok", 24.0, 0, 1),  # stray space in the name
    "abc.jpg": ("bad_name", None, None, None),
    "130_0_0_20170110.jpg.chip.jpg": ("age_out_of_range", None, None, None),
    "25_2_0_20170110.jpg.chip.jpg": ("bad_gender", None, None, None),
    "25_0_7_20170110.jpg.chip.jpg": ("bad_race", None, None, None),
    "notes.txt": ("not_image_file", None, None, None),
    "30_0_0_garbage.jpg.chip.jpg": ("not_image", None, None, None),
    "31_0_0_truncated.jpg.chip.jpg": ("truncated_image", None, None, None),
    "other/25_0_1_20170116174525125.jpg.chip.jpg": ("ok", 25.0, 0, 1),  # duplicate stem
}
UTK_SORTED_KEYS = [
    "24_0_1_20170116220224657",
    "25_0_1_20170116174525125",
    "61_1_20170109142408075",
    "25_0_1_20170116174525125_2",  # other/...
    "3_1_2_20161219140619394",  # sub/...
]


def utk_bytes(name: str) -> bytes:
    status = UTK_FILES[name][0]
    if status == "not_image" or name.endswith(".txt"):
        return b"this is not a picture"
    if status == "truncated_image":
        return noisy_jpeg_bytes()[:-300]
    return jpeg_bytes()


def check_utk(recs: list[Record], report: ImportReport) -> None:
    assert labels(recs) == {
        "24_0_1_20170116220224657": (24.0, None, 0, 1, None),
        "25_0_1_20170116174525125": (25.0, None, 0, 1, None),
        "25_0_1_20170116174525125_2": (25.0, None, 0, 1, None),
        "61_1_20170109142408075": (61.0, None, 1, None, None),
        "3_1_2_20161219140619394": (3.0, None, 1, 2, None),
    }
    assert report.imported == 5
    assert dict(report.partial) == {"missing_race": 1}
    assert dict(report.skipped) == {
        "bad_name": 1,
        "age_out_of_range": 1,
        "bad_gender": 1,
        "bad_race": 1,
        "not_image_file": 1,
        "not_image": 1,
        "truncated_image": 1,
    }
    assert report.imported + report.total_skipped == len(UTK_FILES)


def test_utkface_folder(tmp_path: Path) -> None:
    for name in UTK_FILES:
        write(tmp_path / "utk" / name, utk_bytes(name))
    recs, report = run(iter_utkface, tmp_path / "utk")
    check_utk(recs, report)
    # deterministic: sorted by relative path, same keys on a second run
    assert [r.key for r in recs] == UTK_SORTED_KEYS
    assert [r.key for r in run(iter_utkface, tmp_path / "utk")[0]] == UTK_SORTED_KEYS
    assert all(KEY_RE.match(r.key) for r in recs)


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_utkface_tar(tmp_path: Path, mode: str) -> None:
    tar_path = tmp_path / ("utk.tar" if mode == "w" else "utk.tar.gz")
    with tarfile.open(tar_path, mode) as tf:
        d = tarfile.TarInfo("utk")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name in sorted(UTK_FILES, reverse=True):  # archive order != sorted order
            data = utk_bytes(name)
            info = tarfile.TarInfo(f"utk/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("utk/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "abc.jpg"
        tf.addfile(link)
    recs, report = run(iter_utkface, tar_path)
    assert report.skipped["not_regular_file"] == 1
    report.skipped.pop("not_regular_file")
    check_utk(recs, report)
    if mode == "w":  # seekable tar: sorted member order, as for a folder
        assert [r.key for r in recs] == UTK_SORTED_KEYS


def test_utkface_rejects_non_tar_file(tmp_path: Path) -> None:
    f = write(tmp_path / "x.zip", b"PK\x03\x04 not a tar")
    with pytest.raises(ValueError, match="neither a folder nor a tar"):
        list(iter_utkface(f, ImportReport()))


UTK_INDEPENDENT = re.compile(r"^(\d+)_([01])_([0-4])_\d+\s*\.?jpg\.chip\.jpg$")
UTK_NO_RACE = re.compile(r"^(\d+)_([01])_\d{17}\.jpg\.chip\.jpg$")


@pytest.mark.realdata
def test_utkface_real_tar(utkface_tar: Path) -> None:
    with tarfile.open(utkface_tar) as tf:
        names = [m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()]
    assert len(names) == 14217
    t0 = time.perf_counter()
    recs, report = run(iter_utkface, utkface_tar)
    elapsed = time.perf_counter() - t0
    print(f"\nUTKFace import: {elapsed:.2f}s\n{report.summary()}")
    assert elapsed < 30, "the header check must stay cheap"
    # nothing dropped silently
    assert report.imported == len(recs)
    assert report.imported + report.total_skipped == len(names)
    # every well-formed name is labelled exactly as the name says (independent parse)
    by_key = {r.key: r for r in recs}
    expected, no_race = {}, {}
    for name in names:
        m = UTK_INDEPENDENT.match(name)
        if m:
            expected[name.split(".")[0].strip()] = tuple(int(g) for g in m.groups())
        m = UTK_NO_RACE.match(name)
        if m:
            no_race[name.split(".")[0]] = tuple(int(g) for g in m.groups())
    assert len(expected) >= 14200
    for key, (age, gender, race) in expected.items():
        r = by_key[key]
        assert (r.age, r.gender, r.race, r.identity) == (age, gender, race, None), key
    # the names without a race field are imported with race None and counted as partial
    assert no_race, "the tarball is expected to hold names without the race field"
    assert report.partial["missing_race"] == len(no_race)
    for key, (age, gender) in no_race.items():
        assert (by_key[key].age, by_key[key].gender, by_key[key].race) == (age, gender, None)
    assert len(recs) == len(names) - report.total_skipped
    assert len(by_key) == len(recs)  # keys unique


# ------------------------------------------------------------------------------- FG-NET


def test_fgnet(tmp_path: Path) -> None:
    root = tmp_path / "FGNET" / "images"
    write(root / "001A02.JPG", jpeg_bytes())
    write(root / "001A43a.JPG", jpeg_bytes())
    write(root / "002A10.jpg", jpeg_bytes())
    write(root / "xyz.JPG", jpeg_bytes())
    write(root / "readme.txt", b"hi")
    write(root / "003A05.JPG", b"")
    recs, report = run(iter_fgnet, root)
    assert labels(recs) == {
        "001A02": (2.0, None, None, None, "001"),
        "001A43a": (43.0, None, None, None, "001"),
        "002A10": (10.0, None, None, None, "002"),
    }
    assert dict(report.skipped) == {"bad_name": 1, "not_image_file": 1, "empty_file": 1}
    assert report.imported == 3


# ------------------------------------------------------------------------------- APPA-REAL

APPA_HEADER = ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]


def make_appa(root: Path) -> Path:
    write_csv(
        root / "gt_avg_train.csv",
        [
            APPA_HEADER,
            ["000000.jpg", 38, 5.0, 1.1466, 4],
            ["000001.jpg", 38, 20.394737, 4.3282, 18],
            ["000002.jpg", 38, "x", 4.0, "abc"],  # bad labels
            ["000003.jpg", 38, 30.0, 3.0, 31],  # images missing
        ],
    )
    write_csv(
        root / "gt_avg_valid.csv",
        [APPA_HEADER, ["005613.jpg", 36, 70.5, 6.2, 72], ["005614.jpg", 36, 150, 5, 150]],
    )
    for split, name in [
        ("train", "000000.jpg"),
        ("train", "000001.jpg"),
        ("train", "000002.jpg"),
        ("valid", "005613.jpg"),
        ("valid", "005614.jpg"),
    ]:
        write(root / split / name, jpeg_bytes())
        write(root / split / f"{name}_face.jpg", jpeg_bytes((1, 2, 3)))
    return root


def test_appa_real_real_age_face_crops(tmp_path: Path) -> None:
    root = make_appa(tmp_path / "appa-real-release")
    recs, report = run(iter_appa_real, root, splits=["train", "valid"])
    assert labels(recs) == {
        "train_000000": (4.0, None, None, None, None),
        "train_000001": (18.0, None, None, None, None),
        "valid_005613": (72.0, None, None, None, None),
    }
    assert recs[0].source.endswith("000000.jpg_face.jpg")
    assert dict(report.skipped) == {"bad_age": 1, "missing_file": 1, "age_out_of_range": 1}


def test_appa_real_apparent_full_images(tmp_path: Path) -> None:
    root = make_appa(tmp_path / "appa")
    recs, report = run(iter_appa_real, root, splits="train", label="apparent", face=False)
    assert labels(recs) == {
        "train_000000": (5.0, 1.1466, None, None, None),
        "train_000001": (20.394737, 4.3282, None, None, None),
    }
    assert recs[0].source.endswith("000000.jpg")
    assert dict(report.skipped) == {"bad_age": 1, "missing_file": 1}


def test_appa_real_missing_split_and_bad_label(tmp_path: Path) -> None:
    root = make_appa(tmp_path / "appa")
    with pytest.raises(FileNotFoundError, match=r"gt_avg_test\.csv"):
        list(iter_appa_real(root, ImportReport()))  # default splits include test
    with pytest.raises(ValueError, match="label"):
        list(iter_appa_real(root, ImportReport(), label="both"))


# ------------------------------------------------------------------------------- MIVIA


def test_mivia(tmp_path: Path) -> None:
    root = tmp_path / "mivia"
    images = root / "training_caip_contest"
    write(images / "n000002" / "0001_01.jpg", jpeg_bytes())
    write(images / "n000002" / "0002_01.jpg", jpeg_bytes())
    write(images / "n000010" / "0031_02.jpg", jpeg_bytes())
    write(images / "n000011" / "0001_01.jpg", b"junk")
    write(images / "n000012" / "0001_01.jpg", jpeg_bytes())
    write_csv(
        root / "training_caip_contest.csv",
        [
            ["n000002/0001_01.jpg", 26],
            ["n000002/0002_01.jpg", "26.5"],
            ["n000010/0031_02.jpg", 81],
            ["n000011/0001_01.jpg", 30],  # not an image
            ["n000099/0001_01.jpg", 30],  # missing
            ["n000012/0001_01.jpg", "abc"],
            ["n000012/0001_01.jpg", 300],
            ["lonely"],
        ],
    )
    for target in (root, root / "training_caip_contest.csv"):
        recs, report = run(iter_mivia, target)
        assert labels(recs) == {
            "n000002_0001_01": (26.0, None, None, None, "n000002"),
            "n000002_0002_01": (26.5, None, None, None, "n000002"),
            "n000010_0031_02": (81.0, None, None, None, "n000010"),
        }
        assert dict(report.skipped) == {
            "not_image": 1,
            "missing_file": 1,
            "bad_age": 1,
            "age_out_of_range": 1,
            "bad_row": 1,
        }


def test_mivia_header_and_images_root(tmp_path: Path) -> None:
    write(tmp_path / "imgs" / "n1" / "a.jpg", jpeg_bytes())
    csv_path = write_csv(tmp_path / "labels.csv", [["path", "age"], ["n1/a.jpg", 40]])
    recs, report = run(iter_mivia, csv_path, images_root=tmp_path / "imgs")
    assert labels(recs) == {"n1_a": (40.0, None, None, None, "n1")}
    assert report.total_skipped == 0  # the header row is not a data row


# ------------------------------------------------------------------------------- Morph II

MORPH_HEADER = ["id_num", "picture_num", "dob", "doa", "race", "gender", "age", "photo"]


def test_morph(tmp_path: Path) -> None:
    root = tmp_path / "morph"
    write(root / "Album2" / "003307_0M20.JPG", jpeg_bytes())
    write(root / "Album2" / "003307_1M22.JPG", jpeg_bytes())
    write(root / "Album2" / "046920_2F35.JPG", jpeg_bytes())
    write(root / "Album2" / "100000_0F40.JPG", jpeg_bytes())
    write(root / "Album2" / "100001_0F40.JPG", jpeg_bytes())
    write_csv(
        root / "morph.csv",
        [
            MORPH_HEADER,
            ["3307", 0, "05/15/1983", "06/01/2003", "B", "M", 20, "Album2/003307_0M20.JPG"],
            ["3307", 1, "05/15/1983", "06/01/2005", "W", "M", "", "Album2/003307_1M22.JPG"],
            ["46920", 2, "1/1/1970", "1/1/2005", "H", "F", 35, "Album2/046920_2F35.JPG"],
            ["100000", 0, "", "", "X", "F", 40, "Album2/100000_0F40.JPG"],  # bad race
            ["100001", 0, "", "", "A", "Q", 40, "Album2/100001_0F40.JPG"],  # bad gender
            ["100002", 0, "", "", "A", "F", 40, "Album2/missing.JPG"],
            ["100003", 0, "", "", "A", "F", "", "Album2/100000_0F40.JPG"],  # no age, no dates
        ],
    )
    recs, report = run(iter_morph, root / "morph.csv")
    assert labels(recs) == {
        "Album2_003307_0M20": (20.0, None, 0, 1, "3307"),
        "Album2_003307_1M22": (22.0, None, 0, 0, "3307"),  # age from dob/doa (birthday passed)
        "Album2_046920_2F35": (35.0, None, 1, 4, "46920"),
    }
    assert dict(report.skipped) == {
        "bad_race": 1,
        "bad_gender": 1,
        "missing_file": 1,
        "bad_date": 1,
    }


def test_morph_path_template_and_column_options(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write(root / "img" / "000123_04M33.JPG", jpeg_bytes())
    write_csv(
        root / "meta.csv",
        [["ID", "pic", "Age", "Sex", "Ethnicity"], ["123", "04", 33, "M", "W"]],
    )
    recs, _ = run(
        iter_morph,
        root / "meta.csv",
        path_template="img/{ID:0>6}_{pic}{Sex}{Age}.JPG",
        id_col="ID",
        gender_col="Sex",
    )
    assert labels(recs) == {"img_000123_04M33": (33.0, None, 0, 0, "123")}
    with pytest.raises(ValueError, match="path_col"):
        list(iter_morph(root / "meta.csv", ImportReport()))


# ------------------------------------------------------------------------------- folders


def test_folders(tmp_path: Path) -> None:
    root = tmp_path / "casia"
    write(root / "0000045" / "001.jpg", jpeg_bytes())
    write(root / "0000045" / "002.png", png_bytes())
    write(root / "0000099" / "deep" / "003.jpg", jpeg_bytes())
    write(root / "0000099" / "notes.txt", b"x")
    write(root / "stray.jpg", jpeg_bytes())
    recs, report = run(iter_folders, root)
    assert labels(recs) == {
        "0000045_001": (None, None, None, None, "0000045"),
        "0000045_002": (None, None, None, None, "0000045"),
        "0000099_deep_003": (None, None, None, None, "0000099"),
    }
    assert dict(report.skipped) == {"not_image_file": 1, "no_identity_folder": 1}


# ------------------------------------------------------------------------------- generic csv


def test_generic_csv(tmp_path: Path) -> None:
    write(tmp_path / "data" / "a.jpg", jpeg_bytes())
    write(tmp_path / "data" / "sub" / "b.png", png_bytes())
    absolute = write(tmp_path / "elsewhere" / "c.jpg", jpeg_bytes())
    write(tmp_path / "data" / "d.jpg", jpeg_bytes())
    write(tmp_path / "data" / "e.jpg", jpeg_bytes())
    write_csv(
        tmp_path / "data" / "labels.csv",
        [
            ["path", "age", "age_std", "gender", "race", "identity"],
            ["a.jpg", 30, 2.5, "male", "asian", "p1"],
            ["sub/b.png", "7", "", "F", "3", "p2"],
            [str(absolute), 70.5, 4, 1, "Other", ""],
            ["d.jpg", 40, "", "unknown", "white", ""],  # bad gender
            ["e.jpg", 40, "", 0, "martian", ""],  # bad race
            ["a.jpg", -1, "", "", "", ""],  # out of range
            ["nothere.jpg", 40, "", "", "", ""],
        ],
    )
    recs, report = run(iter_csv, tmp_path / "data" / "labels.csv")
    assert labels(recs) == {
        "a": (30.0, 2.5, 0, 2, "p1"),
        "sub_b": (7.0, None, 1, 3, "p2"),
        re.sub(r"[^A-Za-z0-9_-]+", "_", str(absolute.with_suffix(""))).strip("_"): (
            70.5,
            4.0,
            1,
            4,
            None,
        ),
    }
    assert dict(report.skipped) == {
        "bad_gender": 1,
        "bad_race": 1,
        "age_out_of_range": 1,
        "missing_file": 1,
    }
    assert dict(report.partial) == {"missing_age_std": 1, "missing_identity": 1}


def test_generic_csv_missing_required_column(tmp_path: Path) -> None:
    p = write_csv(tmp_path / "l.csv", [["file", "age"], ["a.jpg", 3]])
    with pytest.raises(ValueError, match=r"'path'.*\['file', 'age'\]"):
        list(iter_csv(p, ImportReport()))


def test_progress_option_accepted(tmp_path: Path) -> None:
    write(tmp_path / "u" / "25_0_1_20170116174525125.jpg.chip.jpg", jpeg_bytes())
    recs, report = run(iter_utkface, tmp_path / "u", progress=True)
    assert len(recs) == 1 and report.imported == 1
    assert Counter(r.source for r in recs)


# ------------------------------------------------------------------------------ names are bytes


def test_non_utf8_identity_folder_is_one_identity(tmp_path: Path) -> None:
    """A folder named in Latin-1 (not UTF-8) is imported as an identity written with \\xNN,
    and the records go through the shard writer (hashing, JSON, manifest) without error."""
    from ageray.data.shards import write_shards

    root = os.fsencode(tmp_path / "ids")
    for p, person in enumerate((b"caf\xe9", b"caf\xe8", b"bob")):
        for i in range(2):
            color = (200, 120 + 10 * p, 90 + 10 * i)  # other bytes: the writer drops copies
            path = Path(os.fsdecode(os.path.join(root, person, b"img%d\xff.jpg" % i)))
            write(path, jpeg_bytes(color))
    recs, report = run(iter_folders, os.fsdecode(root))
    assert report.imported == 6 and report.total_skipped == 0
    assert Counter(r.identity for r in recs) == {"bob": 2, "caf\\xe8": 2, "caf\\xe9": 2}
    assert all(KEY_RE.match(r.key) for r in recs) and len({r.key for r in recs}) == 6
    assert all("\\xff.jpg" in r.source for r in recs)
    m = write_shards(iter(recs), tmp_path / "shards", splits="train=1", progress=False)
    assert m["num_identities"] == 3 and m["splits"]["train"]["count"] == 6


def test_non_utf8_bytes_in_a_csv_import_or_count_the_row(tmp_path: Path) -> None:
    """One non-UTF-8 byte in a path cell still names its file; in an identity cell it is
    kept as \\xNN; in the age cell the row is counted as bad_age. Nothing aborts."""
    data = tmp_path / "data"
    write(Path(os.fsdecode(os.fsencode(data) + b"/caf\xe9.jpg")), jpeg_bytes())
    write(data / "b.jpg", jpeg_bytes())
    (data / "labels.csv").write_bytes(
        b"path,age,identity\ncaf\xe9.jpg,30,p\xff1\nb.jpg,4\xff0,p2\nb.jpg,40,p2\n"
    )
    recs, report = run(iter_csv, data / "labels.csv")
    assert labels(recs) == {
        "caf": (30.0, None, None, None, "p\\xff1"),
        "b": (40.0, None, None, None, "p2"),
    }
    assert dict(report.skipped) == {"bad_age": 1}
    assert report.examples["bad_age"] == ["labels.csv:3"]


def test_a_csv_row_the_reader_cannot_parse_is_a_bad_row(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", jpeg_bytes())
    big = "x" * (csv.field_size_limit() + 10)
    (tmp_path / "l.csv").write_text(f"path,age\na.jpg,30\n{big},3\na.jpg,31\n")
    recs, report = run(iter_csv, tmp_path / "l.csv")
    assert [r.age for r in recs] == [30.0, 31.0]
    assert dict(report.skipped) == {"bad_row": 1}


def test_bad_labels_in_csvs_are_counted_by_reason(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", jpeg_bytes())
    rows = [["path", "age", "age_std", "gender", "race"], ["a.jpg", 30, "", 0, 0]]
    rows += [["a.jpg", a, "", 0, 0] for a in ("nan", "inf", "-inf", "1e999", "x", "130", "-1")]
    rows += [["a.jpg", 30, "nan", 0, 0], ["a.jpg", 30, "", 2, 0], ["a.jpg", 30, "", 0, 5]]
    recs, report = run(iter_csv, write_csv(tmp_path / "l.csv", rows))
    assert len(recs) == 1
    assert dict(report.skipped) == {
        "bad_age": 5,
        "age_out_of_range": 2,
        "bad_age_std": 1,
        "bad_gender": 1,
        "bad_race": 1,
    }


def test_utkface_names_with_undecodable_bytes_or_huge_numbers_are_counted(tmp_path: Path) -> None:
    """Tar member names are bytes too: a non-UTF-8 byte imports, 5,000-digit numbers (past
    Python's int-conversion limit) and race codes past 4 are counted."""
    names = [
        b"25_0_1_20170116174525125\xff.jpg.chip.jpg",
        b"9" * 5000 + b"_0_1_2017.jpg",
        b"30_1_9999999_20170116174525125.jpg",
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(jpeg_bytes())
            tar.addfile(info, io.BytesIO(jpeg_bytes()))
    recs, report = run(iter_utkface, write(tmp_path / "u.tar", buf.getvalue()))
    assert [(r.age, r.gender, r.race) for r in recs] == [(25.0, 0, 1)]
    assert "\\xff" in recs[0].source
    assert dict(report.skipped) == {"bad_age": 1, "bad_race": 1}


def test_csv_usage_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    from ageray.data.records import InputError

    nocol = write_csv(tmp_path / "nocol.csv", [["file", "age"], ["a.jpg", 3]])
    with pytest.raises(InputError) as e:
        list(iter_csv(nocol, ImportReport()))
    assert "importer option path_col=<column name>" in str(e.value)
    assert "(rename the column)" not in str(e.value) and "(csv)" not in str(e.value)
    recs, _ = run(
        iter_csv,
        write_csv(tmp_path / "other.csv", [["file", "years"]]),
        path_col="file",
        age_col="years",
    )
    assert recs == []
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.csv is empty"):
        list(iter_csv(tmp_path / "empty.csv", ImportReport()))
    appa = tmp_path / "appa"
    write_csv(appa / "gt_avg_test.csv", [["file_name", "apparent_age_avg"], ["x.jpg", 3]])
    with pytest.raises(InputError, match="column names are fixed") as e:
        list(iter_appa_real(appa, ImportReport(), splits=["test"]))
    assert "Pass" not in str(e.value)
