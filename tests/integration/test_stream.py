"""Shard streams through real DataLoader worker processes (forkserver), 2 ranks x 2 workers:
exact-once evaluation by key, equal training steps per rank, corrupt input skipped and
counted across processes, class-balanced streams, and the real UTKFace tar end to end."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from datagen import jpeg, label, make_records, tar_bytes, write_manual_shards

from ageray.config import DataConfig
from ageray.data.loader import eval_loader, train_loader
from ageray.data.manifest import read_manifest
from ageray.data.shards import write_shards
from ageray.data.splits import stable_unit

pytestmark = pytest.mark.integration

RANKS, WORKERS = 2, 2


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(
        shards=str(root),
        image_size=16,
        batch_size=8,
        eval_batch_size=7,
        num_workers=WORKERS,
        shuffle_buffer=50,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two shard sets of the same 160 records: many small shards (>= ranks*workers per
    split) and one shard per split (< ranks*workers)."""
    root = tmp_path_factory.mktemp("stream")
    records = make_records(160, ages=[*range(1, 60), *([25] * 40)], size=20)
    for name, max_count in (("many", 6), ("few", 1000)):
        write_shards(
            iter(records),
            root / name,
            splits="train=0.5,test=0.5",
            max_count=max_count,
            workers=2,
            progress=False,
        )
    return {"many": root / "many", "few": root / "few"}


def split_keys(root: Path, split: str) -> list[str]:
    import tarfile

    keys = []
    for s in read_manifest(str(root))["splits"][split]["shards"]:
        with tarfile.open(root / s["name"]) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".json")]
    return keys


@pytest.mark.parametrize("layout", ["many", "few"])
def test_eval_sees_every_sample_exactly_once(datasets: dict[str, Path], layout: str) -> None:
    root = datasets[layout]
    cfg = cfg_for(root)
    shards = read_manifest(str(root))["splits"]["test"]["shards"]
    assert (len(shards) >= RANKS * WORKERS) == (layout == "many")
    seen: list[str] = []
    for rank in range(RANKS):
        loader = eval_loader(cfg, "test", rank=rank, world_size=RANKS)
        n = 0
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 16, 16)
            assert len(batch["key"]) == batch["image"].shape[0] <= 7
            seen += batch["key"]
            n += len(batch["key"])
        assert n == loader.num_samples
        assert set(loader.skipped) >= {"not_image", "truncated", "no_label", "bad_shard"}
        assert not any(loader.skipped.values())
    expected = split_keys(root, "test")
    assert len(seen) == len(expected)
    assert Counter(seen) == Counter(expected)  # every key exactly once


def test_batch_format(datasets: dict[str, Path]) -> None:
    cfg = cfg_for(datasets["many"], num_workers=0)
    batch = next(iter(eval_loader(cfg, "test")))
    assert batch["image"].dtype == torch.float32
    assert batch["age"].dtype == batch["age_std"].dtype == torch.float32
    assert torch.isnan(batch["age_std"]).all()
    for name in ("gender", "race", "identity"):
        assert batch[name].dtype == torch.int64
    assert (batch["identity"] == -1).all()  # no identities in these records
    assert set(batch["gender"].tolist()) <= {0, 1}
    assert "__skipped__" not in batch
    assert set(batch) == {"image", "age", "age_std", "gender", "race", "identity", "key"}
    assert isinstance(batch["key"], list) and isinstance(batch["key"][0], str)


def test_eval_batches_equal_serving_preprocessing(datasets: dict[str, Path]) -> None:
    """What the eval stream feeds the model is bit-for-bit what Serve computes for the same
    image bytes (decode_image + preprocess_for_eval), through worker processes that reuse
    their shared-memory buffers: every batch is held until the end, none may change."""
    import tarfile

    from ageray.data.transforms import decode_image, preprocess_for_eval

    root = datasets["many"]
    cfg = cfg_for(root, image_size=12, eval_batch_size=3)
    batches = list(eval_loader(cfg, "test"))
    assert len(batches) > 8  # enough to cycle each worker's buffer ring
    raw: dict[str, bytes] = {}
    for s in read_manifest(str(root))["splits"]["test"]["shards"]:
        with tarfile.open(root / s["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    raw[m.name[:-4]] = tar.extractfile(m).read()
    for batch in batches:
        served = preprocess_for_eval(
            [decode_image(raw[k], target_size=cfg.image_size) for k in batch["key"]], cfg
        )
        assert torch.equal(batch["image"], served)


@pytest.mark.parametrize("layout", ["many", "few"])
def test_training_gives_equal_steps_per_rank(datasets: dict[str, Path], layout: str) -> None:
    root = datasets[layout]
    cfg = cfg_for(root)
    count = read_manifest(str(root))["splits"]["train"]["count"]
    steps = []
    keys_per_rank = []
    for rank in range(RANKS):
        loader = train_loader(cfg, "train", rank=rank, world_size=RANKS, epoch=1, seed=7)
        batches = list(loader)
        assert len(batches) == len(loader) == count // (RANKS * cfg.batch_size)
        assert all(b["image"].shape == (8, 3, 16, 16) for b in batches)
        steps.append(len(batches))
        keys_per_rank.append({k for b in batches for k in b["key"]})
    assert steps[0] == steps[1]
    assert not keys_per_rank[0] & keys_per_rank[1]  # ranks read disjoint data in an epoch


def test_training_repeats_when_steps_exceed_the_data(datasets: dict[str, Path]) -> None:
    cfg = cfg_for(datasets["many"], steps_per_epoch=25)
    loader = train_loader(cfg, "train", rank=1, world_size=RANKS)
    keys = Counter(k for b in loader for k in b["key"])
    assert sum(keys.values()) == 25 * 8  # more than rank 1's share: it repeats its shards


def test_training_order_depends_on_epoch_and_seed(datasets: dict[str, Path]) -> None:
    cfg = cfg_for(datasets["many"], num_workers=0, steps_per_epoch=3)

    def keys(**kw) -> list[str]:
        return [k for b in train_loader(cfg, "train", **kw) for k in b["key"]]

    assert keys(epoch=0, seed=1) == keys(epoch=0, seed=1)
    assert keys(epoch=0, seed=1) != keys(epoch=1, seed=1)


def test_class_balanced_training_stream(datasets: dict[str, Path]) -> None:
    root = datasets["many"]
    cfg = cfg_for(root, steps_per_epoch=60, batch_size=16)
    hist = read_manifest(str(root))["splits"]["train"]["age_hist"]
    freq: Counter[int] = Counter()
    steps = []
    for rank in range(RANKS):
        loader = train_loader(cfg, "train", rank=rank, world_size=RANKS, sampler="class")
        n = 0
        for b in loader:
            freq.update(int(a) for a in b["age"].tolist())
            n += 1
        steps.append(n)
    assert steps == [60, 60]
    assert set(freq) == {int(a) for a in hist}
    # age 25 is ~40x more frequent in the data than any other age; balanced it is not
    others = [v for a, v in freq.items() if a != 25]
    assert freq[25] < 3 * max(others)
    from scipy.stats import chisquare

    _, p = chisquare([freq[int(a)] for a in hist])
    assert p > 0.01


def test_age_aware_training_stream(datasets: dict[str, Path]) -> None:
    cfg = cfg_for(datasets["few"], steps_per_epoch=10, batch_size=16, num_workers=1)
    loader = train_loader(cfg, "train", sampler="age_aware")
    ages = [int(a) for b in loader for a in b["age"].tolist()]
    assert len(ages) == 160
    assert max(Counter(ages).values()) <= 8


# ------------------------------------------------------------------------------ corrupt input


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    good = [(f"g{i}", jpeg(i, 20), label(20 + i)) for i in range(5)]
    members: list[tuple[str, bytes]] = []
    for key, img, lab in good[:2]:
        members += [(f"{key}.jpg", img), (f"{key}.json", lab)]
    members += [("trunc.jpg", jpeg(50, 40)[:-60]), ("trunc.json", label(30))]
    members += [("text.jpg", b"definitely not an image"), ("text.json", label(31))]
    members += [("nolabel.jpg", jpeg(51, 20))]
    for key, img, lab in good[2:]:
        members += [(f"{key}.jpg", img), (f"{key}.json", lab)]
    empty = tar_bytes([])
    cut = tar_bytes(
        [m for i in range(6) for m in ((f"c{i}.jpg", jpeg(70 + i, 20)), (f"c{i}.json", label(40)))]
    )
    write_manual_shards(
        root,
        "test",
        [
            ("test/test-000000.tar", tar_bytes(members), 8),
            ("test/test-000001.tar", b"\x00garbage, not a tar file" * 50, 3),
            ("test/test-000002.tar", b"", 3),  # listed but missing
            ("test/test-000003.tar", cut[: len(cut) // 2], 6),  # truncated tar
            ("test/test-000004.tar", empty, 0),  # an empty shard is harmless
        ],
    )
    return root


def test_bad_members_are_skipped_and_counted(corrupt: Path, tmp_path: Path) -> None:
    # the shard with 3 bad members alone: all 5 good samples, exactly 3 skipped
    m = read_manifest(str(corrupt))
    only = dict(m)
    only["splits"] = {"test": {**m["splits"]["test"], "shards": m["splits"]["test"]["shards"][:1]}}
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test-000000.tar").write_bytes(
        (corrupt / "test" / "test-000000.tar").read_bytes()
    )
    import json

    (tmp_path / "manifest.json").write_text(json.dumps(only))
    loader = eval_loader(cfg_for(tmp_path), "test")
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"g{i}" for i in range(5)]
    assert nonzero(loader.skipped) == {"truncated": 1, "not_image": 1, "no_label": 1}


def test_bad_labels_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    """Labels a shard should never hold (written by hand or an older writer) are skipped in
    the worker processes and counted by reason in ``loader.skipped`` (the evaluation
    report's ``skipped``, the train_skipped_* / val_skipped_* metrics)."""
    bad = {
        "nan": b'{"age": NaN, "gender": 0}',
        "inf": b'{"age": Infinity}',
        "text": label("30"),
        "old": label(150),
        "minus": label(-1),
        "null": label(None),
        "gender": label(30, gender=3),
        "race": label(30, race=7),
        "std": label(30, age_std=-2),
    }
    members: list[tuple[str, bytes]] = []
    for i in range(6):
        members += [(f"g{i}.jpg", jpeg(i, 20)), (f"g{i}.json", label(20 + i))]
    for i, (key, lab) in enumerate(bad.items()):
        members += [(f"{key}.jpg", jpeg(40 + i, 20)), (f"{key}.json", lab)]
    write_manual_shards(tmp_path, "test", [("test/test-000000.tar", tar_bytes(members), 15)])
    loader = eval_loader(cfg_for(tmp_path), "test")
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == [f"g{i}" for i in range(6)]
    assert all(torch.isfinite(b["age"]).all() for b in batches)
    assert nonzero(loader.skipped) == {
        "bad_age": 3,
        "age_out_of_range": 2,
        "missing_age": 1,
        "bad_gender": 1,
        "bad_race": 1,
        "age_std_out_of_range": 1,
    }
    assert {"bad_age", "age_out_of_range", "missing_age", "bad_race"} <= set(loader.skipped)
    # a split without ages (identity pretraining) keeps its age-less members
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["test"]["fields"] = ["identity"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loader = eval_loader(cfg_for(tmp_path, num_workers=0), "test")
    keys = [k for b in loader for k in b["key"]]
    assert "null" in keys and "nan" not in keys


def test_unreadable_shards_are_skipped_across_ranks(corrupt: Path) -> None:
    cfg = cfg_for(corrupt)
    keys: list[str] = []
    skipped: Counter[str] = Counter()
    for rank in range(RANKS):
        loader = eval_loader(cfg, "test", rank=rank, world_size=RANKS)
        keys += [k for b in loader for k in b["key"]]
        skipped.update(loader.skipped)
    good_from_cut = [k for k in keys if k.startswith("c")]
    assert sorted(k for k in keys if k.startswith("g")) == [f"g{i}" for i in range(5)]
    assert len(good_from_cut) == len(set(good_from_cut)) < 6
    # 3 bad members + garbage shard + missing shard + truncated tar, each counted once
    assert nonzero(skipped) == {"truncated": 1, "not_image": 1, "no_label": 1, "bad_shard": 3}


def test_training_epoch_continues_past_bad_shards(corrupt: Path) -> None:
    cfg = cfg_for(corrupt, steps_per_epoch=6, batch_size=4)
    loader = train_loader(cfg, "test", rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 6
    assert loader.skipped["bad_shard"] >= 3
    assert loader.skipped["truncated"] >= 1


def test_no_usable_sample_raises_instead_of_hanging(tmp_path: Path) -> None:
    write_manual_shards(tmp_path, "train", [("train/train-000000.tar", b"junk" * 300, 4)])
    loader = train_loader(cfg_for(tmp_path, num_workers=1), "train")
    with pytest.raises(RuntimeError, match="ran dry"):
        list(loader)
    assert nonzero(loader.skipped) == {"bad_shard": 1}


def test_missing_manifest_and_split_errors(tmp_path: Path, datasets: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match=r"jobs\.make_shards"):
        eval_loader(cfg_for(tmp_path), "test")
    with pytest.raises(ValueError, match="has \\['test', 'train'\\]"):
        eval_loader(cfg_for(datasets["many"]), "val")
    with pytest.raises(ValueError, match="sampler"):
        train_loader(cfg_for(datasets["many"]), "train", sampler="uniform")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_utkface_subset_streams_exactly_once(utkface_tar: Path, tmp_path: Path) -> None:
    from ageray.data.importers import IMPORTERS
    from ageray.data.records import ImportReport

    report = ImportReport(source="utkface")
    records = (
        r
        for r in IMPORTERS["utkface"](str(utkface_tar), report)
        if stable_unit(11, r.key) < 500 / 14217
    )
    m = write_shards(
        records,
        tmp_path,
        report=report,
        source="utkface",
        input=str(utkface_tar),
        max_count=40,
        workers=2,
        progress=False,
    )
    total = sum(s["count"] for s in m["splits"].values())
    assert 400 < total < 600
    assert m["splits"]["train"]["image_size"]["max"] == [200, 200]
    assert m["num_identities"] == 0  # UTKFace has no identities: split by key
    cfg = cfg_for(tmp_path, image_size=112, eval_batch_size=32, batch_size=16)
    for split in ("test", "train"):
        seen: list[str] = []
        for rank in range(RANKS):
            loader = eval_loader(cfg, split, rank=rank, world_size=RANKS)
            for b in loader:
                assert b["image"].shape[1:] == (3, 112, 112)
                assert not torch.isnan(b["age"]).any()
                seen += b["key"]
            assert not any(loader.skipped.values())
        assert Counter(seen) == Counter(split_keys(tmp_path, split))
    steps = [
        len(list(train_loader(cfg, "train", rank=r, world_size=RANKS, seed=1)))
        for r in range(RANKS)
    ]
    assert steps[0] == steps[1] == m["splits"]["train"]["count"] // (RANKS * 16)


# ------------------------------------------------------------------------------ inside Ray


def test_streams_inside_ray_workers(datasets: dict[str, Path], ray_local) -> None:
    """DataLoader workers (forkserver) started from inside Ray worker processes, 2 ranks
    in parallel: exact-once eval and equal train steps."""
    import ray

    def rank_keys(cfg: DataConfig, split: str, rank: int, world_size: int) -> dict:
        """What one Ray Train worker does: an eval pass and a train epoch for its rank.
        (Nested, so Ray ships it by value: the test module is not importable there.)"""
        from ageray.data.loader import eval_loader, train_loader

        loader = eval_loader(cfg, split, rank=rank, world_size=world_size)
        keys = [k for b in loader for k in b["key"]]
        train = train_loader(cfg, split, rank=rank, world_size=world_size)
        return {"keys": keys, "steps": len(list(train)), "pids": loader.worker_pids}

    cfg = cfg_for(datasets["many"])
    task = ray.remote(num_cpus=1)(rank_keys)
    results = ray.get([task.remote(cfg, "test", r, RANKS) for r in range(RANKS)], timeout=300)
    keys = [k for r in results for k in r["keys"]]
    assert Counter(keys) == Counter(split_keys(datasets["many"], "test"))
    assert results[0]["steps"] == results[1]["steps"] >= 1
    assert all(len(r["pids"]) == WORKERS for r in results)  # real worker processes
