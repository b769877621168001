"""Every job through ``ray job submit --working-dir .`` to a three-node Ray cluster on loopback
(``cluster_fixture``), with shards, checkpoints and Parquet on an S3 server and MLflow as a
real ``mlflow server`` whose artifacts live on the same S3.

What a cluster promises, asserted: the two Ray Train workers of a run sit on different
nodes; within an epoch the ranks together read each training sample exactly once (their
per-epoch counts and key checksums, ``ageray.training.restarts``) and evaluation counts each
test sample once; a later step needs nothing but S3 and MLflow (every node's HOME, TMPDIR
and the jobs' ``runs/`` folders are wiped between steps); every socket of the cluster and of
its S3 and MLflow servers stays on loopback.

Tiny data (316 synthetic 32 px faces: 240 train, 39 val, 37 test), one epoch per stage.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
from cluster_fixture import ClusterEnv, ray_cluster, run_job, wipe_node_disks  # noqa: F401

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

    logs = run_job(
        ce, "python", "-m", "jobs.train", "--config", "recipes/demo.yaml", *sets(TRAIN_SETS),
        name="train", timeout=900,
    )  # fmt: skip
    assert f"[ageray] run '{NAME}' finished" in logs
    runs = mlflow_runs(ce)
    assert {"pipeline", "stage1", "stage2", "routing", "evaluate"} <= set(runs)
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
    left = wipe_node_disks(ce)
    print("left on node disks after train:", left)

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
    assert assert_on_loopback(ce) > 20
