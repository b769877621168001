"""Gender/race answers (ageray.evaluation.traits) and the fairness table
(ageray.evaluation.fairness) on tiny hand-worked predictions; the report sections and plots
they add; the hybrid steps' names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ageray.evaluation.fairness import (
    fairness_metrics,
    fairness_table,
    markdown_fairness,
    plot_fairness,
)
from ageray.evaluation.traits import (
    group_name,
    markdown_traits,
    plot_confusions,
    trait_metrics,
    trait_report,
    true_groups,
)


def test_group_names_and_labels() -> None:
    assert [group_name(g, r) for g, r in ((1, 1), (0, 1), (1, 0), (0, 0))] == [
        "BF",
        "BM",
        "WF",
        "WM",
    ]
    assert group_name(0, 2) == "AM" and group_name(1, 4) == "OF"
    morph = ((1, 1), (0, 1), (1, 0), (0, 0))
    got = true_groups(np.array([1, 0, 0, -1, 1]), np.array([1, 0, 2, 0, 0]), morph)
    assert got.tolist() == [0, 3, -1, -1, 2]


def _preds() -> dict:
    # 6 images: gender labels (one absent), race labels, and probabilities
    return {
        "age": np.array([10.0, 20, 30, 40, 50, 60]),
        "gender": np.array([0, 0, 1, 1, -1, 1]),
        "race": np.array([0, 1, 0, 1, 0, 4]),
        "gender_probs": np.array(
            [[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9]]
        ),
        "race_probs": np.eye(5)[[0, 0, 0, 1, 0, 4]],
        "group_probs": np.eye(4)[[3, 1, 2, 0, 3, 0]],
        "_groups": [[1, 1], [0, 1], [1, 0], [0, 0]],  # BF, BM, WF, WM
    }


def test_trait_report_by_hand() -> None:
    rep = trait_report(_preds())
    g = rep["gender"]
    # 5 labelled: male (0, 1) -> predicted male, female -> male is wrong for image 1
    assert g["count"] == 5 and g["accuracy"] == pytest.approx(4 / 5)
    assert g["confusion"] == [[1, 1], [0, 3]]
    assert g["recall"] == {"male": 0.5, "female": 1.0}
    assert g["balanced_accuracy"] == pytest.approx(0.75)
    r = rep["race"]
    assert r["count"] == 6 and r["accuracy"] == pytest.approx(5 / 6)  # image 1 black -> white
    assert r["confusion"][1] == [1, 1, 0, 0, 0] and r["support"]["asian"] == 0
    assert math.isnan(r["recall"]["asian"])
    grp = rep["group"]
    # true groups: WM, BM, WF, BF, (absent gender), (other race: no group) -> 4 known
    assert grp["count"] == 4 and grp["labels"] == ["BF", "BM", "WF", "WM"]
    assert grp["accuracy"] == pytest.approx(1.0)
    metrics = trait_metrics(_preds(), prefix="val")
    assert metrics["val_gender_acc"] == pytest.approx(0.8)
    assert metrics["val_race_balanced_acc"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert trait_report({"age": np.zeros(2), "gender": np.array([0, 1])}) == {}


def test_fairness_table_by_hand() -> None:
    y = np.array([10.0, 20, 30, 40, 50, 60])
    rows = {"vanilla": y + np.array([1, 2, 3, 4, 5, 6]), "balanced": y + 1}
    p = _preds()
    table = fairness_table(y, rows, p["gender"], p["race"], min_count=2)
    assert table is not None
    by_gender = table["by"]["gender"]
    assert by_gender["groups"] == {"male": 2, "female": 3}
    assert by_gender["rows"]["vanilla"]["male"]["mae"] == pytest.approx(1.5)
    assert by_gender["rows"]["vanilla"]["female"]["mae"] == pytest.approx((3 + 4 + 6) / 3)
    ratio = by_gender["ratio"]["vanilla"]["mae"]
    assert ratio == {"ratio": pytest.approx((13 / 3) / 1.5), "worst": "female", "best": "male"}
    assert by_gender["ratio"]["balanced"]["mae"]["ratio"] == pytest.approx(1.0)
    by_race = table["by"]["race"]
    assert by_race["groups"] == {"white": 3, "black": 2, "other": 1}
    # "other" has 1 image (< min_count): listed, left out of the ratio
    assert by_race["rows"]["vanilla"]["other"]["mae"] == pytest.approx(6.0)
    assert by_race["ratio"]["vanilla"]["mae"]["worst"] == "white"  # (1+3+5)/3=3 vs (2+4)/2=3
    rg = table["by"]["race_gender"]["groups"]
    assert rg == {"WM": 1, "WF": 1, "BM": 1, "BF": 1, "OF": 1}
    # with the default min_count (20) no group qualifies: no ratio
    default = fairness_table(y, rows, p["gender"], p["race"])
    assert default["by"]["gender"]["ratio"]["vanilla"]["mae"]["worst"] is None
    flat = fairness_metrics(table)
    assert flat["test_vanilla_mae_ratio_gender"] == pytest.approx((13 / 3) / 1.5)
    assert flat["test_vanilla_mae_race_gender_OF"] == pytest.approx(6.0)
    assert fairness_table(y, rows, None, None) is None
    assert fairness_table(y, rows, np.full(6, -1), np.full(6, -1)) is None


def test_sections_and_plots(tmp_path: Path) -> None:
    p = _preds()
    y = p["age"]
    table = fairness_table(y, {"vanilla": y + 1.0}, p["gender"], p["race"], min_count=1)
    md = "\n".join(markdown_fairness(table, {"vanilla": "Vanilla"}))
    assert "MAE by race x gender" in md and "| Vanilla |" in md and "female (n=3)" in md
    traits = trait_report(p)
    md = "\n".join(markdown_traits(traits))
    assert "| gender | 5 | 80.0% | 75.0% |" in md
    assert "| male | 1 | 1 |" in md  # the gender confusion matrix's first row
    paths = plot_confusions(traits, tmp_path)
    assert sorted(x.name for x in paths) == [
        "confusion_gender.png",
        "confusion_group.png",
        "confusion_race.png",
    ]
    fair = plot_fairness(table, tmp_path / "fairness.png", labels={"vanilla": "Vanilla"})
    assert fair is not None and fair.stat().st_size > 1000
    assert plot_fairness(None, tmp_path / "none.png") is None
    assert markdown_traits({}) == [] and markdown_fairness(None, {}) == []


def test_hybrid_stage_names_agree() -> None:
    """jobs.train offers the training plans' hybrid steps, in order, and reads them without
    importing torch at parse time (from ``ageray.training.stage_names``)."""
    import subprocess
    import sys

    from ageray.training.plans import HYBRID_STEPS, STAGES
    from jobs.train import STAGES as CHOICES
    from jobs.train import stages_for

    assert CHOICES["hybrid"] == HYBRID_STEPS and set(HYBRID_STEPS) <= set(STAGES)
    code = "import sys, jobs.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert stages_for("all", "hybrid") == (*HYBRID_STEPS, "stage2")
    assert stages_for("all", "parallel") == ("stage1", "stage2")
    assert stages_for("hybrid_ages", "hybrid") == ("hybrid_ages",)


def test_hybrid_steps_refuse_other_nets_and_missing_models() -> None:
    """The steps are the hybrid net's: another net, or a later step without the model of
    the step before, fails before any data is read, saying what to pass."""
    from ageray.config import Config
    from ageray.tracking import Tracker
    from ageray.training.pipeline import PipelineError, run_pipeline
    from ageray.training.plans import plan_for, spec_for

    cfg = Config()
    cfg.model.head, cfg.model.formulation, cfg.model.multitask = "linear", "mae", "parallel"
    cfg.loss.name = "mae"
    off = Tracker(cfg, enabled=False)
    with pytest.raises(PipelineError, match=r"model\.multitask='parallel'"):
        run_pipeline(cfg, tracker=off, stages=("hybrid_groups",))
    with pytest.raises(ValueError, match=r"needs model\.multitask=hybrid"):
        plan_for(cfg, spec_for(cfg, "hybrid_groups"))
    cfg.model.multitask = "hybrid"
    with pytest.raises(PipelineError, match="hybrid_ages starts from the hybrid_groups model"):
        run_pipeline(cfg, tracker=off, stages=("hybrid_ages",))
    with pytest.raises(ValueError, match="--stage hybrid_finetune --from"):
        plan_for(cfg, spec_for(cfg, "hybrid_finetune"))
    cfg.train.hybrid_epochs = (1, 0, 1)
    with pytest.raises(ValueError, match="three epoch counts >= 1"):
        plan_for(cfg, spec_for(cfg, "hybrid_groups"))
