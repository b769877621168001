"""Xing et al.'s five formulations and three multi-task nets, each trained through the real
training loop in this process (``run_local``: no Ray) from its recipe, then evaluated and
asked for predictions: the loss falls, the report has the age rows (and gender, race and the
hybrid net's group accuracy with confusion matrices and the fairness table), and a
prediction answers with gender and race where the net has those heads.

Sized to cost well under two CPU minutes together: one shared set of 96 synthetic faces at
32 px (with gender and race labels), timm's ``test_resnet`` trunk (0.5 M parameters), two or
three epochs of batch 16. The numbers only have to move the right way, not be good.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from model_predict import predict

from ageray.config import Config, load_config
from ageray.data.shards import write_shards
from ageray.data.synthetic import iter_synthetic
from ageray.training.loop import run_local
from ageray.training.plans import HYBRID_STEPS, spec_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multitask-shards") / "synthetic"
    manifest = write_shards(
        iter_synthetic(num_samples=96, image_size=SIZE, images_per_identity=2, seed=5),
        out,
        splits="train=0.67,val=0.165,test=0.165",
        workers=1,
        progress=False,
        source="synthetic",
        seed=4,  # splits by identity (48 of them): this seed gives every split some
    )
    counts = {k: v["count"] for k, v in manifest["splits"].items()}
    assert min(counts.values()) >= 8, counts
    return out


def recipe(name: str, shards: Path, work: Path, *extra: str) -> Config:
    """recipes/xing_<name>.yaml shrunk to seconds: tiny trunk, 32 px, CPU, no DataLoader
    processes, epochs counted on 64 training images."""
    return load_config(
        ROOT / "recipes" / f"xing_{name}.yaml",
        [
            f"data.shards={shards}",
            f"run.storage_path={work}",
            f"run.name={name}",
            f"data.image_size={SIZE}",
            "data.batch_size=16",
            "data.eval_batch_size=32",
            "data.num_workers=0",
            "data.shuffle_buffer=32",
            "model.backbone=test_resnet",
            "model.drop_rate=0.0",
            "train.stage1.epochs=3",
            "train.stage1.optim.lr=0.01",
            "train.stage1.optim.scheduler=constant",
            "train.hybrid_epochs=[2,2,2]",
            "train.log_every=0",
            "ray.use_gpu=false",
            *extra,
        ],
    )


def train(cfg: Config, work: Path) -> tuple[Path, list[list[dict[str, Any]]]]:
    """Stage 1 (or the hybrid net's three steps, each from the one before); returns the last
    checkpoint (a model folder) and every step's per-epoch reports."""
    steps = HYBRID_STEPS if cfg.model.multitask == "hybrid" else ("stage1",)
    init, reports = None, []
    for step in steps:
        _, ctx = run_local(spec_for(cfg, step, init_model=init), work / step)
        reports.append(ctx.reports)
        init = str(ctx.checkpoints[-1])
    return Path(init), reports  # type: ignore[arg-type]


CASES = [
    ("onehot", []),
    ("ldl", []),
    ("mse", []),
    ("mae", []),
    ("ordinal", []),
    ("parallel", []),
    ("deep", []),
    ("hybrid", ["model.hybrid_groups=race_gender"]),
]


@pytest.mark.parametrize(("name", "extra"), CASES, ids=[c[0] for c in CASES])
def test_trains_evaluates_and_predicts(
    name: str, extra: list[str], shards: Path, tmp_path: Path
) -> None:
    from ageray.evaluation import evaluate_to_dir
    from ageray.model import load_model

    cfg = recipe(name, shards, tmp_path / "runs", *extra)
    model_dir, reports = train(cfg, tmp_path)

    # the loss falls within every step (first epoch's mean -> last epoch's mean)
    for step_reports in reports:
        first, last = step_reports[0]["train_loss"], step_reports[-1]["train_loss"]
        assert last < first, (name, [r["train_loss"] for r in step_reports])
    multitask = cfg.model.multitask != "none"
    last = reports[-1][-1]
    assert last["val_samples"] > 0 and last["val_mae"] == last["val_mae"]
    if multitask:
        assert 0.0 <= last["val_gender_acc"] <= 1.0 and 0.0 <= last["val_race_acc"] <= 1.0
    if name == "hybrid":
        assert 0.0 <= reports[0][-1]["val_group_acc"] <= 1.0

    # evaluation: the age rows, and for multi-task nets the traits and the fairness table
    report = evaluate_to_dir(model_dir, str(shards), "test", tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["rows"]["vanilla"]["mae"] == pytest.approx(report["rows"]["vanilla"]["mae"])
    assert report["fairness"]["by"]["gender"]["rows"]["vanilla"]
    if multitask:
        traits = report["traits"]
        for trait in ("gender", "race"):
            assert 0.0 <= traits[trait]["accuracy"] <= 1.0
            assert (tmp_path / "eval" / f"confusion_{trait}.png").is_file()
        if name == "hybrid":
            assert traits["group"]["count"] > 0 and 0.0 <= traits["group"]["accuracy"] <= 1.0
        md = (tmp_path / "eval" / "report.md").read_text()
        assert "Gender and race" in md and "Fairness" in md
    else:
        assert "traits" not in report

    # prediction: ages in range; gender and race probabilities from the multi-task heads
    model, _ = load_model(model_dir)
    x = torch.randn(3, 3, SIZE, SIZE)
    pred = predict(model, x)
    assert pred.age.shape == (3,) and bool(torch.isfinite(pred.age).all())
    if multitask:
        assert pred.gender is not None and pred.race is not None
        assert torch.allclose(pred.gender.sum(-1), torch.ones(3), atol=1e-4)
        assert torch.allclose(pred.race.sum(-1), torch.ones(3), atol=1e-4)
    else:
        assert pred.gender is None
