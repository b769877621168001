"""A real search on a real local Ray (2 CPUs): 5 trials x 2 epochs of ResNet-18 at 64 px on
600 synthetic faces, one Train worker per trial, an embedded sqlite MLflow store.

The search is interrupted (SIGINT, as Ctrl+C) when its second trial starts and resumed; it
must then finish without retraining the first trial and restart the interrupted one, ASHA
must cut the trials that cannot learn (learning rate <= 4e-7) at epoch 1, the trial whose
FR kernel does not fit the feature map must fail, be retried once and be reported, MLflow
must hold one child run per trial, and the best configuration must come out as a recipe
that jobs.train trains from. A second resume must train nothing at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Grid order is trial order (one trial at a time on 2 CPUs): the learning trial first, so
# ASHA's rung-1 cutoff is set by it and the near-untrained ones fall below it (the smaller
# the learning rate the worse, so each is below the median of those before it). The last
# pair asks for an FR kernel of 4r = 64 on a 32-pixel rearranged map (64 px input, r = 16):
# the trial driver's model check fails, Tune retries once, then reports it failed.
SPACE = """
search:
  algorithm: grid
  metric: mae+cmae
  metric_weight: 0.5
  epochs: 2
  scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
params:
  train.stage1.optim.lr,model.fr_kernel:
    grid: [[0.8, r], [4.0e-7, r], [2.0e-7, r], [1.0e-7, r], [0.8, 4r]]
"""
NAME = "itest"


def _interrupt_class() -> type:
    from ray import tune

    class InterruptAtSecondTrial(tune.Callback):
        """Ctrl+C for the search driver as its second trial starts (the first is done)."""

        def __init__(self) -> None:
            self.started = 0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any):
            self.started += 1
            if self.started == 2:
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptAtSecondTrial


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    out = tmp_path_factory.mktemp("tune-shards") / "synthetic"
    write_shards(
        iter_synthetic(num_samples=600, image_size=64),
        out,
        source="synthetic",
        workers=1,
        progress=False,
    )
    return out


def options(shards: Path, storage: Path, space: Path, **kw: Any):
    from ageray.tuning import SearchOptions

    return SearchOptions(
        space=str(space),
        config=str(ROOT / "recipes" / "demo.yaml"),
        overrides=[
            f"data.shards={shards}",
            f"run.storage_path={storage}",
            "data.num_workers=0",
            "data.eval_batch_size=64",
            "train.log_every=0",
        ],
        name=NAME,
        **kw,
    )


def checkpoints(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/stage1/checkpoint_*"))


def reports(outcome) -> dict[str, int]:
    return {r.trial_id: len(r.rows) for r in outcome.records}


@pytest.fixture(scope="module")
def search(ray_local, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Interrupted run, resume, second resume; everything the tests look at."""
    from ageray.tuning import release_orphaned_placement_groups, run_search

    storage = tmp_path_factory.mktemp("tune-runs")
    space = storage / "space.yaml"
    space.write_text(SPACE)
    root = storage / NAME
    t0 = time.time()
    first = run_search(options(shards, storage, space), extra_callbacks=[_interrupt_class()()])
    t1 = time.time()
    done_first = [r for r in first.records if r.status(first.epochs) == "completed"]
    assert len(done_first) == 1, [(r.trial_id, r.tune_status) for r in first.records]
    first_id = done_first[0].trial_id
    result_json = root / first_id / "stage1" / "result.json"
    mtime = result_json.stat().st_mtime
    first_rows = len(done_first[0].rows)

    resumed = run_search(options(shards, storage, space, resume=True))
    t2 = time.time()
    ckpts = checkpoints(root)
    again = run_search(options(shards, storage, space, resume=True))
    t3 = time.time()
    yield {
        "storage": storage,
        "root": root,
        "first": first,
        "resumed": resumed,
        "again": again,
        "first_id": first_id,
        "first_rows": first_rows,
        "result_json": result_json,
        "mtime": mtime,
        "ckpts": ckpts,
        "ckpts_again": checkpoints(root),
        "times": (t1 - t0, t2 - t1, t3 - t2),
    }
    time.sleep(1.0)
    release_orphaned_placement_groups()  # leave the session's Ray as we found it


def by_status(outcome) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in outcome.records:
        out.setdefault(r.status(outcome.epochs), []).append(r.trial_id)
    return out


def test_interrupted_search_reports_unfinished_trials(search):
    first = search["first"]
    assert first.interrupted
    statuses = by_status(first)
    assert statuses["completed"] == [search["first_id"]]
    assert len(statuses["unfinished"]) == 1 and len(first.records) == 2


def test_resumed_search_completes_without_retraining_finished_trials(search):
    resumed = search["resumed"]
    assert resumed.resumed and not resumed.interrupted
    assert len(resumed.records) == 5
    first = next(r for r in resumed.records if r.trial_id == search["first_id"])
    assert first.status(2) == "completed"
    assert len(first.rows) == search["first_rows"]  # no new reports from it
    assert search["result_json"].stat().st_mtime == search["mtime"]


def test_asha_stops_untrainable_trials_early(search):
    resumed = search["resumed"]
    statuses = by_status(resumed)
    assert len(statuses.get("stopped", [])) >= 1, statuses
    ordered = sorted(resumed.records, key=lambda r: r.trial_id)
    assert ordered[0].epochs_run == 2  # the learning trial ran to the end
    for rec in ordered[1:3]:  # lr 4e-7 and 2e-7: below the rung-1 cutoff
        assert rec.status(2) == "stopped" and rec.epochs_run == 1, rec
    assert resumed.best is not None and resumed.best.trial_id == ordered[0].trial_id


def test_failed_trial_is_retried_once_and_reported(search):
    from ageray.tuning import format_summary

    resumed = search["resumed"]
    failed = [r for r in resumed.records if r.status(2) == "failed"]
    assert len(failed) == 1
    rec = failed[0]
    assert rec.overrides["model.fr_kernel"] == 64
    assert rec.failures == 2  # the first attempt and Tune's one retry
    assert "kernel_size=64" in (rec.error or ""), rec.error
    assert "FAILED:  trial" in format_summary(resumed)
    summary = resumed.table.markdown()
    assert "| failed |" in summary and "1 failed" in summary


def test_results_table_plots_and_best_recipe(search):
    resumed = search["resumed"]
    files = resumed.files
    for key in ("table_md", "table_csv", "plot", "curves", "best_recipe", "summary"):
        assert files[key].is_file() and files[key].stat().st_size > 0, key
    md = files["table_md"].read_text()
    for header in ("lr", "fr_kernel", "MAE", "CMAE", "params", "epochs (of 2)", "status"):
        assert f"| {header} " in md or f" {header} |" in md, header
    assert "11.49M" in md  # ResNet-18 + GLAE head at 64 px
    rows = files["table_csv"].read_text().splitlines()
    assert len(rows) == 1 + 5


def test_best_recipe_loads_and_trains(search, ray_local):
    from ageray.config import load_config
    from jobs.train import main as train_main

    recipe = search["resumed"].best_recipe
    cfg = load_config(recipe)
    assert cfg.train.stage1.optim.lr == pytest.approx(0.8)
    assert (cfg.model.fr_kernel, cfg.model.fr_stride) == (16, 16)
    rc = train_main(
        [
            "--config",
            str(recipe),
            "--set",
            "train.stage1.epochs=1",
            "--set",
            "train.stage2.enabled=false",
            "--no-eval",
            "--no-register",
        ]
    )
    assert rc == 0
    model = Path(cfg.run.storage_path) / cfg.run.name / "stage1" / "model" / "model.safetensors"
    assert model.is_file()


def test_mlflow_has_one_child_run_per_trial(search):
    from mlflow.tracking import MlflowClient

    resumed = search["resumed"]
    client = MlflowClient(resumed.tracking_uri)
    parent = client.get_run(resumed.parent_run_id)
    assert parent.data.tags["ageray.kind"] == "tune-search"
    assert parent.data.metrics["trials_failed"] == 1
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    trials = [c for c in children if c.data.tags.get("ageray.kind") == "tune-trial"]
    assert sorted(c.data.tags["ageray.trial_id"] for c in trials) == sorted(
        r.trial_id for r in resumed.records
    )
    outcome = {c.data.tags["ageray.trial_id"]: c for c in trials}
    for rec in resumed.records:
        run = outcome[rec.trial_id]
        status = rec.status(2)
        assert run.data.tags["ageray.tune.outcome"] == status
        assert run.info.status == {"completed": "FINISHED", "stopped": "KILLED"}.get(
            status, "FAILED"
        )
        if status == "failed":
            assert "kernel_size=64" in run.data.tags["ageray.tune.error"]
            assert run.data.tags["ageray.tune.attempts"] == "2"
        else:
            # the trial's values and resolved config as params, per-epoch metrics from rank 0
            assert run.data.params["tune.model.fr_kernel"] == "16"
            assert run.data.params["model.fr_kernel"] == "16"
            history = client.get_metric_history(run.info.run_id, "val_mae")
            assert len(history) == rec.epochs_run
            derived = client.get_metric_history(run.info.run_id, "val_mae_cmae")
            assert len(derived) == rec.epochs_run
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/table.md", "results/table.csv", "results/best_recipe.yaml"} <= artifacts


def test_second_resume_trains_nothing(search):
    again, resumed = search["again"], search["resumed"]
    assert reports(again) == reports(resumed)
    assert [r.status(2) for r in again.records] == [r.status(2) for r in resumed.records]
    assert search["ckpts_again"] == search["ckpts"]


def test_runtime_is_reported(search):
    first, resumed, again = search["times"]
    print(f"search runtimes: interrupted {first:.0f}s, resumed {resumed:.0f}s, again {again:.0f}s")
    assert again < resumed


def test_cli_help_and_dry_run(ray_local, shards: Path, tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "tuning.search", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--space", "--resume", "--set", "--metric", "--search", "--num-samples"):
        assert flag in out.stdout
    from tuning.search import main

    space = ROOT / "tuning" / "spaces" / "glae_r18.yaml"
    argv = ["--config", str(ROOT / "recipes" / "demo.yaml"), "--space", str(space)]
    argv += ["--set", f"run.storage_path={tmp_path}", "--set", f"data.shards={shards}"]
    assert main([*argv, "--dry-run"]) == 0
    assert main([*argv, "--set", "model.proj_depth=1", "--dry-run"]) == 2  # searched key


def test_trial_with_stage2_and_evaluation(ray_local, shards: Path, tmp_path: Path):
    """The whole pipeline inside one trial: stage 1, stage 2 (class-balanced head) and the
    test evaluation; their numbers reach the table and the trial's MLflow run."""
    from mlflow.tracking import MlflowClient

    from ageray.tuning import run_search

    space = tmp_path / "one.yaml"
    space.write_text(
        "search: {epochs: 1, stage2: true, evaluate: true, metric: cmae}\n"
        "params:\n  model.proj_depth: {grid: [1]}\n"
    )
    opts = options(shards, tmp_path, space, num_samples=1)
    opts.overrides += ["train.stage2.epochs=1"]
    opts.name = "full"
    outcome = run_search(opts)
    (rec,) = outcome.records
    assert rec.status(1) == "completed", rec
    final = rec.final or {}
    for key in ("stage2_val_routed_cmae", "test_routed_mae", "test_vanilla_cmae"):
        assert isinstance(final.get(key), float), (key, sorted(final))
    md = outcome.files["table_md"].read_text()
    assert "test_routed_mae" in md and "stage2_val_routed_cmae" in md
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(rec.run_id)
    assert "test_routed_mae" in run.data.metrics and run.info.status == "FINISHED"
    nested = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{rec.run_id}'"
    )
    assert [r.data.tags.get("ageray.stage") for r in nested] == ["stage2"]
