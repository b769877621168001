"""Training on synthetic shards: the worker loop in this process (stage 1, stage 2 from its
checkpoint, identity pretraining), then through Ray Train with two CPU workers, a real
MLflow server (sqlite backend, artifacts on the SeaweedFS S3 server) and the model registry, then
fault tolerance (a worker killed mid-epoch; a driver killed and the job resubmitted).

Sized for a shared 2-core machine: ResNet-18 at 64 px, ~300 synthetic images, one or two
epochs, batch 32, no DataLoader worker processes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from model_predict import predict
from safetensors.torch import load_file

from ageray.config import Config, load_config
from ageray.data.manifest import read_manifest
from ageray.data.shards import write_shards
from ageray.data.synthetic import iter_synthetic
from ageray.training.checkpoint import load_state, restore
from ageray.training.context import LocalContext, fault_marker
from ageray.training.loop import run_local, run_stage
from ageray.training.optim import build_optimizer, build_scheduler
from ageray.training.plans import plan_for, spec_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BATCH = 32
STAGE1_KEYS = {
    "epoch",
    "epoch_time_s",
    "epoch_cpu_s",
    "torch_threads",
    "lr",
    "train_loss",
    "train_mae",
    "train_kl",
    "train_er",
    "train_loc",
    "train_hol",
    "train_grad_norm",
    "train_images_per_s",
    "train_skipped",
    "val_mae",
    "val_cmae",
    "val_aar",
    "val_samples",
    "val_time_s",
}
STAGE2_KEYS = STAGE1_KEYS | {
    f"val_{row}_{m}" for row in ("balanced", "routed") for m in ("mae", "cmae", "aar")
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 synthetic faces at 64 px with identities (for pretraining), train/val/test."""
    out = tmp_path_factory.mktemp("train-shards") / "synthetic"
    write_shards(
        iter_synthetic(num_samples=320, image_size=64, seed=3),
        out,
        splits="train=0.8,val=0.1,test=0.1",
        workers=2,
        progress=False,
        source="synthetic",
    )
    return out


def tiny_overrides(shards: Path, storage: Path, name: str) -> list[str]:
    """The demo recipe shrunk to seconds per epoch on a shared 2-core machine."""
    return [
        f"data.shards={shards}",
        f"run.storage_path={storage}",
        f"run.name={name}",
        "data.num_workers=0",
        f"data.batch_size={BATCH}",
        "data.eval_batch_size=64",
        "data.shuffle_buffer=64",
        "train.stage1.epochs=1",
        "train.stage2.epochs=1",
        # the demo's peak lr collapses a model this small onto one age within a few steps;
        # a model that still tells images apart makes weight and statistics checks bite
        "train.stage1.optim.lr=0.05",
        "train.stage2.optim.lr=0.05",
        "train.log_every=0",
        "pretrain.epochs=1",
        "pretrain.embedding_dim=32",
    ]


def tiny_cfg(shards: Path, storage: Path, name: str, *extra: str) -> Config:
    return load_config(
        ROOT / "recipes" / "demo.yaml", [*tiny_overrides(shards, storage, name), *extra]
    )


def train_count(shards: Path) -> int:
    return int(read_manifest(str(shards))["splits"]["train"]["count"])


@pytest.fixture(scope="module")
def local_stages(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage 1 (1 epoch) then stage 2 (2 epochs) from stage 1's checkpoint, in-process."""
    work = tmp_path_factory.mktemp("local-stages")
    cfg = tiny_cfg(shards, work / "runs", "local", "train.stage2.epochs=2")
    m1, ctx1 = run_local(spec_for(cfg, "stage1"), work / "s1")
    ckpt1 = ctx1.checkpoints[-1]
    m2, ctx2 = run_local(spec_for(cfg, "stage2", init_model=str(ckpt1)), work / "s2")
    return {"cfg": cfg, "m1": m1, "ctx1": ctx1, "m2": m2, "ctx2": ctx2, "work": work}


# --------------------------------------------------------------------------- (a) in-process


def test_stage1_then_stage2_in_process(local_stages: dict[str, Any], shards: Path) -> None:
    m1, m2 = local_stages["m1"], local_stages["m2"]
    ctx1, ctx2 = local_stages["ctx1"], local_stages["ctx2"]
    assert set(m1) >= STAGE1_KEYS, STAGE1_KEYS - set(m1)
    assert not any(k.startswith(("val_balanced", "val_routed")) for k in m1)
    assert set(m2) >= STAGE2_KEYS, STAGE2_KEYS - set(m2)
    manifest = read_manifest(str(shards))
    # validation sees every sample of the split exactly once
    assert m1["val_samples"] == m2["val_samples"] == manifest["splits"]["val"]["count"]
    assert m1["train_skipped"] == 0 and all(v == v for v in m1.values())  # no NaN

    # one report and one checkpoint per epoch, epochs numbered from 0
    assert [r["epoch"] for r in ctx1.reports] == [0.0]
    assert [r["epoch"] for r in ctx2.reports] == [0.0, 1.0]
    assert len(ctx2.checkpoints) == 2

    # equal step counts: every epoch is count // batch steps, in both stages
    steps = train_count(shards) // BATCH
    s1, s2 = load_state(ctx1.checkpoints[-1]), load_state(ctx2.checkpoints[-1])
    assert (s1["stage"], s1["epoch"], s1["global_step"]) == ("stage1", 0, steps)
    assert (s2["stage"], s2["epoch"], s2["global_step"]) == ("stage2", 1, 2 * steps)
    assert s2["init_model"] == str(ctx1.checkpoints[-1]) and s2["mae_ref"] is None


def test_stage2_trains_only_the_balanced_head(local_stages: dict[str, Any]) -> None:
    from ageray.model import load_model

    w1 = load_file(str(local_stages["ctx1"].checkpoints[-1] / "model.safetensors"))
    w2 = load_file(str(local_stages["ctx2"].checkpoints[-1] / "model.safetensors"))
    assert set(w2) - set(w1) == {k for k in w2 if k.startswith("heads.balanced.")}
    assert set(w1) <= set(w2)
    for k, v in w1.items():  # backbone and vanilla head, BatchNorm statistics included
        assert torch.equal(v, w2[k]), f"stage 2 changed {k}"
    model2, info = load_model(local_stages["ctx2"].checkpoints[-1])
    assert info["heads"] == ["vanilla", "balanced"]
    names = [n for n, p in model2.heads["balanced"].named_parameters() if p.dtype.is_floating_point]
    changed = [
        n for n in names if not torch.equal(w2[f"heads.balanced.{n}"], w2[f"heads.vanilla.{n}"])
    ]
    assert names and changed == names, (
        f"unchanged balanced-head weights: {set(names) - set(changed)}"
    )

    # the two heads now answer differently (the balanced one was trained class-balanced)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pred = predict(model2, x)
    assert not torch.allclose(pred.heads["vanilla"]["age"], pred.heads["balanced"]["age"])


def test_checkpoint_restores_optimizer_and_schedule(local_stages: dict[str, Any]) -> None:
    cfg: Config = local_stages["cfg"]
    ckpt1, ckpt2 = local_stages["ctx1"].checkpoints[-1], local_stages["ctx2"].checkpoints[-1]
    spec = spec_for(cfg, "stage2", init_model=str(ckpt1))
    plan = plan_for(cfg, spec)
    opt = build_optimizer(plan.params, plan.optim, cfg.data.batch_size)
    sched = build_scheduler(opt, plan.optim, plan.epochs, load_state(ckpt2)["global_step"] // 2)
    before = sched.last_epoch
    state = restore(ckpt2, plan.model, opt, sched)
    saved = torch.load(ckpt2 / "optim.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == sched.last_epoch != before
    assert sched.state_dict() == saved["scheduler"]
    assert opt.param_groups[0]["lr"] == pytest.approx(saved["optimizer"]["param_groups"][0]["lr"])
    got = opt.state_dict()["state"]
    assert len(got) == len(saved["optimizer"]["state"]) == len(plan.params)
    for i, s in saved["optimizer"]["state"].items():
        assert torch.equal(got[i]["momentum_buffer"], s["momentum_buffer"])


def test_resume_runs_only_the_remaining_epochs(local_stages: dict[str, Any]) -> None:
    """A worker restarted on epoch 0's checkpoint trains epoch 1 only and ends on exactly the
    uninterrupted run's schedule (the scheduler state travelled in the checkpoint)."""
    cfg: Config = local_stages["cfg"]
    ckpt1 = local_stages["ctx1"].checkpoints[-1]
    ctx2 = local_stages["ctx2"]
    ctx = LocalContext(local_stages["work"] / "resumed", resume_from=ctx2.checkpoints[0])
    metrics = run_stage(spec_for(cfg, "stage2", init_model=str(ckpt1)), ctx)
    assert [r["epoch"] for r in ctx.reports] == [1.0]
    assert metrics["lr"] == ctx2.reports[-1]["lr"]
    assert (
        load_state(ctx.checkpoints[-1])["global_step"]
        == load_state(ctx2.checkpoints[-1])["global_step"]
    )
    # a checkpoint of another stage is refused, not silently loaded
    wrong = LocalContext(local_stages["work"] / "wrong", resume_from=ckpt1)
    with pytest.raises(ValueError, match="stage 'stage1'"):
        run_stage(spec_for(cfg, "stage2", init_model=str(ckpt1)), wrong)


def test_lae_mae_term_uses_stage1_validation_mae(local_stages: dict[str, Any]) -> None:
    cfg = tiny_cfg(
        Path(local_stages["cfg"].data.shards),
        local_stages["work"] / "runs",
        "lae",
        "train.stage2.mae_term=true",
    )
    ckpt1 = local_stages["ctx1"].checkpoints[-1]
    with pytest.raises(ValueError, match="stage 1's validation MAE"):
        plan_for(cfg, spec_for(cfg, "stage2", init_model=str(ckpt1)))
    with pytest.raises(ValueError, match="stage 1's validation MAE"):
        plan_for(cfg, spec_for(cfg, "stage2", init_model=str(ckpt1), mae_ref=float("nan")))
    mae1 = local_stages["m1"]["val_mae"]
    # the stage-1 checkpoint records the number the driver hands on
    assert json.loads((ckpt1 / "model.json").read_text())["meta"]["val_mae"] == mae1
    m, ctx = run_local(
        spec_for(cfg, "stage2", init_model=str(ckpt1), mae_ref=mae1), local_stages["work"] / "lae"
    )
    assert "train_er_mae" in m and m["train_er_mae"] > 0  # the (L_er - mae)^2 term is on
    assert "train_er_mae" not in local_stages["m2"]  # and off without mae_term
    assert load_state(ctx.checkpoints[-1])["mae_ref"] == mae1


def test_identity_pretraining_feeds_stage1(shards: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(shards, tmp_path / "runs", "pre")
    m, ctx = run_local(spec_for(cfg, "pretrain"), tmp_path / "pre")
    assert {"train_loss", "train_acc", "lr", "epoch"} <= set(m)
    assert not any(k.startswith("val_") for k in m)  # identities only: no age validation
    ckpt = ctx.checkpoints[-1]
    info = json.loads((ckpt / "model.json").read_text())
    assert info["format"] == "ageray-pretrain/1"
    assert info["num_identities"] == read_manifest(str(shards))["num_identities"]
    # the trunk's weights (Backbone's own keys: the timm model under "model.")
    backbone = {
        k.removeprefix("model."): v
        for k, v in load_file(str(ckpt / "backbone.safetensors")).items()
    }

    for source in (ckpt / "backbone.safetensors", ckpt):  # the file, or the checkpoint folder
        cfg1 = tiny_cfg(shards, tmp_path / "runs", "pre", f"train.init_from={source}")
        plan = plan_for(cfg1, spec_for(cfg1, "stage1"))  # train.init_from, no explicit spec
        own = plan.model.backbone_state_dict()
        assert set(own) <= set(backbone)
        for k, v in own.items():
            assert torch.equal(v, backbone[k]), k
        assert plan.meta["init_backbone"] == str(source)
    fresh = plan_for(cfg, spec_for(cfg, "stage1")).model.backbone_state_dict()
    assert not all(torch.equal(v, backbone[k]) for k, v in fresh.items())


# --------------------------------------------------------------------------- MLflow helpers


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def pipeline_runs(uri: str, experiment: str, name: str) -> dict[str, list[Any]]:
    """Runs of pipeline ``name`` grouped by their ``ageray.stage`` tag."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} missing"
    runs = client.search_runs([exp.experiment_id], f"tags.`ageray.pipeline` = '{name}'")
    out: dict[str, list[Any]] = {}
    for r in runs:
        out.setdefault(r.data.tags["ageray.stage"], []).append(r)
    return out


def steps_of(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlflow_client(uri).get_metric_history(run_id, key))


def run_job(argv: list[str]) -> int:
    from jobs.train import main

    return main(argv)


def job_args(cfg_overrides: list[str], *flags: str) -> list[str]:
    argv = ["--config", str(ROOT / "recipes" / "demo.yaml")]
    for o in cfg_overrides:
        argv += ["--set", o]
    return argv + list(flags)


# --------------------------------------------------------------------------- (b) Ray + MLflow


RAY2 = ["ray.num_workers=2", "ray.cpus_per_worker=1", "ray.num_cpus=2"]


def test_two_workers_both_stages_into_mlflow_and_registry(
    shards: Path, tmp_path: Path, ray_local, mlflow_srv, s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import pandas as pd

    from ageray.tracking import manifest_digest

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_srv.uri)
    monkeypatch.chdir(tmp_path)  # whatever a job writes relative to its cwd lands here
    name, exp, model_name = "ray2", "it-train", "ageray-it"
    over = [
        *tiny_overrides(shards, tmp_path / "runs", name),
        *RAY2,
        "train.stage1.epochs=2",
        "train.stage2.mae_term=true",
        f"tracking.experiment={exp}",
        f"tracking.registered_model={model_name}",
    ]
    assert run_job(job_args(over)) == 0

    uri = mlflow_srv.uri
    client = mlflow_client(uri)
    runs = pipeline_runs(uri, exp, name)
    assert sorted(runs) == ["evaluate", "pipeline", "routing", "stage1", "stage2"]
    assert all(len(v) == 1 for v in runs.values()), {k: len(v) for k, v in runs.items()}
    parent = runs["pipeline"][0]
    s1, s2 = runs["stage1"][0], runs["stage2"][0]
    routing = runs["routing"][0]  # the routing rules fitted on the validation split
    assert {"routing_learned_objective", "routing_threshold_tau"} <= set(routing.data.metrics)
    assert routing.data.params["routing.fit_split"] == "val"
    for child in (s1, s2, routing, runs["evaluate"][0]):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    assert parent.info.status == "FINISHED"

    # params: the flattened config, the commit, versions and the shards' digest
    params = parent.data.params
    assert params["model.backbone"] == "resnet18" and params["ray.num_workers"] == "2"
    assert params["train.stage1.epochs"] == "2" and params["data.shards"] == str(shards)
    assert params["git.commit"] not in ("", "unknown")
    assert params["version.torch"] == metadata.version("torch")
    assert params["version.ray"] != "absent" and params["version.mlflow"] != "absent"
    digest = manifest_digest(read_manifest(str(shards)))
    assert params["data.shards.manifest_digest"] == digest

    # per-epoch metrics of both stages, every epoch exactly once (step = epoch)
    assert steps_of(uri, s1.info.run_id, "val_mae") == [0, 1]
    assert steps_of(uri, s1.info.run_id, "train_loss") == [0, 1]
    assert steps_of(uri, s2.info.run_id, "val_routed_cmae") == [0]
    assert steps_of(uri, s2.info.run_id, "val_mae") == [0]
    # stage 2's LAE term used stage 1's best validation MAE (the checkpoint handed on)
    best1 = min(m.value for m in client.get_metric_history(s1.info.run_id, "val_mae"))
    assert float(s2.data.params["stage2.mae_ref"]) == pytest.approx(best1)
    # ... and that number is the MAE of the model handed on: both ranks validate the weights
    # rank 0 saves (BatchNorm statistics included), evaluated here again in one process
    from ageray import metrics as M
    from ageray.evaluation import evaluate_model

    again = evaluate_model(tmp_path / "runs" / name / "stage1" / "model", str(shards), "val")
    assert M.mae(again["age"], again["vanilla_age"]) == pytest.approx(best1, rel=1e-6)
    assert s2.data.metrics["val_mae"] == pytest.approx(best1, rel=1e-6)  # vanilla head kept
    assert "train_er_mae" in s2.data.metrics
    # the checkpoint of two ranks: global batch 64, equal steps on both ranks
    steps = train_count(shards) // (2 * BATCH)
    state = load_state(tmp_path / "runs" / name / "stage2" / "model")
    assert state["global_step"] == steps and state["mlflow_run_id"] == s2.info.run_id

    # evaluation artifacts are objects on the (SeaweedFS) S3 artifact store
    keys = [
        o["Key"]
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in page.get("Contents", [])
    ]
    for run in (parent, runs["evaluate"][0]):
        mine = [k for k in keys if run.info.run_id in k]
        for f in ("report.json", "report.md", "per_age_mae.png", "ccs.png", "routing_usage.png"):
            assert any(k.endswith(f"evaluation/{f}") for k in mine), (f, mine)
    assert any(k.endswith("model.safetensors") for k in keys)
    report = json.loads(
        mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/evaluation/report.json")
    )
    assert set(report["rows"]) == {
        "vanilla",
        "balanced",
        "routed",
        "routed_bigger",
        "routed_threshold",
        "routed_learned",
        "oracle",
    }
    assert report["served_rule"] == "smaller" and report["bounds"] == ["oracle"]
    assert report["num_samples"] == read_manifest(str(shards))["splits"]["test"]["count"]

    # registered with the alias; loads as code (no pickle) and predicts on encoded images
    mv = client.get_model_version_by_alias(model_name, "candidate")
    assert mv.tags["ageray.pipeline"] == name and "metric.test_routed_mae" in mv.tags
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@candidate"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert mlmodel["loader_module"] == "mlflow.pyfunc.loaders.code_model", mlmodel
    assert Path(mlmodel["model_code_path"]).name == "pyfunc_model.py"
    assert (local / "pyfunc_model.py").is_file()  # the wrapper travels as source code
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))
    loaded = mlflow.pyfunc.load_model(f"models:/{model_name}@candidate")
    images = encoded_test_images(shards, 3)
    out = loaded.predict(pd.DataFrame({"image": images}))
    assert {"key", "age", "head", "error"} <= set(out.columns) and len(out) == 3
    assert out["error"].isna().all()
    assert out["age"].between(0, 100).all()
    assert set(out["head"]) <= {"vanilla", "balanced"}
    assert {"age_vanilla", "age_balanced", "kl_vanilla", "kl_balanced"} <= set(out.columns)
    b64 = loaded.predict(pd.DataFrame({"image": [base64.b64encode(i).decode() for i in images]}))
    assert b64["age"].tolist() == pytest.approx(out["age"].tolist())


def test_unreachable_tracking_server_fails_before_training(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import free_port

    from ageray.tracking import TrackingUnavailable

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="not reachable") as err:
        run_job(job_args(tiny_overrides(shards, tmp_path / "runs", "dead")))
    assert time.monotonic() - t0 < 60
    assert dead in str(err.value)
    assert not (tmp_path / "runs" / "dead").exists()  # nothing trained, nothing written


def encoded_test_images(shards: Path, n: int) -> list[bytes]:
    """The first ``n`` encoded images of the test split, as a client would send them."""
    manifest = read_manifest(str(shards))
    out: list[bytes] = []
    with tarfile.open(shards / manifest["splits"]["test"]["shards"][0]["name"]) as tar:
        for m in tar.getmembers():
            if m.name.endswith((".jpg", ".png")) and len(out) < n:
                out.append(tar.extractfile(m).read())  # type: ignore[union-attr]
    assert len(out) == n
    return out


# --------------------------------------------------------------------------- (c) faults


def test_worker_killed_mid_epoch_resumes_with_continuous_epochs(
    shards: Path,
    tmp_path: Path,
    ray_local,
    mlflow_srv,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 0 dies at epoch 1, step 1 (after epoch 0's checkpoint). Ray Train restarts the
    group from that checkpoint (FailureConfig.max_failures=1): epoch 1 is re-run from its
    start, epoch 0 is not, and the one MLflow stage run holds epochs 0, 1, 2 exactly once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_srv.uri)
    name, exp = "fault", "it-fault"
    storage = tmp_path / "runs"
    over = [
        *tiny_overrides(shards, storage, name),
        *RAY2,
        "train.stage1.epochs=3",
        "train.stage2.enabled=false",
        "train.max_failures=1",
        "run.fail_at_epoch=1",
        "run.fail_at_step=1",
        "run.fail_rank=0",
        f"tracking.experiment={exp}",
    ]
    assert run_job(job_args(over, "--no-eval", "--no-register")) == 0
    marker = fault_marker(str(storage), name, "stage1")
    assert marker.is_file() and "epoch 1 step 1" in marker.read_text()  # the fault fired

    runs = pipeline_runs(mlflow_srv.uri, exp, name)
    assert len(runs["stage1"]) == 1 and len(runs["pipeline"]) == 1
    rid = runs["stage1"][0].info.run_id
    # Resumed once, from epoch 0's checkpoint, not from scratch. Read from MLflow: workers'
    # console lines reach the driver through Ray's log monitor, asynchronously, and a
    # restarted group's lines may arrive after fit() returns.
    resumed = mlflow_client(mlflow_srv.uri).get_metric_history(rid, "resumed_at_epoch")
    assert [(m.step, m.value) for m in resumed] == [(1, 1.0)]
    assert steps_of(mlflow_srv.uri, rid, "epoch") == [0, 1, 2]
    assert steps_of(mlflow_srv.uri, rid, "val_mae") == [0, 1, 2]
    assert runs["stage1"][0].info.status == "FINISHED"
    state = load_state(storage / name / "stage1" / "model")
    assert state["global_step"] == (state["epoch"] + 1) * (train_count(shards) // (2 * BATCH))


@contextlib.contextmanager
def _job_process(argv: list[str], env: dict[str, str], log: Path):
    """``python -m jobs.train`` in its own session (its own local Ray), killed as a group."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *argv],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _session_pids(sid: int) -> list[int]:
    """Processes still alive in session ``sid`` (Ray's GCS, raylet, workers of a killed job)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    pids.append(int(d.name))
    return pids


def _registered_epochs(storage: Path, name: str, stage: str) -> int:
    """Checkpoints Ray Train's controller has registered (its snapshot in storage)."""
    snap = storage / name / stage / "checkpoint_manager_snapshot.json"
    if not snap.is_file():
        return 0
    with contextlib.suppress(ValueError):
        return len(json.loads(snap.read_text()).get("checkpoint_results") or [])
    return 0


def test_resubmitted_run_continues_the_same_runs(
    shards: Path,
    tmp_path: Path,
    ray_local,
    mlflow_srv,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The job's driver is killed (SIGKILL, with its Ray) after stage 1 registered a
    checkpoint; the same command again resumes stage 1 from it and logs into the same MLflow
    runs; a third submission finds everything finished and trains nothing."""
    name, exp = "resub", "it-resub"
    storage = tmp_path / "runs"
    over = [
        *tiny_overrides(shards, storage, name),
        "ray.num_workers=1",
        "ray.num_cpus=2",
        "train.stage1.epochs=3",
        "train.stage2.enabled=false",
        f"tracking.experiment={exp}",
    ]
    argv = job_args(over, "--no-eval", "--no-register")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_srv.uri, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with _job_process(argv, env, log) as proc:
        deadline = time.monotonic() + 400
        while _registered_epochs(storage, name, "stage1") < 1:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its whole local Ray
        proc.wait(timeout=30)
        for _ in range(60):  # the group's processes go away with it
            if not _session_pids(proc.pid):
                break
            time.sleep(0.5)
        assert not _session_pids(proc.pid)
    first = pipeline_runs(mlflow_srv.uri, exp, name)
    assert len(first["stage1"]) == 1 and first["stage1"][0].info.status == "RUNNING"
    done = _registered_epochs(storage, name, "stage1")
    assert 1 <= done < 3

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_srv.uri)
    capfd.readouterr()
    assert run_job(argv) == 0
    text = "".join(capfd.readouterr())
    runs = pipeline_runs(mlflow_srv.uri, exp, name)
    assert len(runs["pipeline"]) == 1 and len(runs["stage1"]) == 1
    assert runs["pipeline"][0].info.run_id == first["pipeline"][0].info.run_id
    rid = runs["stage1"][0].info.run_id
    resumed = mlflow_client(mlflow_srv.uri).get_metric_history(rid, "resumed_at_epoch")
    assert [m.step for m in resumed] == [done], text[-3000:]
    assert rid == first["stage1"][0].info.run_id
    assert steps_of(mlflow_srv.uri, rid, "epoch") == [0, 1, 2]
    assert runs["stage1"][0].info.status == "FINISHED"
    best = steps_of(mlflow_srv.uri, rid, "best_val_mae")
    assert best == [0]

    # once more: the finished stage is reused, nothing is trained or logged twice
    assert run_job(argv) == 0
    text = "".join(capfd.readouterr())
    assert "already finished" in text and "resumed at epoch" not in text
    again = pipeline_runs(mlflow_srv.uri, exp, name)
    assert Counter({k: len(v) for k, v in again.items()}) == Counter(pipeline=1, stage1=1)
    assert steps_of(mlflow_srv.uri, rid, "epoch") == [0, 1, 2]
    assert steps_of(mlflow_srv.uri, rid, "best_val_mae") == [0]
