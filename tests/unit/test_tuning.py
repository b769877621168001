"""The rules of a search, without Ray: space files (distributions, paired values,
expressions over r, errors that name the key), the metric and its derived form, the
concurrency rule, ASHA's rungs, the results table, plots and the best recipe."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml

from ageray.config import RayConfig, load_config, to_dict
from ageray.tuning import (
    EPOCH_KEY,
    FINAL_KEY,
    SearchSpace,
    TrialRecord,
    TuningError,
    asha_rungs,
    best_recipe,
    best_record,
    build_table,
    check_space_values,
    enrich_report,
    eval_expression,
    grid_size,
    load_space,
    max_concurrent_trials,
    parse_metric,
    parse_space,
    plot_curves,
    plot_metric_vs_params,
    resolve_sample,
    trial_config,
    trial_driver,
    trial_resources,
    write_best_recipe,
    write_csv,
)

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "tuning" / "spaces"
PAIRS = "model.fr_kernel,model.fr_stride"
TABLE_III = [["r", "r/2"], ["r", "r"], ["2r", "r/2"], ["2r", "r"]]


def base() -> dict:
    return to_dict(load_config(ROOT / "recipes" / "demo.yaml"))


# ------------------------------------------------------------------ space files


def test_import_does_not_pull_in_ray():
    """The rules are importable on a machine that only edits space files."""
    import subprocess

    code = "import sys, ageray.tuning; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_parse_and_build_valid_configs(path: Path):
    space = load_space(path)
    assert space.params
    check_space_values(space, base())
    assert grid_size(space) >= 1


def test_shipped_spaces_cover_the_papers():
    bs = load_space(SPACES / "batch_size.yaml").param("data.batch_size")
    assert bs.values == (16, 32, 64, 128) and bs.kind == "grid"
    pairs = load_space(SPACES / "fr_kernel_stride.yaml")
    assert pairs.param(PAIRS).keys == ("model.fr_kernel", "model.fr_stride")
    assert pairs.fixed["model.proj_depth"] == 0
    depth = load_space(SPACES / "proj_depth.yaml").param("model.proj_depth")
    assert depth.values == (0, 1, 2)
    optim = load_space(SPACES / "optim.yaml")
    assert {p.kind for p in optim.params} == {"loguniform"}
    combined = load_space(SPACES / "glae_r18.yaml")
    assert grid_size(combined) == 12  # 4 pairs x 3 depths


def test_paired_values_resolve_against_r():
    space = parse_space({"params": {PAIRS: {"grid": TABLE_III}}})
    p = space.param(PAIRS)
    assert p.paired and p.tune_values() == ["r,r/2", "r,r", "2r,r/2", "2r,r"]
    got = [resolve_sample(space, {PAIRS: v}, base()) for v in p.tune_values()]
    assert [(g["model.fr_kernel"], g["model.fr_stride"]) for g in got] == [
        (16, 8),
        (16, 16),
        (32, 8),
        (32, 16),
    ]
    assert all(isinstance(v, int) for g in got for v in g.values())


def test_expressions_use_the_trials_own_r():
    space = parse_space(
        {"params": {"model.fr_r": {"grid": [8, 16]}, PAIRS: {"grid": [["2r", "r/2"]]}}}
    )
    out = resolve_sample(space, {"model.fr_r": 8, PAIRS: "2r,r/2"}, base())
    assert out == {"model.fr_r": 8, "model.fr_kernel": 16, "model.fr_stride": 4}


def test_numeric_strings_from_yaml_are_numbers():
    # PyYAML reads 1e-3 (no dot) as a string; on a numeric key it is still a number.
    space = parse_space(yaml.safe_load("params: {train.stage1.optim.lr: {grid: [1e-3, 0.1]}}"))
    assert space.params[0].values == (0.001, 0.1)
    cont = parse_space(yaml.safe_load("params: {train.stage1.optim.lr: {loguniform: [1e-4, 1]}}"))
    assert (cont.params[0].low, cont.params[0].high) == (1e-4, 1.0)


def test_string_values_of_text_keys_are_not_expressions():
    space = parse_space({"params": {"model.backbone": {"choice": ["resnet18", "resnet34"]}}})
    assert resolve_sample(space, {"model.backbone": "resnet34"}, base()) == {
        "model.backbone": "resnet34"
    }


@pytest.mark.parametrize(
    "text,expected",
    [("r", 16), ("r/2", 8), ("2r", 32), ("2*r", 32), ("(r + 2) // 3", 6), ("-r", -16)],
)
def test_eval_expression(text: str, expected: int):
    assert eval_expression(text, {"r": 16}) == expected


@pytest.mark.parametrize(
    "text,fragment", [("__import__('os')", "only numbers"), ("q/2", "uses 'q'"), ("r/0", "zero")]
)
def test_eval_expression_rejects(text: str, fragment: str):
    with pytest.raises(TuningError, match=fragment):
        eval_expression(text, {"r": 16})


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"serch": {}}, "unknown section.*'serch'.*known sections: search, fixed, params"),
        ({"params": {"model.fr_kernal": {"grid": [1]}}}, "did you mean 'model.fr_kernel'"),
        ({"params": {"model.fr_kernel": {"grd": [1]}}}, "unknown distribution 'grd'"),
        ({"params": {"model.fr_kernel": [16, 32]}}, "exactly one distribution"),
        ({"params": {PAIRS: {"grid": [[16, 8], [16]]}}}, r"value #2 \[16\] must be a list of 2"),
        ({"params": {PAIRS: {"loguniform": [1, 2]}}}, "paired keys need grid or choice"),
        ({"params": {"model.backbone": {"uniform": [1, 2]}}}, "needs a numeric config key"),
        ({"params": {"train.stage1.optim.lr": {"loguniform": [0, 1]}}}, "low > 0"),
        ({"params": {"train.stage1.optim.lr": {"uniform": [1, 1]}}}, "low < high"),
        ({"params": {"data.batch_size": {"grid": [16, 16]}}}, "duplicate"),
        ({"params": {"ray.num_workers": {"grid": [1, 2]}}}, "set them with --set"),
        ({"params": {"train.stage1.epochs": {"grid": [1, 2]}}}, "set search.epochs"),
        ({"search": {"algo": "grid"}}, "unknown search setting.*'algo'.*known: algorithm"),
        ({"search": {"algorithm": "bayes"}}, "not one of grid, random, optuna"),
        ({"search": {"metric": "rmse"}}, "metric 'rmse' is not one of"),
        ({"search": {"scheduler": {"name": "pbt"}}}, "not asha or fifo"),
        ({"search": {"scheduler": {"reduction_factor": 1}}}, "must be > 1"),
        ({"search": {"num_samples": 0}}, "num_samples=0 must be >= 1"),
        (
            {"fixed": {"model.proj_depth": 0}, "params": {"model.proj_depth": {"grid": [1]}}},
            "both searched",
        ),
        ({"params": {PAIRS: {"grid": [["r", "r/k"]]}}}, "uses 'k'"),
    ],
)
def test_space_errors_name_the_key_and_the_fix(data: dict, fragment: str):
    with pytest.raises(TuningError, match=fragment):
        parse_space(data, source="s.yaml")


def test_missing_space_file_lists_the_shipped_ones(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(TuningError, match=r"shipped spaces: .*fr_kernel_stride\.yaml"):
        load_space(tmp_path / "nope.yaml")


def test_space_value_giving_an_invalid_config_fails_before_trials():
    space = parse_space({"params": {"model.head": {"grid": ["glae", "mlp"]}}}, source="s.yaml")
    with pytest.raises(TuningError, match=r"params\.model\.head value 'mlp'"):
        check_space_values(space, base())


def test_grid_size_and_trial_config():
    space = load_space(SPACES / "glae_r18.yaml")
    assert grid_size(space, "grid") == 12
    assert grid_size(space, "random") == 1  # random: num_samples draws
    cfg = trial_config(base(), {"model.fr_kernel": 32, "model.fr_stride": 8})
    assert (cfg.model.fr_kernel, cfg.model.fr_stride) == (32, 8)
    with pytest.raises(TuningError, match="invalid config"):
        trial_config(base(), {"model.head": "nope"})


# ------------------------------------------------------------------ metric


def test_metric_names_modes_and_derived_value():
    assert (parse_metric("mae").key, parse_metric("mae").mode) == ("val_mae", "min")
    assert (parse_metric("val_cmae").key, parse_metric("aar").mode) == ("val_cmae", "max")
    spec = parse_metric("mae+cmae", 0.25)
    assert spec.derived and spec.key == "val_mae_cmae" and spec.mode == "min"
    assert spec.value({"val_mae": 2.0, "val_cmae": 6.0}) == pytest.approx(0.25 * 2 + 0.75 * 6)
    assert spec.value({"val_mae": 2.0}) is None
    assert parse_metric("mae").value({"val_mae": float("nan")}) is None
    with pytest.raises(TuningError, match=r"must be in \[0, 1\]"):
        parse_metric("mae+cmae", 1.5)


def test_enrich_report_adds_epoch_derived_metric_and_constants():
    spec = parse_metric("mae+cmae", 0.5)
    out = enrich_report({"epoch": 2.0, "val_mae": 4.0, "val_cmae": 8.0}, spec, {"num_params": 7})
    assert out[EPOCH_KEY] == 3 and out["val_mae_cmae"] == 6.0 and out["num_params"] == 7
    plain = enrich_report({"epoch": 0.0, "val_mae": 4.0}, parse_metric("mae"))
    assert plain == {"epoch": 0.0, "val_mae": 4.0, EPOCH_KEY: 1}


# ------------------------------------------------------------------ concurrency, ASHA


def test_trial_resources_count_workers_and_the_driver():
    assert trial_resources(RayConfig(num_workers=1, cpus_per_worker=1), 0.1) == {
        "CPU": pytest.approx(1.1)
    }
    need = trial_resources(RayConfig(num_workers=2, use_gpu=True, cpus_per_worker=4), 0.1)
    assert need == {"CPU": pytest.approx(8.1), "GPU": 2.0}


@pytest.mark.parametrize(
    "cluster,need,expected",
    [
        ({"CPU": 2.0}, {"CPU": 1.1}, 1),  # the 2-core machine: one trial at a time
        ({"CPU": 2.0}, {"CPU": 0.6}, 3),
        ({"CPU": 16.0, "GPU": 4.0}, {"CPU": 2.1, "GPU": 2.0}, 2),  # GPUs bind
        ({"CPU": 64.0, "GPU": 8.0}, {"CPU": 4.1, "GPU": 1.0}, 8),
        ({"CPU": 3.3}, {"CPU": 1.1}, 3),  # float noise must not lose a trial
    ],
)
def test_max_concurrent_trials(cluster: dict, need: dict, expected: int):
    assert max_concurrent_trials(cluster, need)[0] == expected


def test_max_concurrent_trials_when_nothing_fits():
    with pytest.raises(TuningError, match=r"lower ray.num_workers"):
        max_concurrent_trials({"CPU": 2.0}, {"CPU": 2.1, "GPU": 1.0})
    n, why = max_concurrent_trials({"CPU": 2.0}, {"CPU": 4.1, "GPU": 1.0}, autoscaling=True)
    assert n == 1 and "autoscaler" in why
    assert max_concurrent_trials({"CPU": 2.0}, {"CPU": 1.1}, override=4)[0] == 4


@pytest.mark.parametrize(
    "epochs,grace,rf,rungs",
    [(2, 1, 2, [1]), (4, 1, 2, [1, 2]), (5, 2, 2, [2, 4]), (12, 3, 2, [3, 6]), (1, 1, 2, [])],
)
def test_asha_rungs_stop_before_the_last_epoch(epochs, grace, rf, rungs):
    assert asha_rungs(epochs, grace, rf) == rungs
    assert all(r < epochs for r in rungs)


# ------------------------------------------------------------------ results


def _rows(values: list[tuple[float, float]], final: bool, params: int = 11_000_000) -> list:
    rows = [
        {EPOCH_KEY: i + 1, "epoch": float(i), "val_mae": m, "val_cmae": c, "num_params": params}
        for i, (m, c) in enumerate(values)
    ]
    if final:
        rows.append({FINAL_KEY: 1, EPOCH_KEY: 3, "val_mae": 0.0, "num_params": params})
    return rows


def records_and_space() -> tuple[list[TrialRecord], SearchSpace]:
    space = parse_space({"params": {PAIRS: {"grid": TABLE_III}}})
    b = base()
    recs = []
    specs = [
        ("t0", "r,r/2", "TERMINATED", _rows([(9, 12), (7, 10), (6, 8)], True)),
        ("t1", "r,r", "TERMINATED", _rows([(8, 9), (5, 11), (5.5, 7)], True, 12_000_000)),
        ("t2", "2r,r/2", "TERMINATED", _rows([(12, 14)], False)),  # cut by ASHA
        ("t3", "2r,r", "ERROR", []),
    ]
    for tid, value, status, rows in specs:
        config = {PAIRS: value}
        recs.append(
            TrialRecord(
                tid,
                status,
                config,
                rows,
                overrides=resolve_sample(space, config, b),
                failures=2 if status == "ERROR" else 0,
                error="ValueError: kernel too big" if status == "ERROR" else None,
            )
        )
    return recs, space


def test_trial_record_status_epochs_and_best_epoch():
    recs, _ = records_and_space()
    mae = parse_metric("mae")
    assert [r.status(3) for r in recs] == ["completed", "completed", "stopped", "failed"]
    assert [r.epochs_run for r in recs] == [3, 3, 1, 0]
    assert recs[0].best_value(mae) == 6 and recs[1].best_value(mae) == 5
    # the closing report (val_mae 0.0 here) never counts as an epoch
    assert len(recs[0].history) == 3 and recs[0].final is not None
    assert best_record(recs, mae).trial_id == "t1"
    assert best_record(recs, parse_metric("cmae")).trial_id == "t1"  # CMAE 7 at epoch 3
    both = parse_metric("mae+cmae", 0.5)
    assert recs[0].best_value(both) == 7.0 and recs[1].best_value(both) == 6.25


def test_table_like_glae_table_iii(tmp_path: Path):
    recs, space = records_and_space()
    spec = parse_metric("mae")
    table = build_table(recs, space, spec, epochs=3, bindings={"r": 16})
    headers = [c.header for c in table.columns]
    assert headers[:5] == ["trial", "r", "(fr_kernel, fr_stride)", "fr_kernel", "fr_stride"]
    assert {"MAE", "CMAE", "params", "epochs (of 3)", "status"} <= set(headers)
    md = table.markdown()
    assert "| t1 (best) | 16 | (r, r) | 16 | 16 | **5.000** |" in md
    assert "| t2 | 16 | (2r, r/2) | 32 | 8 | 12.000 | 14.000 | 11.00M | 1 | stopped |" in md
    assert "failed" in md and table.best_trial == "t1"
    path = write_csv(tmp_path / "t.csv", table)
    rows = list(csv.DictReader(path.open()))
    assert rows[3]["status"] == "failed" and rows[3]["failures"] == "2"
    assert rows[1]["model.fr_kernel"] == "16" and rows[1]["best_epoch"] == "2"
    assert rows[0]["num_params"] == "11000000" and rows[1]["run_id"] == ""


def test_table_like_glae_table_iv_with_derived_metric():
    space = parse_space({"params": {"model.proj_depth": {"grid": [0, 1, 2]}}})
    recs = [
        TrialRecord(
            f"d{d}",
            "TERMINATED",
            {"model.proj_depth": d},
            _rows([(5 - d, 6)], True, 11_000_000 + d * 300_000),
            overrides={"model.proj_depth": d},
        )
        for d in (0, 1, 2)
    ]
    spec = parse_metric("mae+cmae", 0.5)
    table = build_table(recs, space, spec, epochs=3)
    headers = [c.header for c in table.columns]
    assert headers == [
        "trial",
        "proj_depth",
        "MAE",
        "CMAE",
        spec.label,
        "params",
        "epochs (of 3)",
        "status",
    ]
    assert "| d2 (best) | 2 | **3.000** | **6.000** | **4.500** | 11.60M | 3 | completed |" in (
        table.markdown()
    )


def test_plots_are_written(tmp_path: Path):
    recs, space = records_and_space()
    spec = parse_metric("mae")
    a = plot_metric_vs_params(recs, space, spec, 3, tmp_path / "m.png")
    b = plot_curves(recs, space, spec, tmp_path / "c.png")
    cont = parse_space({"params": {"train.stage1.optim.lr": {"loguniform": [1e-3, 1]}}})
    lr = [TrialRecord("x", "TERMINATED", {"train.stage1.optim.lr": 0.01}, _rows([(3, 4)], True))]
    c = plot_metric_vs_params(lr, cont, spec, 3, tmp_path / "lr.png")
    for p in (a, b, c):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_recipe_round_trips_through_load_config(tmp_path: Path):
    recs, _ = records_and_space()
    best = best_record(recs, parse_metric("mae"))
    cfg = best_recipe(base(), best.overrides, "demo-best")
    path = write_best_recipe(tmp_path / "best.yaml", cfg, ["best of a search", "second line"])
    text = path.read_text()
    assert text.startswith("# best of a search\n# second line\n")
    loaded = load_config(path)
    assert loaded == cfg
    assert (loaded.model.fr_kernel, loaded.model.fr_stride) == (16, 16)
    assert loaded.run.name == "demo-best"
    assert loaded.data.shards == base()["data"]["shards"]  # paths as the user wrote them


def test_replay_asha_refills_a_restored_schedulers_rungs():
    """Tune does not save ASHA's rungs; a resumed search refills them from the records."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    from ageray.tuning import replay_asha

    sched = ASHAScheduler(
        time_attr=EPOCH_KEY, max_t=2, grace_period=1, reduction_factor=2, stop_last_trials=False
    )
    sched.set_search_properties("val_mae", "min")
    earlier = [TrialRecord("a", "TERMINATED", {}, _rows([(5, 5), (4, 4)], True))]
    assert replay_asha(sched, earlier, parse_metric("mae")) == 1
    worse, better = SimpleNamespace(trial_id="b"), SimpleNamespace(trial_id="c")
    for t in (worse, better):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, worse, {EPOCH_KEY: 1, "val_mae": 9.0}) == "STOP"
    assert sched.on_trial_result(None, better, {EPOCH_KEY: 1, "val_mae": 1.0}) == "CONTINUE"
    assert replay_asha(object(), earlier, parse_metric("mae")) == 0  # not ASHA: untouched


def test_searchers_sample_the_space_tune_sees():
    """Grid search enumerates grid values (pairs as labels), Optuna samples every parameter;
    each sample decodes back to config values. No Ray cluster: searchers are plain objects."""
    from ray.tune.search.variant_generator import generate_variants

    from ageray.tuning import tune_param_space
    from ageray.tuning.algorithms import make_searcher

    data = {
        "params": {
            PAIRS: {"grid": TABLE_III},
            "model.proj_depth": {"grid": [0, 1, 2]},
            "train.stage1.optim.lr": {"loguniform": [1e-3, 1.0]},
        }
    }
    grid = parse_space(data)
    variants = [cfg for _, cfg in generate_variants(tune_param_space(grid))]
    assert len(variants) == grid_size(grid) == 12
    assert {v[PAIRS] for v in variants} == {"r,r/2", "r,r", "2r,r/2", "2r,r"}

    data["search"] = {"algorithm": "optuna", "num_samples": 3, "seed": 1}
    space = parse_space(data)
    searcher = make_searcher(space, 1)
    assert searcher.set_search_properties("val_mae", "min", tune_param_space(space))
    for i in range(3):
        sample = searcher.suggest(f"t{i}")
        out = resolve_sample(space, sample, base())
        assert out["model.fr_kernel"] in (16, 32) and out["model.proj_depth"] in (0, 1, 2)
        assert 1e-3 <= out["train.stage1.optim.lr"] <= 1.0


def test_tune_state_saved_before_the_package_split_still_loads():
    """Tune pickles its state (the RunConfig's callbacks, the TuneConfig's trial folder
    namer) and Train its callbacks by module path. A search started when tuning was one
    module (``ageray.tuning.SearchMonitor``, ``ageray.tuning._trial_dirname``, ...) must still
    resume: ``data/tune_state_before_split.pkl`` was written by that module with Ray's
    cloudpickle (those objects, as Tune saves them) and must load into today's classes."""
    import pickletools

    import ray.cloudpickle as cloudpickle

    from ageray.tuning.callbacks import SearchMonitor, TrialReportCallback
    from ageray.tuning.search import _trial_dirname

    blob = (Path(__file__).parent / "data" / "tune_state_before_split.pkl").read_bytes()
    strings = [arg for _, arg, _ in pickletools.genops(blob) if isinstance(arg, str)]
    assert "ageray.tuning" in strings and "ageray.tuning.callbacks" not in strings  # old paths
    state = cloudpickle.loads(blob)
    (monitor,) = state["callbacks"]
    assert type(monitor) is SearchMonitor
    assert monitor.epochs == 2 and monitor.space_raw["params"]["model.proj_depth"]
    (report,) = state["train_callbacks"]
    assert type(report) is TrialReportCallback and report.weight == 0.25
    assert state["trial_dirname_creator"] is _trial_dirname
    assert state["trainable"] is trial_driver


def test_closing_report_of_a_trial(tmp_path: Path):
    """A trial's last report: stage 1's best validation metrics and the search metric,
    stage 2's as stage2_*, the test rows' MAE / CMAE / AAR (not their group breakdowns)."""
    from ageray.training.driver import StageResult
    from ageray.training.pipeline import PipelineResult
    from ageray.tuning.trial import closing_report

    r1 = StageResult("stage1", tmp_path, {"val_mae": 4.0, "val_cmae": 6.0, "fit_time_s": 9}, "c")
    r2 = StageResult("stage2", tmp_path, {"val_routed_cmae": 5.0, "train_loss": 1.0}, "c2")
    flat = {"test_routed_mae": 3.5, "test_routed_mae_0-17": 2.0, "test_vanilla_aar": 4.1}
    result = PipelineResult("run", stage1=r1, stage2=r2, report={"flat_metrics": flat})
    final = closing_report(result, parse_metric("mae+cmae", 0.5), epochs=3, num_params=7)
    assert final == {
        FINAL_KEY: 1,
        EPOCH_KEY: 3,
        "num_params": 7,
        "val_mae": 4.0,
        "val_cmae": 6.0,
        "val_mae_cmae": 5.0,
        "stage2_val_routed_cmae": 5.0,
        "test_routed_mae": 3.5,
        "test_vanilla_aar": 4.1,
    }


def test_resume_compares_an_older_search_definition_in_todays_terms():
    """A search started by an earlier release wrote its config without keys added since and
    with keys retired since; neither is a change of the search, a changed value is."""
    from ageray.config import RETIRED_KEYS, Config, flatten
    from ageray.tuning.search import _definition, _diff, _in_todays_terms

    space = parse_space({"params": {"model.proj_depth": {"grid": [0, 1]}}})
    now = _definition(base(), space, parse_metric("mae"))
    old = _definition(base(), space, parse_metric("mae"))
    default = flatten(to_dict(Config()))
    added = next(k for k, v in flatten(old["config"]).items() if default.get(k) == v)
    *path, leaf = added.split(".")
    node = old["config"]
    for part in path:
        node = node[part]
    del node[leaf]  # as if the key did not exist yet (its default is what the search used)
    section, key = next(iter(RETIRED_KEYS)).split(".")
    old["config"][section][key] = True  # a key that no longer exists
    assert _diff(old, now)  # compared as written, they differ
    assert _diff(_in_todays_terms(old), now) == []
    old["config"]["model"]["fr_kernel"] = 32
    assert _diff(_in_todays_terms(old), now) == ["config.model.fr_kernel"]
