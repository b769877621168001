"""Every job through ``ray job submit --working-dir .`` to a three-node Ray cluster on loopback
(``cluster_fixture``), with shards, checkpoints and Parquet on an S3 server and MLflow as a
real ``mlflow server`` whose artifacts live on the same S3.

What a cluster promises, asserted: the two Ray Train workers of a run sit on different
nodes; within an epoch the ranks together read each training sample exactly once (their
per-epoch counts and key checksums, ``ageray.training.restarts``) and evaluation counts each
test sample once; a later step needs nothing but S3 and MLflow (every node's HOME, TMPDIR
and the jobs' ``runs/`` folders are wiped between steps); every socket of the cluster and of
its S3 and MLflow servers stays on loopback.

The chain is the operations path a user runs: make_shards (to S3) -> identity pretraining ->
two-stage training from that backbone (routing, evaluation, registration) -> the evaluate job
-> batch prediction (an actor per node) -> promote -> export -> a small Tune search -> Serve
(``python -m serve.run`` as a job: two replicas, each on a node of its own, answering from
the registry; ``ray job stop`` drains it).

Tiny data (316 synthetic 32 px faces: 240 train, 39 val, 37 test), one epoch per stage.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from cluster_fixture import (  # noqa: F401
    ClusterEnv,
    ray_cluster,
    run_job,
    submit,
    wait_job,
    wipe_node_disks,
)
from services import BIN, free_port

from ageray import localcluster as lc

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(1500)]

SHARDS = "s3://ageray/shards"
STORAGE = "s3://ageray/runs"
NAME, MODEL = "cluster-e2e", "ageray-cluster"
TRAIN_SETS = {
    "run.name": NAME,
    "run.storage_path": STORAGE,
    "data.shards": SHARDS,
    "data.image_size": 32,
    "data.num_workers": 0,
    "data.batch_size": 24,  # 240 train samples = 2 ranks x 24 x 5 steps: one pass each
    "data.eval_batch_size": 64,
    "train.stage1.epochs": 1,
    "train.stage2.epochs": 1,
    "train.log_every": 0,
    "pretrain.epochs": 1,
    "ray.num_workers": 2,
    "ray.cpus_per_worker": 1,
    "tracking.experiment": "cluster-e2e",
    "tracking.registered_model": MODEL,
}


def sets(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def assert_on_loopback(ce: ClusterEnv) -> int:
    """Every socket of every cluster, S3 and MLflow process is on 127.0.0.0/8 (Ray's own
    gRPC servers and Prometheus exporters listen on the wildcard: see localcluster)."""
    pids = ce.service_pids()
    socks = lc.parse_ss(subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout)
    mine = [s for s in socks if s.pid in pids]
    assert mine, "ss shows no socket of the cluster's processes"
    bad = lc.off_loopback(mine, pids, wildcard_ok=lc.RAY_WILDCARD_LISTENERS)
    assert not bad, "\n".join(map(str, bad))
    return len(mine)


def shard_keys(ce: ClusterEnv, split: str) -> list[str]:
    s3 = ce.s3.client()
    manifest = json.loads(s3.get_object(Bucket="ageray", Key="shards/manifest.json")["Body"].read())
    keys: set[str] = set()
    for shard in manifest["splits"][split]["shards"]:
        name = shard["name"] if isinstance(shard, dict) else shard
        body = s3.get_object(Bucket="ageray", Key=f"shards/{name}")["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            keys |= {m.name.split("/")[-1].split(".")[0] for m in tar.getmembers() if m.isfile()}
    return sorted(keys)


def mlflow_runs(ce: ClusterEnv) -> dict:
    import mlflow

    client = mlflow.MlflowClient(ce.mlflow.uri)
    exp = client.get_experiment_by_name("cluster-e2e")
    runs = client.search_runs([exp.experiment_id], f"tags.`ageray.pipeline` = '{NAME}'")
    return {r.data.tags["ageray.stage"]: r for r in runs}


def test_three_nodes_on_loopback(ray_cluster: ClusterEnv) -> None:  # noqa: F811
    alive = lc.alive_nodes(ray_cluster.cluster)
    assert alive == {"127.0.0.10", "127.0.0.2", "127.0.0.3"}
    assert assert_on_loopback(ray_cluster) > 20


def test_jobs_on_the_cluster(ray_cluster: ClusterEnv, tmp_path: Path) -> None:  # noqa: F811
    ce = ray_cluster
    run_job(
        ce, "python", "-m", "jobs.make_shards", "--source", "synthetic", "--num-samples", "316",
        "--image-size", "32", "--split-by", "random", "--output", SHARDS, "--quiet",
        name="shards",
    )  # fmt: skip
    keys = shard_keys(ce, "train")
    assert len(keys) == 240

    # identity pretraining: the backbone lands on S3 and the next job reads it from there
    recipe = ["--config", "recipes/demo.yaml", *sets(TRAIN_SETS)]
    logs = run_job(ce, "python", "-m", "jobs.pretrain", *recipe, name="pretrain")
    backbone = next(ln.split("backbone:", 1)[1].strip() for ln in logs.splitlines()
                    if "backbone:" in ln)  # fmt: skip
    assert backbone.startswith(f"{STORAGE}/{NAME}/pretrain/"), backbone
    wipe_node_disks(ce)

    logs = run_job(
        ce, "python", "-m", "jobs.train", *recipe, "--set", f"train.init_from={backbone}",
        name="train", timeout=900,
    )  # fmt: skip
    assert f"[ageray] run '{NAME}' finished" in logs
    runs = mlflow_runs(ce)
    assert {"pipeline", "pretrain", "stage1", "stage2", "routing", "evaluate"} <= set(runs)
    import mlflow

    client = mlflow.MlflowClient(ce.mlflow.uri)
    for stage in ("stage1", "stage2"):
        nodes = json.loads(runs[stage].data.tags["ageray.worker_nodes"])
        assert len(set(nodes.values())) == 2, nodes  # two ranks, two nodes
        assert set(nodes.values()) <= {"127.0.0.10", "127.0.0.2", "127.0.0.3"}
    # stage 1 (instance sampling): one pass, each training sample once across both ranks
    s1 = runs["stage1"].info.run_id
    (reads,) = client.get_metric_history(s1, "read_samples")
    (keysum,) = client.get_metric_history(s1, "read_keysum")
    assert reads.value == 240
    assert keysum.value == sum(zlib.crc32(k.encode()) for k in keys)
    got = client.download_artifacts(runs["evaluate"].info.run_id, "evaluation", str(tmp_path))
    report = json.loads((Path(got) / "report.json").read_text())
    assert report["num_samples"] == len(shard_keys(ce, "test")) == 37
    assert not any(report["skipped"].values())
    history = client.get_metric_history(runs["stage1"].info.run_id, "val_mae")
    assert [m.step for m in history] == [0]
    params = runs["pipeline"].data.params
    assert params["data.shards"] == SHARDS and "git.commit" in params
    assert not any("secret" in k.lower() or v == ce.s3.env["AWS_SECRET_ACCESS_KEY"]
                   for k, v in params.items())  # fmt: skip
    art = [o["Key"] for o in ce.s3.client().list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(k.endswith("report.json") for k in art)
    assert any(k.endswith("model.safetensors") for k in art)
    ckpts = [o["Key"] for o in ce.s3.client().list_objects_v2(Bucket="ageray",
             Prefix=f"runs/{NAME}/")["Contents"]]  # fmt: skip
    for stage in ("stage1", "stage2"):
        assert any(k.startswith(f"runs/{NAME}/{stage}/checkpoint_") for k in ckpts), stage
    left = wipe_node_disks(ce)
    print("left on node disks after train:", left)
    # the backbone and the stage-1 model fetched from S3 are removed once loaded
    assert not [p for p in left if "ageray-fetch" in p], left

    # the registered model evaluated again, as a job of its own
    logs = run_job(
        ce, "python", "-m", "jobs.evaluate", *recipe, "--model", f"models:/{MODEL}@candidate",
        "--shards", SHARDS, "--output", "eval-out", name="evaluate",
    )  # fmt: skip
    assert "Smaller Υ (AR)" in logs and "| Balanced |" in logs

    # predict: an actor per node, every input once
    out = "s3://ageray/predict/test.parquet"
    run_job(
        ce, "python", "-m", "jobs.predict", "--model", f"models:/{MODEL}@candidate",
        "--input", SHARDS, "--split", "test", "--output", out, "--actors", "2",
        "--batch-size", "16", "--no-progress", name="predict",
    )  # fmt: skip
    import pyarrow.parquet as pq

    body = ce.s3.client().get_object(Bucket="ageray", Key="predict/test.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body)).to_pydict()
    key_col = next(c for c in ("key", "source", "path") if c in table)
    assert len(table[key_col]) == 37 and len(set(table[key_col])) == 37
    wipe_node_disks(ce)

    # promote the candidate (nothing is champion yet), export it
    run_job(
        ce, "python", "-m", "jobs.promote", "--candidate", f"models:/{MODEL}@candidate",
        "--shards", SHARDS, *sets({k: TRAIN_SETS[k] for k in ("data.image_size",
        "tracking.registered_model", "tracking.experiment")}), name="promote",
    )  # fmt: skip
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    run_job(
        ce, "python", "-m", "jobs.export", "--model", f"models:/{MODEL}@champion",
        "--output", "runs/export", name="export",
    )  # fmt: skip
    wipe_node_disks(ce)

    # a small Tune search (GLAE Table IV's space: 3 trials x 1 epoch, one at a time)
    logs = run_job(
        ce, "python", "-m", "tuning.search", *recipe, "--space", "tuning/spaces/proj_depth.yaml",
        "--name", "cluster-search", "--epochs", "1", "--scheduler", "fifo",
        "--max-concurrent", "1", name="tune", timeout=900,
    )  # fmt: skip
    assert "best" in logs.lower()
    wipe_node_disks(ce)

    serve_two_replicas(ce, image=first_test_jpeg(ce))
    assert assert_on_loopback(ce) > 20


def first_test_jpeg(ce: ClusterEnv) -> bytes:
    s3 = ce.s3.client()
    manifest = json.loads(s3.get_object(Bucket="ageray", Key="shards/manifest.json")["Body"].read())
    shard = manifest["splits"]["test"]["shards"][0]
    name = shard["name"] if isinstance(shard, dict) else shard
    body = s3.get_object(Bucket="ageray", Key=f"shards/{name}")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


def _ray_list(ce: ClusterEnv, what: str) -> list[dict]:
    out = subprocess.run(
        [str(BIN / "ray"), "list", what, "--address", ce.address, "--format", "json",
         "--detail", "--limit", "1000"],
        env=ce.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def serve_two_replicas(ce: ClusterEnv, image: bytes) -> None:
    """The champion served by ``python -m serve.run`` submitted as a job: two replicas on two
    nodes (``max_replicas_per_node=1``), one proxy on the head; answers, then a drained stop."""
    port = free_port()
    base = f"http://127.0.0.10:{port}"
    job = submit(
        ce, "python", "-m", "serve.run", "serve.app:app", f"model_uri=models:/{MODEL}@champion",
        "num_replicas=2", "max_replicas_per_node=1", "--host", "127.0.0.10", "--port", str(port),
        "--proxy-location", "HeadOnly", name="serve",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(wait_job(ce, job, timeout=1)[1][-4000:])
            time.sleep(2)
        nodes = {n["node_id"]: n["node_ip"] for n in _ray_list(ce, "nodes")}
        replicas = [
            nodes[a["node_id"]] for a in _ray_list(ce, "actors")
            if a["state"] == "ALIVE" and a["class_name"].startswith("ServeReplica:")
        ]  # fmt: skip
        assert len(replicas) == 2 and len(set(replicas)) == 2, replicas
        for _ in range(4):  # each answer is the model's, whichever replica takes it
            req = urllib.request.Request(
                base + "/v1/predict?faces=largest", data=image,
                headers={"Content-Type": "image/jpeg"}, method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.loads(resp.read())
            assert 0.0 <= answer["age"] <= 100.0
            assert set(answer["heads"]) == {"vanilla", "balanced"}
        with urllib.request.urlopen(base + "/v1/model", timeout=30) as resp:
            assert "champion" in json.loads(resp.read())["aliases"]
    finally:
        subprocess.run(
            [str(BIN / "ray"), "job", "stop", job, "--address", ce.address],
            env=ce.env, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [str(BIN / "serve"), "shutdown", "--yes", "--address", ce.address],
            env=ce.env, capture_output=True, timeout=120,
        )  # fmt: skip
