"""The routing rule registry (smaller, bigger, threshold, learned, oracle): each rule on
hand-built features, fitting recovers a known threshold / rule on synthetic features, the
oracle is refused wherever a model serves, rules trace without data-dependent branches, and a
fitted router survives save/load with identical answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_predict import predict

from ageray.config import Config, ModelConfig
from ageray.model import (
    FEATURES,
    ROUTING_RULES,
    build_model,
    check_servable,
    load_model,
    make_rule,
    save_model,
    servable_rules,
)
from ageray.model.routing import (
    AGE_BAL,
    AGE_VAN,
    KL_BAL,
    KL_VAN,
    LearnedRouter,
    head_stats,
    mix_ages,
    route_features,
    routed_error,
    sample_weights,
)

SIZE = 64


def feats(rows: list[dict[str, float]]) -> torch.Tensor:
    """Feature rows from partial dicts (unnamed columns 0; gap derived from the ages)."""
    out = torch.zeros(len(rows), len(FEATURES))
    for i, r in enumerate(rows):
        for k, v in r.items():
            out[i, FEATURES.index(k)] = v
        out[i, FEATURES.index("gap")] = out[i, AGE_BAL] - out[i, AGE_VAN]
    return out


def test_registry_names_and_servable() -> None:
    assert {"smaller", "bigger", "threshold", "learned", "oracle"} <= set(ROUTING_RULES)
    assert "oracle" not in servable_rules() and "smaller" in servable_rules()
    assert check_servable("learned") == "learned"
    with pytest.raises(ValueError, match=r"evaluation-only upper bound.*never served"):
        check_servable("oracle", "serve.rule")
    with pytest.raises(ValueError, match="unknown routing rule 'largest'"):
        check_servable("largest")
    with pytest.raises(ValueError, match="unknown routing rule"):
        make_rule("largest")
    with pytest.raises(ValueError, match="bad settings"):
        make_rule("threshold", tau=3.0)
    with pytest.raises(ValueError, match="mode='medium'"):
        make_rule("learned", mode="medium")


def test_head_stats_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits, logits_f = torch.randn(3, 11, generator=g) * 3, torch.randn(3, 11, generator=g) * 3
    s = head_stats(logits, logits_f)
    p = torch.softmax(logits.double(), -1)
    q = torch.softmax(logits_f.double(), -1)
    m = 0.5 * (p + q)
    ages = torch.arange(11, dtype=torch.float64)
    age = (m * ages).sum(-1)
    std = ((m * (ages - age[:, None]) ** 2).sum(-1)).sqrt()
    ent = -(m * m.log()).sum(-1)
    kl = (p * (p / q).log()).sum(-1)
    for got, ref in ((s["age"], age), (s["std"], std), (s["entropy"], ent), (s["kl"], kl)):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5)
    # Peaked logits whose softmax underflows to zeros in float32: still finite, KL >= 0.
    peaked = head_stats(torch.tensor([[300.0, 0.0, -300.0]]), torch.tensor([[-300.0, 0, 300]]))
    assert all(torch.isfinite(peaked[k]).all() for k in ("age", "std", "entropy", "kl"))
    assert peaked["kl"].item() > 500  # ~600 nats: the two answers are opposite ends
    assert head_stats(logits, None)["kl"] is None


def test_each_rule_on_hand_built_features() -> None:
    f = feats(
        [
            {"age_van": 30, "age_bal": 34, "kl_van": 0.01, "kl_bal": 0.02},  # vanilla steadier
            {"age_van": 70, "age_bal": 78, "kl_van": 0.05, "kl_bal": 0.02},  # balanced steadier
            {"age_van": 10, "age_bal": 6, "kl_van": 0.03, "kl_bal": 0.03},  # tie
            {"age_van": 50, "age_bal": 40, "kl_van": 0.03, "kl_bal": 0.02},  # ratio 1.5
        ]
    )
    y = torch.tensor([29.0, 80.0, 9.0, 41.0])
    assert make_rule("smaller")(f).tolist() == [0, 1, 1, 1]  # ties go to balanced (eq. 11)
    assert make_rule("bigger")(f).tolist() == [1, 0, 1, 0]
    thr = make_rule("threshold")
    assert thr(f).tolist() == make_rule("smaller")(f).tolist()  # tau = 1 before fitting
    thr.tau.fill_(2.0)  # vanilla iff kl_van < 2 kl_bal
    assert thr(f).tolist() == [0, 1, 0, 0]
    assert make_rule("oracle")(f, y).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="needs the true ages"):
        make_rule("oracle")(f)
    # Mixing: hard weights give exactly one head's answer; soft weights interpolate.
    w = torch.tensor([0.0, 1.0, 0.25, 0.5])
    ages = mix_ages(f[:, AGE_VAN], f[:, AGE_BAL], w)
    assert ages.tolist() == [30.0, 78.0, 9.0, 45.0]
    assert routed_error(f, y, w).tolist() == pytest.approx([1, 2, 0, 4])


def test_sample_weights() -> None:
    y = np.array([20.0, 20.2, 19.8, 60.0, 5.4])  # ages 20, 20, 20, 60, 5
    inst = sample_weights(y, "instance")
    assert inst.tolist() == [1.0] * 5
    age = sample_weights(y, "age")
    assert age.mean() == pytest.approx(1.0)
    # Every age gets the same total weight: three 20s share what one 60 has.
    assert age[:3].sum() == pytest.approx(age[3]) == pytest.approx(age[4])
    with pytest.raises(ValueError, match="weighting='median'"):
        sample_weights(y, "median")  # type: ignore[arg-type]
    # a share a blends them: (1 - a) * instance + a * age, still mean 1
    half = sample_weights(y, 0.5)
    assert half == pytest.approx(0.5 * inst + 0.5 * age) and half.mean() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share of per-age weight"):
        sample_weights(y, 1.5)
    with pytest.raises(ValueError, match="resolved by the rule's fit"):
        sample_weights(y, "auto")


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Heads whose errors depend on the features in a known way."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(1, 90, n)
    kl_bal = rng.lognormal(-4, 1, n)
    kl_van = kl_bal * rng.lognormal(0, 1.5, n)
    f = np.zeros((n, len(FEATURES)))
    f[:, KL_VAN], f[:, KL_BAL] = kl_van, kl_bal
    return f, y


def test_threshold_fit_recovers_a_known_tau() -> None:
    """Vanilla is right exactly when kl_van < 3 kl_bal: the fitted tau lands in the gap
    around 3 and the fitted rule reaches zero error."""
    f, y = _synthetic(400, 0)
    ratio = f[:, KL_VAN] / f[:, KL_BAL]
    vanilla_right = ratio < 3.0
    f[:, AGE_VAN] = np.where(vanilla_right, y, y + 5)
    f[:, AGE_BAL] = np.where(vanilla_right, y - 7, y)
    f[:, -1] = f[:, AGE_BAL] - f[:, AGE_VAN]
    rule = make_rule("threshold", weighting="instance")
    report = rule.fit(f, y)
    below, above = ratio[ratio < 3].max(), ratio[ratio >= 3].min()
    assert below < report["tau"] <= above
    assert rule.tau.item() == pytest.approx(report["tau"])
    assert report["objective"] == pytest.approx(0.0, abs=1e-5)
    assert report["objective_smaller"] > 1.0  # eq. 11 (tau = 1) gets many wrong
    assert rule.is_fitted and rule.fit_report == report
    w = rule(torch.as_tensor(f, dtype=torch.float32))
    assert np.array_equal(w.numpy() == 0, vanilla_right)


def test_threshold_fit_is_the_exact_minimum_and_prefers_tau_one() -> None:
    f, y = _synthetic(300, 1)
    rng = np.random.default_rng(2)
    f[:, AGE_VAN] = y + rng.normal(0, 4, y.size)
    f[:, AGE_BAL] = y + rng.normal(0, 4, y.size)
    f[:, -1] = f[:, AGE_BAL] - f[:, AGE_VAN]
    rule = make_rule("threshold", weighting="age")
    report = rule.fit(f, y)
    sw = sample_weights(y, "age")
    grid = np.exp(np.linspace(-8, 8, 4001))
    ratio = f[:, KL_VAN] / f[:, KL_BAL]
    brute = min(np.mean(sw * routed_error(f, y, (ratio >= t).astype(float))) for t in grid)
    assert report["objective"] <= brute + 1e-9
    # Identical heads: every tau ties, so the fit keeps eq. 11's tau = 1 neighbourhood.
    f[:, AGE_BAL] = f[:, AGE_VAN]
    f[:, -1] = 0
    report = rule.fit(f, y)
    assert abs(math.log(report["tau"])) < 0.5


def test_learned_router_recovers_a_known_rule() -> None:
    """The balanced head is right on the tails (vanilla answer < 15 or > 60), the vanilla in
    the middle; eq. 11's KLs carry no signal. The learned router finds the rule from the
    heads' answers and generalises to fresh samples."""

    def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        f, y = _synthetic(n, seed)
        rng = np.random.default_rng(seed + 100)
        tail = (y < 15) | (y > 60)
        f[:, AGE_VAN] = np.where(tail, np.clip(y * 0.6 + 15, 0, 100), y) + rng.normal(0, 1, n)
        f[:, AGE_BAL] = np.where(tail, y, y + 6) + rng.normal(0, 1, n)
        f[:, 2:6] = rng.uniform(1, 3, (n, 4))  # spreads and entropies: noise
        f[:, -1] = f[:, AGE_BAL] - f[:, AGE_VAN]
        return f, y

    f, y = make(1500, 0)
    f_new, y_new = make(1500, 1)
    oracle = make_rule("oracle")(torch.as_tensor(f_new, dtype=torch.float32), torch.tensor(y_new))
    for mode in ("hard", "soft"):
        rule = make_rule("learned", mode=mode, weighting="age", hidden=8, steps=600)
        report = rule.fit(f, y)
        assert report["objective"] < 0.5 * report["objective_smaller"]
        w = rule(torch.as_tensor(f_new, dtype=torch.float32))
        assert ((w >= 0.5) == (oracle >= 0.5)).float().mean() > 0.9
        err = routed_error(f_new, y_new, w).mean()
        err_smaller = routed_error(
            f_new, y_new, make_rule("smaller")(torch.as_tensor(f_new))
        ).mean()
        assert err < 0.6 * err_smaller
        if mode == "hard":
            assert set(w.unique().tolist()) <= {0.0, 1.0}
    # Same data, same seed: the same router.
    a = make_rule("learned", steps=50).fit(f, y)
    b = make_rule("learned", steps=50).fit(f, y)
    assert a == b


def test_auto_weighting_picks_the_share_by_cross_validation() -> None:
    """Heads whose errors depend on the age: the share 'auto' picks is the one whose
    out-of-fold MAE and CMAE beat eq. 11 by the widest margin, and it is what the rule then
    fits with; the choice and every candidate are in the fit report."""
    rng = np.random.default_rng(7)
    n = 600
    y = np.concatenate([rng.uniform(20, 50, n - 60), rng.uniform(70, 90, 60)])  # a thin tail
    f = np.zeros((n, len(FEATURES)))
    f[:, KL_VAN] = rng.lognormal(-4, 1, n)
    f[:, KL_BAL] = rng.lognormal(-4, 1, n)
    old = y > 60
    f[:, AGE_VAN] = np.where(old, y - 12, y) + rng.normal(0, 2, n)
    f[:, AGE_BAL] = np.where(old, y, y + 4) + rng.normal(0, 2, n)
    f[:, -1] = f[:, AGE_BAL] - f[:, AGE_VAN]
    rule = make_rule("learned", weighting="auto", steps=200)
    report = rule.fit(f, y)
    sel = report["selection"]
    assert rule.age_share == sel["age_share"] and report["weighting"] == sel["age_share"]
    assert [c["age_share"] for c in sel["candidates"]] == [0.0, 0.1, 0.2, 0.35, 0.5, 1.0]
    winners = [c for c in sel["candidates"] if c["beats_smaller"]]
    assert winners and sel["beats_smaller"]
    assert sel["age_share"] == min(winners, key=lambda c: c["score"])["age_share"]
    assert rule.settings()["age_share"] == sel["age_share"]  # saved, so a load needs no refit
    thr = make_rule("threshold", weighting="auto")
    assert "selection" in thr.fit(f, y) and thr.age_share is not None


def test_fit_input_errors() -> None:
    rule = make_rule("learned")
    with pytest.raises(ValueError, match=r"\(N, 9\)"):
        rule.fit(np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match="4 feature rows but 3 labels"):
        rule.fit(np.zeros((4, 9)), np.zeros(3))
    bad = np.zeros((4, 9))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rule.fit(bad, np.zeros(4))


@pytest.mark.parametrize("name", ["smaller", "bigger", "threshold", "learned"])
def test_rules_export_without_data_dependent_branches(name: str) -> None:
    """``torch.export`` with a dynamic batch (it refuses Python branches on data values) and
    the exported program answers another batch like the eager module: the rule is tensor ops
    only, what an ONNX / TorchScript export of the routed model needs."""
    f, y = _synthetic(200, 3)
    f[:, AGE_VAN], f[:, AGE_BAL] = y + 3, y - 2
    f[:, -1] = -5
    rule = make_rule(name)
    if rule.needs_fit:
        rule.fit(f, y)
    x = torch.as_tensor(f, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(rule, (x[:50],), dynamic_shapes=({0: batch},))
    assert torch.equal(program.module()(x[50:]), rule(x[50:]))


# ------------------------------------------------------------------ inside the model


def _two_head_model() -> tuple[torch.nn.Module, Config]:
    cfg = Config()
    cfg.data.image_size = SIZE
    cfg.model = ModelConfig(head="glae", pretrained=None)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.add_balanced_head(freeze=False)
    with torch.no_grad():
        for p in model.heads["balanced"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), cfg


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_model_routes_by_its_rule_and_round_trips(tmp_path: Path) -> None:
    model, cfg = _two_head_model()
    x, x_new = _images(24, 0), _images(6, 1)
    pred = predict(model, x)
    assert pred.rule == "smaller" and pred.features.shape == (24, len(FEATURES))
    assert torch.equal(
        pred.head, (pred.heads["vanilla"]["kl"] >= pred.heads["balanced"]["kl"]).long()
    )
    # Fit both rules on this batch's features (a stand-in for the validation split).
    labels = pred.heads["vanilla"]["age"] + torch.linspace(-10, 10, 24)
    with pytest.raises(ValueError, match="not fitted"):
        model.set_router(make_rule("learned"))
    with pytest.raises(ValueError, match="no fitted 'threshold'"):
        predict(model, x_new, rule="threshold")
    threshold, learned = make_rule("threshold"), make_rule("learned", hidden=4, steps=100)
    threshold.fit(pred.features, labels)
    learned.fit(pred.features, labels)
    model.set_router(threshold, serve=False)
    model.set_router(learned)  # serve=True: predict's default from now on
    assert model.routing_rule == "learned"
    routed = predict(model, x_new)
    assert routed.rule == "learned"
    expected = learned(routed.features)
    assert torch.equal(routed.weight, expected)
    assert torch.equal(
        routed.age,
        mix_ages(routed.heads["vanilla"]["age"], routed.heads["balanced"]["age"], expected),
    )
    # Overrides for evaluation: any rule by name, the oracle with labels.
    smaller = predict(model, x_new, rule="smaller")
    assert smaller.rule == "smaller"
    y_new = torch.full((6,), 40.0)
    oracle = predict(model, x_new, rule="oracle", labels=y_new)
    err = (oracle.age - y_new).abs()
    assert (err <= (routed.heads["vanilla"]["age"] - y_new).abs() + 1e-5).all()
    assert (err <= (routed.heads["balanced"]["age"] - y_new).abs() + 1e-5).all()
    with pytest.raises(ValueError, match="never served"):
        model.use_rule("oracle")
    with pytest.raises(ValueError, match="never served"):
        model.set_router(make_rule("oracle"))

    folder = save_model(model, tmp_path / "m", cfg)
    info = json.loads((folder / "model.json").read_text())
    assert info["routing"]["rule"] == "learned"
    assert set(info["routing"]["rules"]) == {"threshold", "learned"}
    assert info["routing"]["rules"]["learned"]["settings"]["hidden"] == 4
    assert "objective" in info["routing"]["rules"]["learned"]["fit"]
    loaded, _ = load_model(folder)
    assert loaded.routing_rule == "learned"
    again = predict(loaded, x_new)
    assert again.rule == "learned"
    assert torch.equal(again.age, routed.age) and torch.equal(again.weight, routed.weight)
    assert torch.equal(loaded.routers["threshold"].tau, threshold.tau)
    assert torch.equal(
        predict(loaded, x_new, rule="threshold").age, predict(model, x_new, rule="threshold").age
    )
    # The fitted numbers are in the safetensors file, not in model.json.
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    assert {"routers.learned.w1", "routers.learned.fitted", "routers.threshold.tau"} <= set(state)
    # A model.json that names a fitted rule it does not carry fails with a clear message.
    info["routing"] = {"rule": "threshold", "rules": {}}
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no fitted 'threshold' rule is saved"):
        load_model(folder)
    info["routing"] = {"rule": "oracle", "rules": {}}
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="never served"):
        load_model(folder)


def test_model_saved_before_routing_rules_loads_with_eq11(tmp_path: Path) -> None:
    model, cfg = _two_head_model()
    folder = save_model(model, tmp_path / "m", cfg)
    info = json.loads((folder / "model.json").read_text())
    del info["routing"]
    (folder / "model.json").write_text(json.dumps(info))
    loaded, _ = load_model(folder)
    assert loaded.routing_rule == "smaller" and len(loaded.routers) == 0
    x = _images(4, 2)
    assert torch.equal(predict(loaded, x).age, predict(model, x).age)


def test_learned_router_is_a_buffer_module() -> None:
    rule = LearnedRouter(hidden=4)
    assert list(rule.parameters()) == []  # nothing an optimiser or count_parameters sees
    assert {n for n, _ in rule.named_buffers()} == {
        "mean",
        "scale",
        "w1",
        "b1",
        "w2",
        "b2",
        "fitted",
    }
    assert not rule.is_fitted
    f = torch.zeros(3, len(FEATURES))
    f[:, KL_VAN] = f[:, KL_BAL] = 0.01
    assert route_features is not None and rule(f).shape == (3,)


def test_config_routing_section_matches_the_registry() -> None:
    from ageray.config import (
        FITTED_ROUTING_RULES,
        SERVABLE_ROUTING_RULES,
        ConfigError,
        load_config,
    )
    from ageray.model.routing import rules_to_fit

    assert set(SERVABLE_ROUTING_RULES) == set(servable_rules())
    assert {n for n, c in ROUTING_RULES.items() if c.needs_fit} == set(FITTED_ROUTING_RULES)
    cfg = load_config(
        None, ["routing.rule=learned", "routing.fit=[threshold]", "routing.mode=hard"]
    )
    rules = rules_to_fit(cfg.routing)
    assert sorted(rules) == ["learned", "threshold"]  # the served rule is always fitted
    assert rules["learned"].settings()["mode"] == "hard"
    assert rules["threshold"].settings() == {"weighting": "auto", "age_share": None}
    blend = load_config(None, ["routing.weighting=blend", "routing.age_share=0.3"]).routing
    assert rules_to_fit(blend)["learned"].settings()["weighting"] == 0.3
    assert rules_to_fit(load_config(None, ["routing.fit=[]"]).routing) == {}
    with pytest.raises(ConfigError, match="never served"):
        load_config(None, ["routing.rule=oracle"])
    with pytest.raises(ConfigError, match="the split the evaluation scores"):
        load_config(None, ["routing.fit_split=test"])
    with pytest.raises(ConfigError, match=r"\['smaller'\] need no fitting"):
        load_config(None, ["routing.fit=[smaller]"])
