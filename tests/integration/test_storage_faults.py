"""Storage-side faults with real servers: the S3 server (SeaweedFS) killed mid shard-write,
and the MLflow tracking server restarted mid training.

Each test runs its own server (never the session's: stopping that would break the tests
after it) and restarts it on the same data and port, as an operator would. Each prints one
``[fault]`` line with its figures (time to fail, time to recover, what was lost) for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import BIN, SeaweedProcess, free_port, wait_http

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHARD_KEY = re.compile(r"^shards/(train|val|test)/[A-Za-z0-9_.-]+\.tar$")


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[SeaweedProcess]:
    server = SeaweedProcess(tmp_path / "seaweed")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


def _client(server: SeaweedProcess):
    import boto3

    env = server.env
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _make_shards(server: SeaweedProcess, output: str, n: int) -> subprocess.Popen:
    env = {
        **os.environ,
        **server.env,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}",
        "AWS_MAX_ATTEMPTS": "3",  # botocore's retries, so the outage is noticed in seconds
    }
    cmd = [sys.executable, "-m", "jobs.make_shards", "--source", "synthetic"]
    cmd += ["--num-samples", str(n), "--image-size", "32", "--max-count", "20"]
    cmd += ["--workers", "2", "--quiet", "--output", output]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_s3_killed_mid_shard_write_fails_clearly_leaves_no_partial_and_resumes(
    own_s3: SeaweedProcess,
) -> None:
    """``jobs.make_shards`` to s3:// while the S3 server is SIGKILLed after a few shards are
    up: the job fails with an error naming the endpoint; afterwards (server back on the same
    data and port) the bucket holds no manifest and only complete shards; the same command
    again writes every sample exactly once."""
    from ageray.data.manifest import read_manifest

    client = _client(own_s3)
    client.create_bucket(Bucket="faults")
    n, output = 2000, "s3://faults/shards"
    job = _make_shards(own_s3, output, n)
    deadline = time.monotonic() + 120
    while len([k for k in _keys(client, "faults") if k.endswith(".tar")]) < 3:
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "no shard appeared within 120 s"
        time.sleep(0.05)
    own_s3.stop(kill=True)  # the S3 server crashes mid-write
    t_kill = time.monotonic()
    out, err = job.communicate(timeout=120)
    time_to_fail = time.monotonic() - t_kill
    assert job.returncode != 0, out
    assert own_s3.endpoint in err and "does not answer" in err, err[-3000:]
    said = err.strip().splitlines()[-1]
    assert own_s3.endpoint in said, err[-3000:]  # the last line says it, not only a traceback

    t_back = time.monotonic()
    own_s3.start()  # same data folder, same ports
    restart_s = time.monotonic() - t_back
    keys = _keys(client, "faults")
    assert "shards/manifest.json" not in keys  # readers get "run make_shards first"
    shards = [k for k in keys if k.endswith(".tar")]
    assert shards and all(SHARD_KEY.match(k) for k in keys), keys  # no temporary names
    for key in shards:  # every visible shard is whole: a readable tar to its last member
        body = client.get_object(Bucket="faults", Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            assert tar.getmembers()
    partial_uploads = client.list_multipart_uploads(Bucket="faults").get("Uploads", [])

    t_rerun = time.monotonic()
    again = _make_shards(own_s3, output, n)
    out, err = again.communicate(timeout=300)
    rerun_s = time.monotonic() - t_rerun
    assert again.returncode == 0, err[-3000:]
    with _env(own_s3.env):
        manifest = read_manifest(output)
    listed = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    keys = _keys(client, "faults")
    assert set(keys) == {f"shards/{name}" for name in listed} | {"shards/manifest.json"}
    total = sum(sp["count"] for sp in manifest["splits"].values())
    print(
        f"\n[fault] s3 killed mid make_shards: failed after {time_to_fail:.1f}s naming the "
        f"endpoint; {len(shards)} whole shards and no manifest visible, "
        f"{len(partial_uploads)} open multipart uploads; server back in {restart_s:.1f}s; "
        f"re-run {rerun_s:.1f}s; samples {total}/{n}, lost {n - total}\n[fault] it said: {said}"
    )
    assert total == n


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------ MLflow


class RestartableMlflow:
    """``mlflow server`` on a fixed port with a sqlite store, stopped and started again on the
    same port and database (the ``mlflow_server`` helper picks a new port each time)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        log = open(self.workdir / "mlflow.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.workdir / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
            # no job runner (huey consumers): a tracking store starts faster without them
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        wait_http(self.uri + "/health", timeout=300, proc=self.proc)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def own_mlflow(tmp_path: Path) -> Iterator[RestartableMlflow]:
    server = RestartableMlflow(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _new_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(f"faults-{time.time_ns()}")
    return client.create_run(exp).info.run_id


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_logged_while_mlflow_is_down_are_held_and_sent(
    own_mlflow: RestartableMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond MLflow's own HTTP retries (cut to 1 here, so the test takes seconds): epochs
    logged while the server is down are held and go out, in order, with the next call."""
    from ageray.tracking import RunLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    run_id = _new_run(own_mlflow.uri)
    logger = RunLogger(own_mlflow.uri, run_id)
    assert logger.log_epoch({"val_mae": 9.0}, 0)
    own_mlflow.stop()
    t0 = time.monotonic()
    assert logger.log_epoch({"val_mae": 8.0}, 1)  # held, not lost, and training goes on
    assert logger.log_epoch({"val_mae": 7.0}, 2)
    assert time.monotonic() - t0 < 30 and logger.held == 4  # 2 epochs x (val_mae, epoch)
    restart_s = own_mlflow.start()
    assert logger.log_epoch({"val_mae": 6.0}, 3)
    assert logger.held == 0
    assert _steps(own_mlflow.uri, run_id, "epoch") == [0, 1, 2, 3]
    assert _steps(own_mlflow.uri, run_id, "val_mae") == [0, 1, 2, 3]
    assert not logger.log_epoch({"val_mae": 5.0}, 2)  # an epoch is still logged once only
    print(f"\n[fault] mlflow down for 2 epochs: back in {restart_s:.1f}s, 0 metrics lost")


def test_mlflow_restart_mid_training_loses_no_epoch(
    own_mlflow: RestartableMlflow, tmp_path: Path
) -> None:
    """A real training stage (in this process, 4 epochs) logs to a server that is killed
    once epoch 0 is in and started again on the same port and database: training goes on
    and the run holds every epoch exactly once (MLflow's default retries, then ours)."""
    from ageray.config import load_config
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic
    from ageray.training.loop import run_local
    from ageray.training.plans import spec_for

    shards = tmp_path / "shards"
    write_shards(
        iter_synthetic(num_samples=160, image_size=64, seed=5),
        shards,
        splits="train=0.8,val=0.1,test=0.1",
        workers=2,
        progress=False,
        source="synthetic",
    )
    run_id = _new_run(own_mlflow.uri)
    over = [  # the demo recipe shrunk to seconds an epoch (as test_training's tiny_cfg)
        f"data.shards={shards}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=mlflow-fault",
        "data.num_workers=0",
        "data.batch_size=32",
        "data.eval_batch_size=64",
        "data.shuffle_buffer=64",
        "train.stage1.epochs=4",
        "train.log_every=0",
    ]
    cfg = load_config(ROOT / "recipes" / "demo.yaml", over)
    spec = spec_for(cfg, "stage1", tracking_uri=own_mlflow.uri, mlflow_run_id=run_id)
    figures: dict[str, float] = {}

    def restart_after_epoch0() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if _steps(own_mlflow.uri, run_id, "epoch"):
                    break
            time.sleep(0.2)
        own_mlflow.stop()
        figures["down_at"] = time.monotonic()
        figures["restart_s"] = own_mlflow.start()

    chaos = threading.Thread(target=restart_after_epoch0, daemon=True)
    chaos.start()
    t0 = time.monotonic()
    metrics, _ = run_local(spec, tmp_path / "work")
    train_s = time.monotonic() - t0
    chaos.join(timeout=180)
    assert "restart_s" in figures, "the server was never restarted"
    assert _steps(own_mlflow.uri, run_id, "epoch") == [0, 1, 2, 3]
    assert _steps(own_mlflow.uri, run_id, "val_mae") == [0, 1, 2, 3]
    assert metrics["epoch"] == 3
    print(
        f"\n[fault] mlflow restarted mid training: back in {figures['restart_s']:.1f}s, "
        f"4/4 epochs in the run (0 lost), stage took {train_s:.1f}s"
    )
