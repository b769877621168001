"""The loader yields the same samples in the same order for the same seed, batch by batch,
for every mode and sampler, with the same skip counts: recorded (as SHA-256 digests of each
stream's keys, ages and skips) from the hand-chained loader before its stages were
assembled as curried webdataset stages. Why: a refactor of the stream must not move a
single training run; the order is part of what a seed means.

Also: evaluation sees every sample of the split exactly once across ranks, and the skipped
members are counted once. (DataLoader worker processes: ``tests/integration/test_stream.py``.)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from datagen import jpeg, label, make_records, tar_bytes

from ageray.config import DataConfig
from ageray.data.loader import eval_loader, train_loader
from ageray.data.shards import write_shards

#: stream name -> SHA-256 of its batches' keys, ages and genders, len() and skip counts
GOLDEN: dict[str, str] = {}
GOLDEN_FILE = Path(__file__).parent / "data" / "loader_order_golden.json"

CASES: dict[str, dict[str, Any]] = {
    **{
        f"train-{sampler}-r{rank}-e{epoch}": {
            "mode": "train", "sampler": sampler, "rank": rank, "world_size": 2, "epoch": epoch
        }
        for sampler in ("instance", "class", "age_aware")
        for rank in (0, 1)
        for epoch in (0, 1)
    },
    "train-instance-single": {
        "mode": "train", "sampler": "instance", "rank": 0, "world_size": 1, "epoch": 3
    },
    "train-instance-steps": {
        "mode": "train", "sampler": "instance", "rank": 1, "world_size": 2, "epoch": 0,
        "steps_per_epoch": 7,
    },
    **{
        f"eval-{split}-r{rank}": {"mode": "eval", "split": split, "rank": rank, "world_size": 2}
        for split in ("train", "val")
        for rank in (0, 1)
    },
    "eval-train-single": {"mode": "eval", "split": "train", "rank": 0, "world_size": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("order"))


def make_shard_set(root: Path) -> Path:
    """90 records in shards of at most 7, plus one hand-made train shard with a truncated
    image, a non-image and a member without labels (3 skips in every pass over it)."""
    records = make_records(90, ages=[*range(1, 40), *([25] * 20)], size=20)
    write_shards(
        iter(records), root, splits="train=0.7,val=0.3", max_count=7, workers=1, progress=False
    )
    members = [(f"h{i}.jpg", jpeg(300 + i, 20)) for i in range(4)]
    members = [m for i, m in enumerate(members) for m in (m, (f"h{i}.json", label(10 + i)))]
    members += [("trunc.jpg", jpeg(50, 40)[:-60]), ("trunc.json", label(30))]
    members += [("text.jpg", b"not an image"), ("text.json", label(31))]
    members += [("nolabel.jpg", jpeg(51, 20))]
    (root / "train" / "train-hand.tar").write_bytes(tar_bytes(members))
    manifest = json.loads((root / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    hist = {"10": 1, "11": 1, "12": 1, "13": 1, "30": 1, "31": 1}
    train["shards"].append(
        {"name": "train/train-hand.tar", "count": 7, "bytes": 0, "sha256": "", "age_hist": hist}
    )
    train["count"] += 7
    for k, v in hist.items():
        train["age_hist"][k] = train["age_hist"].get(k, 0) + v
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def stream(shards: Path, case: dict[str, Any]) -> dict[str, Any]:
    cfg = DataConfig(
        shards=str(shards), image_size=16, batch_size=4, eval_batch_size=5,
        num_workers=0, shuffle_buffer=8, steps_per_epoch=case.get("steps_per_epoch"),
    )  # fmt: skip
    if case["mode"] == "train":
        loader = train_loader(
            cfg, "train", rank=case["rank"], world_size=case["world_size"],
            epoch=case["epoch"], seed=11, sampler=case["sampler"], num_classes=40,
            per_class=2,
        )  # fmt: skip
    else:
        loader = eval_loader(cfg, case["split"], rank=case["rank"], world_size=case["world_size"])
    batches = [
        {"key": list(b["key"]), "age": b["age"].tolist(), "gender": b["gender"].tolist()}
        for b in loader
    ]
    skipped = {k: v for k, v in loader.skipped.items() if v}
    return {"len": len(loader), "batches": batches, "skipped": skipped}


def digest(result: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def golden() -> dict[str, str]:
    return json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_same_samples_in_the_same_order(shards: Path, golden: dict[str, str], name: str) -> None:
    assert digest(stream(shards, CASES[name])) == golden[name]


def test_eval_sees_every_sample_once_and_counts_skips_once(shards: Path) -> None:
    ranks = [stream(shards, CASES[f"eval-train-r{r}"]) for r in (0, 1)]
    keys = [k for r in ranks for b in r["batches"] for k in b["key"]]
    single = stream(shards, CASES["eval-train-single"])
    assert sorted(keys) == sorted(k for b in single["batches"] for k in b["key"])
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(keys) == len(set(keys)) == manifest["splits"]["train"]["count"] - 3
    skipped: dict[str, int] = {}
    for r in ranks:
        for k, v in r["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == single["skipped"] == {"truncated": 1, "not_image": 1, "no_label": 1}


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    root = make_shard_set(Path(tempfile.mkdtemp()) / "shards")
    GOLDEN_FILE.write_text(
        json.dumps({n: digest(stream(root, c)) for n, c in CASES.items()}, indent=1) + "\n"
    )
    print(f"wrote {GOLDEN_FILE}")
