"""The platform in real-services mode, as in production but on loopback:

* an S3 API server (SeaweedFS) holding the shards, the Ray Train checkpoints and MLflow's artifacts,
* ``mlflow server`` with a sqlite backend and that S3 artifact store,
* ``ray start --head``, with every job submitted through ``ray job submit``
  (make_shards -> pretrain -> train -> evaluate -> a small tune search),
* Ray Serve deployed with ``serve deploy`` from ``serve/config.yaml``, loading the model the
  training job registered, answering real HTTP requests.

Nothing here calls ageray in-process: every step goes through the same command line a user
types, so this is the check that the documented operations path works end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from services import BIN, free_port, mlflow_server, ray_head

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "ageray-e2e"
RUN = "e2e"
MODEL = "ageray-e2e"


def tiny(storage: str, shards: str) -> list[str]:
    """Overrides that make the demo recipe take about a minute per stage on 2 cores."""
    sets = {
        "run.name": RUN,
        "run.storage_path": storage,
        "data.shards": shards,
        "data.num_workers": 0,
        "data.batch_size": 32,
        "pretrain.epochs": 1,
        "train.stage1.epochs": 2,
        "train.stage2.epochs": 1,
        "ray.num_workers": 1,
        "tracking.experiment": "ageray-e2e",
        "tracking.registered_model": MODEL,
    }
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """SeaweedFS S3 + mlflow server + ray head, with the environment a cluster node would have."""
    work = tmp_path_factory.mktemp("real-services")
    s3.make_bucket(BUCKET)
    s3.make_bucket("mlflow")
    with mlflow_server(work, "s3://mlflow/artifacts", s3.env) as ml:
        env = {
            **s3.env,
            "MLFLOW_TRACKING_URI": ml.uri,
            # Serve's controller imports serve.app (as the KubeRay image does via PYTHONPATH)
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")]),
            "OMP_NUM_THREADS": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        with ray_head(work, num_cpus=2, env=env) as address:
            yield {"address": address, "env": {**os.environ, **env}, "mlflow": ml, "work": work}


def submit(cluster, *cmd: str, timeout: float = 900) -> str:
    """``ray job submit`` from the repository root; fails the test with the job's log."""
    argv = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster["address"],
        "--working-dir",
        str(ROOT),
        "--runtime-env",
        str(ROOT / "platform/cluster/runtime_env.yaml"),
        "--",
        "python",
        "-m",
        *cmd,
    ]
    proc = subprocess.run(
        argv, cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[:1])} failed:\n{out[-6000:]}"
    return out


def test_operations_path_end_to_end(cluster, s3) -> None:
    shards = f"s3://{BUCKET}/shards/synthetic"
    storage = f"s3://{BUCKET}/runs"
    recipe = ["--config", "recipes/demo.yaml", *tiny(storage, shards)]

    # 1. shards straight to S3
    out = submit(
        cluster,
        "jobs.make_shards",
        "--source",
        "synthetic",
        "--num-samples",
        "480",
        "--image-size",
        "64",
        "--output",
        shards,
        "--quiet",
    )
    assert "manifest" in out
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert "shards/synthetic/manifest.json" in keys
    assert any(k.startswith("shards/synthetic/train/") and k.endswith(".tar") for k in keys)

    # 2. identity pretraining; the backbone lands in S3 and the next job reads it from there
    out = submit(cluster, "jobs.pretrain", *recipe)
    backbone = next(
        line.split("backbone:", 1)[1].strip() for line in out.splitlines() if "backbone:" in line
    )
    assert backbone.startswith(f"s3://{BUCKET}/runs/{RUN}/pretrain/"), backbone

    # 3. two-stage training, evaluation and registration, checkpoints on S3
    out = submit(cluster, "jobs.train", *recipe, "--set", f"train.init_from={backbone}")
    assert f"models:/{MODEL}@candidate" in out
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="runs/")
    keys = [o["Key"] for o in listing["Contents"]]
    for stage in ("stage1", "stage2"):
        assert any(k.startswith(f"runs/{RUN}/{stage}/checkpoint_") for k in keys), stage
        assert f"runs/{RUN}/{stage}/result.json" in keys

    # 4. evaluation of the registered model, as a separate job
    out = submit(
        cluster,
        "jobs.evaluate",
        *recipe,
        "--model",
        f"models:/{MODEL}@candidate",
        "--shards",
        shards,
        "--output",
        "eval-out",
    )
    assert "Smaller Υ (AR)" in out and "| Balanced |" in out

    # MLflow: parent + stage runs, metrics per epoch, artifacts on S3, registry alias
    import mlflow

    client = mlflow.MlflowClient(cluster["mlflow"].uri, registry_uri=cluster["mlflow"].uri)
    exp = client.get_experiment_by_name("ageray-e2e")
    runs = client.search_runs([exp.experiment_id], f"tags.`ageray.pipeline` = '{RUN}'")
    stages = {r.data.tags.get("ageray.stage") for r in runs}
    assert {"pipeline", "pretrain", "stage1", "stage2", "evaluate"} <= stages
    stage1 = next(r for r in runs if r.data.tags.get("ageray.stage") == "stage1")
    history = client.get_metric_history(stage1.info.run_id, "val_mae")
    assert sorted(m.step for m in history) == [0, 1]
    params = next(r for r in runs if r.data.tags.get("ageray.stage") == "pipeline").data.params
    assert params["data.shards"] == shards and "git.commit" in params
    assert not any("secret" in k.lower() or v == "testing" for k, v in params.items())
    version = client.get_model_version_by_alias(MODEL, "candidate")
    art = [o["Key"] for o in s3.client().list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(k.endswith("report.json") for k in art)
    assert any(k.endswith("model.safetensors") for k in art)

    # 5. a small Tune search through ray job submit (Table IV's space: 3 trials x 1 epoch)
    out = submit(
        cluster,
        "tuning.search",
        *recipe,
        "--space",
        "tuning/spaces/proj_depth.yaml",
        "--name",
        "e2e-search",
        "--epochs",
        "1",
        "--scheduler",
        "fifo",
        "--max-concurrent",
        "1",
    )
    assert "best" in out.lower()

    # 6. Serve from the registry with `serve deploy`
    port = free_port()
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"]["model_uri"] = f"models:/{MODEL}@candidate"
    for dep in app.get("deployments", []):
        dep.get("autoscaling_config", {}).update({"min_replicas": 1, "max_replicas": 1})
        dep.setdefault("ray_actor_options", {})["num_cpus"] = 0.5
    deploy = cluster["work"] / "serve.yaml"
    deploy.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [str(BIN / "serve"), "deploy", str(deploy), "--address", cluster["address"]],
        cwd=ROOT,
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
                if resp.status == 200:
                    break
        except Exception:  # not deployed yet
            if time.time() > deadline:
                status = subprocess.run(
                    [str(BIN / "serve"), "status", "--address", cluster["address"]],
                    env=cluster["env"],
                    capture_output=True,
                    text=True,
                )
                pytest.fail(f"Serve never became ready:\n{status.stdout}{status.stderr}")
            time.sleep(2)
    with urllib.request.urlopen(base + "/v1/model", timeout=30) as resp:
        info = json.loads(resp.read())
    assert str(info["version"]) == str(version.version)
    image = _a_test_image(shards)
    req = urllib.request.Request(
        base + "/v1/predict?faces=largest",  # a dataset chip: one flat answer
        data=image,
        headers={"Content-Type": "image/jpeg"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = json.loads(resp.read())
    assert 0.0 <= answer["age"] <= 100.0
    assert answer["head"] in ("vanilla", "balanced")
    assert set(answer["heads"]) == {"vanilla", "balanced"}
    subprocess.run(
        [str(BIN / "serve"), "shutdown", "--yes", "--address", cluster["address"]],
        env=cluster["env"],
        capture_output=True,
        timeout=120,
    )


def _a_test_image(shards: str) -> bytes:
    """The first JPEG of the test split, read back from S3 through ageray's storage."""
    import io
    import tarfile

    sys.path.insert(0, str(ROOT / "platform"))
    from ageray.data import storage
    from ageray.data.manifest import read_manifest

    manifest = read_manifest(shards)
    shard = manifest["splits"]["test"]["shards"][0]["name"]
    data = storage.read_bytes(storage.join(shards, shard))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".jpg"))
        return tf.extractfile(member).read()
