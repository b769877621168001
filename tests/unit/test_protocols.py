"""The papers' evaluation protocols on real (small, synthetic) shards: by identity or at
random, k-fold, leave one person out and an official split list. Each test reads the tar
files actually written and checks the protocol's promise: no identity in two splits where it
promises that, folds that partition the data, the held-out person alone in test."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
from datagen import make_records

from ageray.data.protocols import SplitProtocol, read_split_list
from ageray.data.records import InputError
from ageray.data.shards import write_shards


def write(records, out: Path, protocol: SplitProtocol | None = None, **kw):
    return write_shards(iter(records), out, workers=2, progress=False, protocol=protocol, **kw)


def samples(root: Path) -> dict[str, dict[str, str | None]]:
    """split -> key -> identity name, from the tar files on disk."""
    out: dict[str, dict[str, str | None]] = defaultdict(dict)
    for tar_path in sorted(root.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                if ext == "json":
                    labels = json.loads(tar.extractfile(m).read())
                    out[tar_path.parent.name][key] = labels["identity_name"]
    return out


def splits_of_identity(by_split: dict[str, dict[str, str | None]]) -> dict[str, set[str]]:
    where: dict[str, set[str]] = defaultdict(set)
    for split, keys in by_split.items():
        for ident in keys.values():
            where[str(ident)].add(split)
    return where


RECORDS = make_records(240, identities=30)  # 8 images per person
ALL_KEYS = {r.key for r in RECORDS}


def test_identity_protocol_keeps_people_apart_and_is_the_default(tmp_path: Path) -> None:
    m = write(RECORDS, tmp_path / "p", SplitProtocol(seed=2), seed=2)
    default = write(RECORDS, tmp_path / "d", seed=2)  # no protocol: the same rule
    assert m["splits"] == default["splits"]
    assert m["options"]["protocol"] == {
        "name": "fractions",
        "split_by": "identity",
        "seed": 2,
        "fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
    }
    where = splits_of_identity(samples(tmp_path / "p"))
    assert all(len(s) == 1 for s in where.values())


def test_random_protocol_splits_samples_not_people(tmp_path: Path) -> None:
    """Morph's "random 80-20": samples are split one by one, so people straddle splits."""
    m = write(RECORDS, tmp_path, SplitProtocol({"train": 0.8, "test": 0.2}, split_by="random"))
    by_split = samples(tmp_path)
    assert set().union(*(set(k) for k in by_split.values())) == ALL_KEYS
    assert 0.7 < m["splits"]["train"]["count"] / 240 < 0.9
    straddle = [i for i, s in splits_of_identity(by_split).items() if len(s) > 1]
    assert len(straddle) > 10  # with 8 images each, most people are in both splits
    assert m["options"]["protocol"]["split_by"] == "random"


@pytest.mark.parametrize("split_by", ["identity", "random"])
def test_k_fold_test_splits_partition_the_data(tmp_path: Path, split_by: str) -> None:
    k = 4
    tests: list[set[str]] = []
    for fold in range(k):
        proto = SplitProtocol(folds=k, fold=fold, split_by=split_by, seed=5)
        m = write(RECORDS, tmp_path / f"f{fold}", proto)
        assert m["options"]["protocol"]["name"] == "k-fold"
        assert m["options"]["protocol"]["fold"] == fold and m["options"]["splits"] is None
        by_split = samples(tmp_path / f"f{fold}")
        assert set(by_split) == {"train", "val", "test"}
        # every sample once per fold
        keys = [k_ for s in by_split.values() for k_ in s]
        assert len(keys) == len(set(keys)) == 240
        tests.append(set(by_split["test"]))
        if split_by == "identity":  # nobody in two splits, val included
            assert all(len(s) == 1 for s in splits_of_identity(by_split).values())
    # the K test splits are disjoint and together cover the data: a partition
    assert sum(len(t) for t in tests) == 240 and set().union(*tests) == ALL_KEYS
    sizes = sorted(len(t) for t in tests)
    unit = 8 if split_by == "identity" else 1  # folds differ by at most one group
    assert sizes[-1] - sizes[0] <= unit


def test_leave_one_person_out(tmp_path: Path) -> None:
    persons = sorted({r.identity for r in RECORDS})
    held_out = set()
    for fold in (0, 7, 29):
        m = write(RECORDS, tmp_path / f"l{fold}", SplitProtocol(lopo=True, fold=fold))
        by_split = samples(tmp_path / f"l{fold}")
        test_people = set(by_split["test"].values())
        assert test_people == {persons[fold]} and m["splits"]["test"]["count"] == 8
        others = set(by_split["train"].values()) | set(by_split["val"].values())
        assert persons[fold] not in others and len(others) == 29
        held_out |= test_people
        assert m["options"]["protocol"]["name"] == "lopo" and m["num_identities"] == 30
    assert len(held_out) == 3
    with pytest.raises(InputError, match="there are 30 persons"):
        write(RECORDS, tmp_path / "bad", SplitProtocol(lopo=True, fold=30))
    with pytest.raises(InputError, match="needs records with identities"):
        write(make_records(10), tmp_path / "noid", SplitProtocol(lopo=True, fold=0))


def test_splits_from_a_file(tmp_path: Path) -> None:
    lines = ["name,split", "# the official list"]
    lines += [f"{r.key},test" for r in RECORDS[:20]]
    lines += [f"{r.key}\ttrain" for r in RECORDS[20:200]]
    lines += ["p029 val"]  # an identity: all of its images
    listed = read_split_list("\n".join(lines), "official.csv")
    m = write(RECORDS, tmp_path, SplitProtocol(split_list=listed, split_list_source="off.csv"))
    by_split = samples(tmp_path)
    assert set(by_split["test"]) == {r.key for r in RECORDS[:20]}
    assert set(by_split["train"]) == {r.key for r in RECORDS[20:200]}
    # keys listed by name win over their identity's line; unlisted samples are dropped
    p29 = {r.key for r in RECORDS[200:] if r.identity == "p029"}
    assert set(by_split["val"]) == p29
    assert m["skipped"]["not_in_split_list"] == 40 - len(p29)
    assert m["options"]["protocol"] == {
        "name": "splits-from",
        "split_by": "identity",
        "seed": 0,
        "source": "off.csv",
    }


def test_protocol_errors_name_the_fix() -> None:
    with pytest.raises(InputError, match="choose one of"):
        SplitProtocol(folds=3, fold=0, lopo=True)
    with pytest.raises(InputError, match="need --fold"):
        SplitProtocol(folds=3)
    with pytest.raises(InputError, match="out of range"):
        SplitProtocol(folds=3, fold=3)
    with pytest.raises(InputError, match="needs --split-by identity"):
        SplitProtocol(lopo=True, fold=0, split_by="random")
    with pytest.raises(InputError, match="listed in both"):
        read_split_list("a,train\na,test")
    with pytest.raises(InputError, match="two fields"):
        read_split_list("a,train,extra")
    with pytest.raises(InputError, match="lists no sample"):
        read_split_list("# nothing\n")


def test_make_shards_protocol_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.make_shards import main

    base = ["--source", "synthetic", "--num-samples", "48", "--image-size", "32", "--quiet"]
    out = tmp_path / "kf"
    assert main([*base, "--output", str(out), "--folds", "3", "--fold", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["protocol"]["name"] == "k-fold"
    assert main([*base, "--output", str(tmp_path / "x"), "--folds", "3"]) == 2
    assert "need --fold" in capsys.readouterr().err
    listing = tmp_path / "list.csv"
    listing.write_text("syn_00000_00,test\nsyn_00001,train\n")  # a key; an identity
    out = tmp_path / "sf"
    assert main([*base, "--output", str(out), "--splits-from", str(listing)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"test": 1, "train": 8}
    assert main([*base, "--output", str(out), "--splits-from", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
