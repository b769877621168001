"""The shard writer (ageray.data.shards) on local folders: splits, manifest, caps, atomic
writes and idempotent re-runs. No Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import pytest
from datagen import jpeg, make_records

from ageray.data import shards as shards_mod
from ageray.data.manifest import manifest_summary
from ageray.data.records import ImportReport, Record
from ageray.data.samplers import age_class
from ageray.data.shards import write_shards
from ageray.data.splits import assign_split, parse_splits


def read_samples(root: Path) -> dict[str, dict[str, dict]]:
    """split -> key -> label json, from the tar files actually on disk."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for tar_path in sorted(root.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "json":
                    labels = json.loads(tar.extractfile(m).read())
                    assert key not in out[tar_path.parent.name], f"duplicate {key}"
                    out[tar_path.parent.name][key] = labels
    return out


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def write(records, out: Path, **kw):
    kw.setdefault("workers", 2)
    kw.setdefault("progress", False)
    return write_shards(iter(records), out, **kw)


# ------------------------------------------------------------------------------ splits


def test_parse_splits() -> None:
    assert parse_splits("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert parse_splits({"test": 1}) == {"test": 1.0}
    for bad in ("train=0.8,val=0.1", "train", "train=x,test=1", "a=0.5,a=0.5", "a/b=1", ""):
        with pytest.raises(ValueError):
            parse_splits(bad)


def test_identity_split_is_disjoint_and_deterministic(tmp_path: Path) -> None:
    records = make_records(200, identities=40)
    m1 = write(records, tmp_path / "a", max_count=16, seed=3)
    m2 = write(records, tmp_path / "b", max_count=16, seed=3, workers=1)
    samples = read_samples(tmp_path / "a")
    where: dict[str, set[str]] = defaultdict(set)
    for split, by_key in samples.items():
        for labels in by_key.values():
            where[labels["identity_name"]].add(split)
    assert len(where) == 40
    assert all(len(s) == 1 for s in where.values()), "an identity spans two splits"
    assert {s for ss in where.values() for s in ss} == {"train", "val", "test"}
    assert sum(len(v) for v in samples.values()) == 200
    # byte-identical shards, whatever the number of threads
    assert m1["splits"] == m2["splits"]
    # a different seed gives a different split
    m3 = write(records, tmp_path / "c", max_count=16, seed=4)
    assert m3["splits"]["train"]["count"] != m1["splits"]["train"]["count"] or (
        m3["splits"]["train"]["shards"] != m1["splits"]["train"]["shards"]
    )


def test_identity_index_is_contiguous_over_sorted_names(tmp_path: Path) -> None:
    records = make_records(60, identities=12)
    m = write(records, tmp_path, splits={"train": 0.5, "test": 0.5})
    assert m["num_identities"] == 12
    names = sorted({r.identity for r in records})
    for by_key in read_samples(tmp_path).values():
        for labels in by_key.values():
            assert labels["identity"] == names.index(labels["identity_name"])
    assert m["splits"]["train"]["identities"] + m["splits"]["test"]["identities"] == 12


def test_test_fraction_one_puts_everything_in_test(tmp_path: Path) -> None:
    m = write(make_records(30, identities=5), tmp_path, splits="test=1")
    assert list(m["splits"]) == ["test"]
    assert m["splits"]["test"]["count"] == 30
    assert set(read_samples(tmp_path)) == {"test"}


def test_key_split_without_identities_is_stable_when_data_grows() -> None:
    splits = parse_splits("train=0.8,val=0.1,test=0.1")
    keys = [f"img{i}" for i in range(2000)]
    first = {k: assign_split(f"key:{k}", splits, 0) for k in keys[:1000]}
    again = {k: assign_split(f"key:{k}", splits, 0) for k in keys}
    assert all(again[k] == v for k, v in first.items())
    share = sum(v == "train" for v in again.values()) / len(again)
    assert 0.75 < share < 0.85


# ------------------------------------------------------------------------------ manifest


def test_manifest_contents_and_skips(tmp_path: Path) -> None:
    records = make_records(50, identities=None)
    records[3] = dataclasses.replace(records[3], image=b"this is not an image")
    records[4] = dataclasses.replace(records[4], image=jpeg(4, 64)[:150])
    records[5] = dataclasses.replace(records[5], age=float("nan"))
    records.append(dataclasses.replace(records[10], source="dup"))  # duplicate key
    report = ImportReport(source="unit")
    report.imported = 51
    report.skip("bad_name", "x.jpg")
    m = write(
        records,
        tmp_path,
        report=report,
        source="unit",
        input="/data/x",
        options={"align": False},
        max_count=8,
    )
    assert m["format"] == "ageray-shards/1"
    assert m["source"] == "unit" and m["input"] == "/data/x"
    assert m["options"]["align"] is False and m["options"]["max_count"] == 8
    assert m["import"]["skipped"] == {"bad_name": 1}
    assert m["skipped"] == {"bad_age": 1, "duplicate_key": 1, "not_image": 1, "truncated": 1}
    assert m["skipped_examples"]["duplicate_key"] == ["dup"]
    assert m["align"] == {"enabled": False}
    assert m["num_identities"] == 0
    total = 0
    for split in m["splits"].values():
        total += split["count"]
        assert split["count"] == sum(s["count"] for s in split["shards"])
        assert sum(split["age_hist"].values()) == split["count"]
        assert split["fields"] == ["age", "gender", "race"]
        assert split["image_size"] == {"min": [24, 24], "max": [24, 24], "mean": [24.0, 24.0]}
        for s in split["shards"]:
            path = tmp_path / s["name"]
            assert path.stat().st_size == s["bytes"]
            assert shards_mod.storage.sha256(path) == s["sha256"]
            assert sum(s["age_hist"].values()) == s["count"]
    assert total == 47
    text = manifest_summary(m, str(tmp_path))
    assert "47 samples written" in text and "manifest.json" in text and "truncated=1" in text


def test_sample_members_and_labels(tmp_path: Path) -> None:
    rec = Record(
        key="abc_1", image=jpeg(1), age=33.5, age_std=2.0, gender=1, race=None, identity="bob"
    )
    write([rec], tmp_path, splits={"test": 1})
    with tarfile.open(tmp_path / "test" / "test-000000.tar") as tar:
        names = tar.getnames()
        labels = json.loads(tar.extractfile("abc_1.json").read())
        info = tar.getmember("abc_1.jpg")
    assert names == ["abc_1.jpg", "abc_1.json"]
    assert labels == {
        "age": 33.5,
        "age_std": 2.0,
        "gender": 1,
        "race": None,
        "identity": 0,
        "identity_name": "bob",
        "box": None,
    }
    assert info.mtime == 0 and info.uid == 0  # fixed headers: byte-identical re-runs


def test_non_jpeg_png_formats_are_stored_as_png(tmp_path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (1, 2, 3)).save(buf, "BMP")
    write([Record(key="bmp", image=buf.getvalue(), age=3.0)], tmp_path, splits="test=1")
    with tarfile.open(tmp_path / "test" / "test-000000.tar") as tar:
        assert tar.getnames() == ["bmp.png", "bmp.json"]


def test_caps_and_head_of_every_split(tmp_path: Path) -> None:
    ages = [*([30] * 20), *range(1, 80)]
    records = make_records(300, ages=ages)
    m = write(records, tmp_path / "count", max_count=7, splits="train=0.7,test=0.3")
    for split in m["splits"].values():
        assert all(s["count"] <= 7 for s in split["shards"])
    size = 6 * 2048
    m = write(records, tmp_path / "bytes", max_count=1000, max_bytes=size)
    for name, split in m["splits"].items():
        assert len(split["shards"]) > 1
        for s in split["shards"]:
            assert (tmp_path / "bytes" / s["name"]).stat().st_size <= size
        # the first shards hold one sample of every age class of the split, in class order
        classes = sorted({age_class(int(a)) for a in split["age_hist"]})
        first = read_samples(tmp_path / "bytes")[name]
        first_keys = list(first)[: len(classes)]
        assert [age_class(first[k]["age"]) for k in first_keys] == classes


def test_transform_hook_drops_and_rewrites(tmp_path: Path) -> None:
    calls = []

    def transform(rec: Record) -> Record | None:
        calls.append(rec.key)
        if rec.key.endswith("3"):
            return None
        out = dataclasses.replace(rec, image=jpeg(99, 16))
        out.box = [1.0, 2.0, 3.0, 4.0]  # type: ignore[attr-defined]
        return out

    m = write(
        make_records(20),
        tmp_path,
        transform=transform,
        align_stats=lambda: {"detected": 18},
        splits="test=1",
    )
    assert len(calls) == 20
    assert m["skipped"] == {"transform_dropped": 2}
    assert m["align"] == {"enabled": True, "detected": 18}
    split = m["splits"]["test"]
    assert split["count"] == 18 and split["image_size"]["max"] == [16, 16]
    assert "box" in split["fields"]
    labels = read_samples(tmp_path)["test"]
    assert all(v["box"] == [1.0, 2.0, 3.0, 4.0] for v in labels.values())


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    write(make_records(12), tmp_path, splits="test=1")
    ds = wds.WebDataset(str(tmp_path / "test" / "test-000000.tar"), shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 12
    assert all({"jpg", "json"} <= set(s) for s in samples)


# ------------------------------------------------------------------------------ atomicity


def test_failure_mid_shard_leaves_no_partial_shard_and_no_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = make_records(40)
    write(records, tmp_path, max_count=10, splits="test=1")  # an earlier good run
    assert (tmp_path / "manifest.json").exists()
    real = shards_mod._labels_json
    calls = {"n": 0}

    def failing(entry, index):
        calls["n"] += 1
        if calls["n"] > 40 + 15:  # pass 1 computes all 40; pass 2 fails inside shard 1
            raise OSError("disk full (injected)")
        return real(entry, index)

    monkeypatch.setattr(shards_mod, "_labels_json", failing)
    before = (tmp_path / "test" / "test-000001.tar").read_bytes()
    with pytest.raises(OSError, match="injected"):
        write(records, tmp_path, max_count=10, splits="test=1", workers=1)
    # the shard being written was never replaced by a partial one; no temp files remain
    assert (tmp_path / "test" / "test-000001.tar").read_bytes() == before
    assert not [f for f in files(tmp_path) if ".tmp-" in f]
    # the old manifest is gone: readers get "run make_shards first", not mismatched data
    assert not (tmp_path / "manifest.json").exists()


def test_killed_writer_leaves_no_final_file_and_rerun_cleans_up(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of ``atomic_write``: the final name never appears; the
    next run of the writer removes the crashed temp file."""
    target = tmp_path / "test" / "test-000000.tar"
    code = textwrap.dedent(
        f"""
        import sys, time
        from ageray.data.storage import atomic_write
        with atomic_write({str(target)!r}) as fh:
            fh.write(b"x" * 100000)
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    leftovers = [f for f in files(tmp_path) if ".tmp-" in f]
    assert len(leftovers) == 1
    write(make_records(5), tmp_path, splits="test=1")
    assert files(tmp_path) == ["manifest.json", "test/test-000000.tar"]


def test_rerun_overwrites_and_removes_stale_shards(tmp_path: Path) -> None:
    records = make_records(90, identities=30)
    m1 = write(records, tmp_path, max_count=5)
    n1 = sum(len(s["shards"]) for s in m1["splits"].values())
    m2 = write(records, tmp_path, max_count=40)
    listed = sorted(s["name"] for sp in m2["splits"].values() for s in sp["shards"])
    assert len(listed) < n1
    assert files(tmp_path) == sorted(["manifest.json", *listed])
    assert sum(len(v) for v in read_samples(tmp_path).values()) == 90
    # a third identical run changes nothing
    start = time.time()
    m3 = write(records, tmp_path, max_count=40)
    assert m3["splits"] == m2["splits"]
    assert files(tmp_path) == sorted(["manifest.json", *listed])
    assert time.time() - start < 30
    # switching to test=1 removes the train/val shards of the earlier layout
    write(records, tmp_path, splits="test=1", max_count=40)
    assert {f.split("/")[0] for f in files(tmp_path)} == {"manifest.json", "test"}


def test_argument_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        write(make_records(2), tmp_path, splits="train=0.5")
    with pytest.raises(ValueError, match="max_count"):
        write(make_records(2), tmp_path, max_count=0)
    with pytest.raises(TypeError, match="Record"):
        write([{"key": "x"}], tmp_path)


def test_writer_applies_the_one_label_check(tmp_path: Path) -> None:
    """Records from any code pass the importers' label rule before they reach a shard."""
    records = make_records(12)
    bad = {
        0: {"age": 150.0},
        1: {"age": float("inf")},
        2: {"age": -3.0},
        3: {"gender": 2},
        4: {"race": 9},
        5: {"age_std": float("nan")},
    }
    for i, change in bad.items():
        records[i] = dataclasses.replace(records[i], **change)
    m = write(records, tmp_path, splits="train=1")
    assert m["skipped"] == {
        "age_out_of_range": 2,
        "bad_age": 1,
        "bad_gender": 1,
        "bad_race": 1,
        "bad_age_std": 1,
    }
    assert m["splits"]["train"]["count"] == 6
    assert sorted(read_samples(tmp_path)["train"]) == [r.key for r in records[6:]]


# ------------------------------------------------------------------------------ tar reading


def _tar(fmt: int, members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_stream_tar_reader_matches_tarfile(fmt: int) -> None:
    import io

    from ageray.data.tario import tar_members

    long = "k" * (150 if fmt != tarfile.USTAR_FORMAT else 90)
    members = [
        (f"{long}.jpg", jpeg(1)),
        (f"{long}.json", b"{}"),
        ("a/b.png", b"x" * 512),
        ("empty.txt", b""),
        ("big.bin", bytes(range(256)) * 40),
    ]
    data = _tar(fmt, members)
    assert list(tar_members(io.BytesIO(data))) == members
    gz = _tar(fmt, members, mode="w:gz")
    assert list(tar_members(io.BufferedReader(io.BytesIO(gz)))) == members


def test_stream_tar_reader_rejects_corrupt_and_truncated_data() -> None:
    import io

    from ageray.data.tario import tar_members

    data = _tar(tarfile.PAX_FORMAT, [("a.jpg", b"1" * 1000), ("a.json", b"{}")])
    corrupt = bytearray(data)
    corrupt[1536 + 10] ^= 0xFF  # inside the second header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(corrupt))))
    with pytest.raises(EOFError):
        list(tar_members(io.BytesIO(data[:1200])))
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(tar_members(io.BytesIO(b"")))
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(b"not a tar at all" * 64)))


# ------------------------------------------------------------------------------ the job


def test_make_shards_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.make_shards import main, parse_size

    assert parse_size("512M") == 512 * 1024**2 and parse_size("1000") == 1000
    out = tmp_path / "syn"
    rc = main(
        [
            "--source",
            "synthetic",
            "--num-samples",
            "24",
            "--image-size",
            "32",
            "--output",
            str(out),
            "--splits",
            "train=0.5,test=0.5",
            "--max-count",
            "5",
            "--quiet",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "24 samples written" in text and str(out / "manifest.json") in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "synthetic"
    assert manifest["options"]["importer"]["num_samples"] == 24
    assert manifest["num_identities"] == 3  # 8 images per identity
    assert sum(s["count"] for s in manifest["splits"].values()) == 24
    assert main(["--source", "utkface", "--output", str(out)]) == 2  # --input missing
    assert main(["--source", "synthetic", "--output", str(out), "--splits", "a=2"]) == 2


def _job(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from jobs.make_shards import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_make_shards_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "nocol.csv").write_text("file,age\na.jpg,3\n")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "out")
    cases = {
        "no column named 'path'": ["--source", "csv", "--input", str(tmp_path / "nocol.csv")],
        "empty.csv is empty": ["--source", "csv", "--input", str(tmp_path / "empty.csv")],
        "does not exist": ["--source", "utkface", "--input", str(tmp_path / "nothere")],
        "got an unexpected keyword argument 'bogus'": [
            "--source", "synthetic", "--importer-option", "bogus=1",
        ],
        "verify='maybe'": [
            "--source", "csv", "--input", str(tmp_path / "nocol.csv"),
            "--importer-option", "verify=maybe",
        ],
        "image_size=8 is too small": ["--source", "synthetic", "--image-size", "8"],
        "--max-count: '0' must be at least 1": ["--source", "synthetic", "--max-count", "0"],
        "invalid choice: 'imagenet'": ["--source", "imagenet"],
    }  # fmt: skip
    for expected, argv in cases.items():
        rc, err = _job([*argv, "--output", out, "--quiet"], capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("make_shards: ") and expected in err, err
        assert "\n" not in err and "Traceback" not in err, err
    assert (
        "importer option path_col=<column name>"
        in _job(
            ["--source", "csv", "--input", str(tmp_path / "nocol.csv"), "--output", out], capsys
        )[1]
    )
    rc, err = _job(["--source", "synthetic", "--output", str(tmp_path / "afile")], capsys)
    assert rc == 2 and "is an existing file" in err
    rc, err = _job(["--source", "synthetic", "--output", str(tmp_path / "afile" / "x")], capsys)
    assert rc == 2 and "which is an existing file" in err
    assert not (tmp_path / "out").exists()  # nothing was written for any of them


def test_make_shards_cli_imports_non_utf8_names(tmp_path: Path) -> None:
    """The real command line: a non-UTF-8 identity folder and a csv with a non-UTF-8 byte
    are imported (or the row counted), exit 0, no traceback."""
    root = os.fsencode(tmp_path / "ids")
    for person in (b"caf\xe9", b"bob"):
        for i in range(2):
            path = os.path.join(root, person, b"%d.jpg" % i)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(jpeg(i + 10 * len(person), 20))  # other bytes: no duplicates
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    with open(os.fsencode(csv_dir) + b"/caf\xe9.jpg", "wb") as f:
        f.write(jpeg(5, 20))
    (csv_dir / "l.csv").write_bytes(
        b"path,age,identity\ncaf\xe9.jpg,30,p\xff\ncaf\xe9.jpg,3\xff,p\n"
    )
    for source, inp, expect in (
        ("folders", os.fsdecode(root), "imported 4, skipped 0"),
        ("csv", str(csv_dir / "l.csv"), "skipped      1 bad_age"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.make_shards", "--source", source, "--input", inp,
             "--output", str(tmp_path / source), "--splits", "train=1", "--quiet"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and expect in proc.stdout, proc.stdout
    manifest = json.loads((tmp_path / "folders" / "manifest.json").read_text())
    assert manifest["num_identities"] == 2
