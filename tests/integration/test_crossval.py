"""jobs.crossval end to end on synthetic faces: two folds of a 2-fold split by identity, each
written by jobs.make_shards, trained (stage 1, stage 2, the routing fit) and evaluated
through Ray Train, then the summary over folds. Sized like test_training's tiny runs (64 px,
one epoch per stage, ~200 images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ageray.data.manifest import read_manifest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_folds_train_and_average(tmp_path: Path, ray_local) -> None:
    from jobs.crossval import main

    overrides = [
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=cv",
        "data.num_workers=0",
        "data.batch_size=32",
        "data.eval_batch_size=64",
        "data.shuffle_buffer=64",
        "train.stage1.epochs=1",
        "train.stage2.epochs=1",
        "train.stage1.optim.lr=0.05",
        "train.stage2.optim.lr=0.05",
        "train.log_every=0",
        "routing.steps=50",
    ]
    argv = ["--config", str(ROOT / "recipes" / "demo.yaml")]
    for o in overrides:
        argv += ["--set", o]
    argv += [
        "--source",
        "synthetic",
        "--shards-root",
        str(tmp_path / "folds"),
        "--folds",
        "2",
        "--make-shards-arg=--num-samples=192",
        "--make-shards-arg=--image-size=64",
        "--output",
        str(tmp_path / "cv"),
        "--no-tracking",
    ]
    assert main(argv) == 0

    # the two folds' test splits partition the data; nobody is in two splits of a fold
    tests, total = [], 0
    for fold in (0, 1):
        m = read_manifest(str(tmp_path / "folds" / f"fold-{fold}"))
        assert m["options"]["protocol"]["name"] == "k-fold"
        assert m["options"]["protocol"]["fold"] == fold
        tests.append(m["splits"]["test"]["count"])
        total = sum(s["count"] for s in m["splits"].values())
    assert sum(tests) == total == 192

    summary = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert summary["folds"] == 2 and summary["fold_ids"] == [0, 1]
    assert summary["samples"] == tests
    assert summary["protocol"]["name"] == "k-fold" and summary["protocol"]["folds"] == 2
    for row in ("vanilla", "balanced", "routed", "routed_learned", "oracle"):
        assert summary["rows"][row]["mae"]["n"] == 2
        assert summary["pooled"][row]["n"] == 192
    text = (tmp_path / "cv" / "crossval.md").read_text()
    assert "2 folds" in text and "±" in text
    for fold in (0, 1):  # each fold is a run of its own, evaluated, routed on its val split
        run = tmp_path / "runs" / f"cv-fold{fold}"
        assert (run / "eval" / "report.json").is_file()
        assert (run / "routing" / "model" / "model.json").is_file()
