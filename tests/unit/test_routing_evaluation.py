"""Every routing rule in the evaluation: one forward pass scores every rule exactly as
``predict(model, x, rule=...)`` (tests/model_predict.py) answers, the report has a row per
rule with the oracle as a
bound and the share of the smaller -> oracle gap each closes, DIR shot MAE, the fitting
step, and a routed model that answers identically through evaluation, the pyfunc model and
Serve's forward (no Ray: the served model's forward is the code a replica runs)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datagen import make_tiny_model
from model_predict import predict

from ageray import metrics as M
from ageray.config import Config, RoutingConfig
from ageray.evaluation import build_report, gap_closed
from ageray.evaluation.tables import markdown_table, write_plots
from ageray.inference import collect_predictions
from ageray.model import load_model, save_model
from ageray.model.routing.fitting import fit_rules, routing_fit_metrics


class Batches(list):
    """A loader: batches, and the skip counts a real loader keeps."""

    skipped: dict[str, int]


def loader(n: int, seed: int, batch: int = 8) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    out = Batches()
    out.skipped = {}
    for i in range(0, n, batch):
        k = min(batch, n - i)
        out.append(
            {
                "image": torch.randn(k, 3, 64, 64, generator=gen),
                "age": torch.randint(1, 90, (k,), generator=gen).float(),
                "age_std": torch.full((k,), 2.0),
                "key": [f"s{seed}-{j:03d}" for j in range(i, i + k)],
            }
        )
    return out


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory):
    """The tiny two-head model with both fitted rules, serving the learned one."""
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model, _ = load_model(folder)
    val = collect_predictions(model, loader(40, seed=1), device=torch.device("cpu"))
    routing = RoutingConfig(rule="learned", hidden=4, steps=100)
    reports = fit_rules(model, val["route_features"], val["age"], routing, split="val")
    cfg = Config()
    cfg.data.image_size = 64
    out = save_model(model, tmp_path_factory.mktemp("routed") / "model", cfg)
    return out, reports


def test_shot_mae_hand_built() -> None:
    train = {"20": 500, "30": 60, "5": 3}  # age 70 never seen in training
    y = np.array([20.0, 20.0, 30.0, 5.0, 70.0])
    p = np.array([21.0, 23.0, 26.0, 7.0, 60.0])
    assert M.shot_mae(y, p, train) == pytest.approx({"many": 2.0, "medium": 4.0, "few": 6.0})
    assert M.shot_counts(y, train) == {"many": 2, "medium": 1, "few": 2}
    # Boundaries: exactly 100 images is medium, exactly 20 is medium, 19 is few.
    edge = M.shot_mae([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], {1: 100, 2: 20, 3: 19})
    assert edge["many"] != edge["many"]  # NaN: no many-shot sample
    assert edge["medium"] == pytest.approx(1.5) and edge["few"] == pytest.approx(3.0)


def test_gap_closed() -> None:
    rows = {
        "routed": {"mae": 8.0, "cmae": 10.0},
        "routed_learned": {"mae": 7.0, "cmae": 9.5},
        "routed_bigger": {"mae": 9.0, "cmae": 10.0},
        "oracle": {"mae": 6.0, "cmae": 8.0},
    }
    g = gap_closed(rows)
    assert g["routed"] == {"mae": 0.0, "cmae": 0.0}
    assert g["routed_learned"] == pytest.approx({"mae": 0.5, "cmae": 0.25})
    assert g["routed_bigger"]["mae"] == pytest.approx(-0.5)
    assert "oracle" not in g
    assert gap_closed({"routed": rows["routed"]}) == {}


def test_fit_reports(routed) -> None:
    _, reports = routed
    assert set(reports) == {"threshold", "learned"}
    for r in reports.values():
        assert r["split"] == "val" and r["n"] == 40 and r["reliable"] is False
        assert r["objective"] <= r["objective_smaller"] + 1e-9  # in-sample: never worse
    metrics = routing_fit_metrics(reports)
    assert "routing_threshold_tau" in metrics and "routing_learned_fit_cmae" in metrics


def test_every_rule_scored_as_predict_answers(routed) -> None:
    folder, _ = routed
    model, info = load_model(folder)
    assert info["routing"]["rule"] == "learned"
    batches = loader(20, seed=2)
    preds = collect_predictions(model, batches, device=torch.device("cpu"))
    assert preds["_routing_rule"] == "learned"
    assert preds["route_features"].shape == (20, 9)
    x = torch.cat([b["image"] for b in batches])
    y = torch.cat([b["age"] for b in batches])
    for rule in ("smaller", "bigger", "threshold", "learned", "oracle"):
        direct = predict(model, x, rule=rule, labels=y if rule == "oracle" else None)
        np.testing.assert_array_equal(preds[f"rule_{rule}_age"], direct.age.double().numpy())
        np.testing.assert_array_equal(preds[f"rule_{rule}_weight"], direct.weight.double().numpy())
    # The served rule is what the model answers by default.
    np.testing.assert_array_equal(preds["routed_age"], preds["rule_learned_age"])
    # The oracle is a bound: never further from the label than either head.
    err = np.abs(preds["rule_oracle_age"] - preds["age"])
    assert (err <= np.abs(preds["vanilla_age"] - preds["age"]) + 1e-9).all()
    assert (err <= np.abs(preds["balanced_age"] - preds["age"]) + 1e-9).all()


def test_report_rows_bound_gap_shots_and_plots(routed, tmp_path: Path) -> None:
    folder, _ = routed
    model, _ = load_model(folder)
    preds = collect_predictions(model, loader(32, seed=3), device=torch.device("cpu"))
    train = {str(a): (150 if a < 40 else 30 if a < 70 else 5) for a in range(101)}
    report = build_report(preds, shards="mem://", split="test", train_counts=train)
    assert report["row_order"] == [
        "vanilla",
        "balanced",
        "routed_bigger",
        "routed",
        "routed_threshold",
        "routed_learned",
        "oracle",
    ]
    assert report["bounds"] == ["oracle"] and report["served_rule"] == "learned"
    rows = report["rows"]
    y = preds["age"]
    assert rows["routed"]["mae"] == pytest.approx(M.mae(y, preds["rule_smaller_age"]))
    assert rows["oracle"]["cmae"] <= rows["routed"]["cmae"] + 1e-9
    g = report["gap_closed"]["routed_learned"]
    want = (rows["routed"]["mae"] - rows["routed_learned"]["mae"]) / (
        rows["routed"]["mae"] - rows["oracle"]["mae"]
    )
    assert g["mae"] == pytest.approx(want)
    assert rows["routed_learned"]["shot_mae"] == pytest.approx(
        M.shot_mae(y, preds["rule_learned_age"], train), nan_ok=True
    )
    assert sum(report["shot_counts"].values()) == len(y)
    usage = report["routing_usage_rules"]
    assert set(usage) == {"routed_bigger", "routed", "routed_threshold", "routed_learned", "oracle"}
    flat = report["flat_metrics"]
    assert "test_routed_learned_gap_closed_cmae" in flat and "test_oracle_mae_few_shot" in flat
    text = markdown_table(report)
    assert "Learned router [served]" in text and "Oracle (bound)" in text
    assert "closes CMAE gap" in text and "| Oracle (bound) |" in text and "bound | bound" in text
    plots = {p.name for p in write_plots(report, tmp_path)}
    assert "per_age_mae_rules.png" in plots and (tmp_path / "per_age_mae_rules.png").stat().st_size


def test_identical_answers_through_evaluation_pyfunc_and_serve(routed) -> None:
    """One routed model (learned rule served), three paths, the same ages to the last bit."""
    from ageray.registry.pyfunc_model import AgeRayPyfunc
    from ageray.serving.model import load_served_model

    folder, _ = routed
    model, _ = load_model(folder)
    batches = loader(12, seed=4, batch=12)
    preds = collect_predictions(model, batches, device=torch.device("cpu"))
    x = batches[0]["image"]

    py = AgeRayPyfunc()
    py.load_context(SimpleNamespace(artifacts={"model": str(folder)}))
    out = py.predict(None, x.numpy())
    np.testing.assert_array_equal(out["age"].to_numpy(np.float64), preds["routed_age"])
    with pytest.raises(ValueError, match="never served"):
        py.predict(None, x.numpy(), params={"rule": "oracle"})

    served = load_served_model(str(folder), device="cpu")
    answers = served.forward(x)
    np.testing.assert_array_equal(
        np.array([a["age"] for a in answers], dtype=np.float64), preds["routed_age"]
    )
    heads = ["balanced" if w >= 0.5 else "vanilla" for w in preds["rule_learned_weight"]]
    assert [a["head"] for a in answers] == heads
    assert served.describe()["config"]["routing"]["rule"] == "learned"
    with pytest.raises(ValueError, match="never served"):
        served.forward(x, "oracle")
    assert math.isfinite(answers[0]["age"])


def test_fit_routing_step_refuses_models_without_two_distribution_heads(tmp_path: Path) -> None:
    """The pipeline's routing step keeps such a model as it is (NothingToRoute), before
    reading any data."""
    from ageray.config import ModelConfig
    from ageray.model import build_model
    from ageray.training.routing import NothingToRoute, fit_routing

    cfg = Config()
    cfg.data.image_size = 64
    cfg.data.shards = str(tmp_path / "no-shards-needed")
    for mc, two_heads in (
        (ModelConfig(head="linear"), False),
        (ModelConfig(head="linear", formulation="mae"), True),
    ):
        cfg.model = mc
        model = build_model(cfg)
        if two_heads:
            model.add_balanced_head(freeze=False)
        folder = save_model(model, tmp_path / mc.formulation, cfg)
        with pytest.raises(NothingToRoute, match="routing needs a vanilla and a balanced"):
            fit_routing(folder, cfg, tmp_path / "out")
