"""A three-node Ray cluster on loopback with an S3 server and an MLflow server, for tests that
submit jobs the way a user does (``ray job submit --working-dir .``).

Head 127.0.0.10, workers 127.0.0.2 and 127.0.0.3 (``ageray.localcluster``), one CPU each,
token auth, each node with its own HOME and TMPDIR. The nodes' environment carries the S3
endpoint and credentials (as a cluster's nodes get them from a Secret), not the checkout:
a job's code comes with its working_dir. Only what this module started is stopped, by
process group.

S3: ``services.seaweed_server`` (SeaweedFS ``weed mini``, a real S3 server) on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from services import BIN, MlflowServer, S3Server, mlflow_server, seaweed_server

from ageray import localcluster as lc

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class ClusterEnv:
    cluster: lc.Cluster
    s3: S3Server
    mlflow: MlflowServer
    env: dict[str, str]  # a user's shell: the cluster's address and token, S3, MLflow
    node_env: dict[str, str]  # what every node starts with (replacement nodes too)
    work: Path
    extra_pids: list[int] = field(default_factory=list)  # the S3 and MLflow servers

    @property
    def address(self) -> str:
        return self.cluster.dashboard_url

    def service_pids(self) -> set[int]:
        """Every process of the cluster and of the S3 and MLflow servers."""
        roots = [n.pid for n in self.cluster.nodes if n.pid] + self.extra_pids
        return lc.process_tree(roots)


def _s3_server(work: Path):
    (work / "s3").mkdir(parents=True, exist_ok=True)
    return seaweed_server(work / "s3")


@contextlib.contextmanager
def local_cluster(work: Path) -> Iterator[ClusterEnv]:
    """S3, MLflow (artifacts on that S3) and the three nodes; stops all of it at the end."""
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    with _s3_server(work) as s3:
        s3.make_bucket("ageray")
        s3.make_bucket("mlflow")
        with mlflow_server(work / "mlflow", "s3://mlflow/artifacts", s3.env) as ml:
            base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            base.update(s3.env)
            base.update(
                MLFLOW_TRACKING_URI=ml.uri,
                OMP_NUM_THREADS="1",
                RAY_USAGE_STATS_ENABLED="0",
                MPLBACKEND="Agg",
                # a loaded 2-core machine: Ray Train's worker group start-up takes its time
                RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180",
            )
            cluster = lc.plan_cluster(work / "cluster")
            lc.start(cluster, bin_dir=str(BIN), base_env=base)
            env = {**base, **cluster.client_env(), "PATH": f"{BIN}:{base.get('PATH', '')}"}
            env.pop("PYTHONPATH", None)
            pids = [_server_pid(s3.endpoint), _server_pid(ml.uri)]
            try:
                yield ClusterEnv(
                    cluster=cluster,
                    s3=s3,
                    mlflow=ml,
                    env=env,
                    node_env=base,
                    work=work,
                    extra_pids=[p for p in pids if p],
                )
            finally:
                lc.stop(cluster)


def _server_pid(url: str) -> int | None:
    """The pid listening on ``url``'s port (the S3 / MLflow server's process group)."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(["ss", "-tlnpH", f"sport = :{port}"], capture_output=True, text=True)
    found = re.findall(r"pid=(\d+)", out.stdout)
    return os.getpgid(int(found[0])) if found else None


@pytest.fixture(scope="module")  # torn down after its module: three idle raylets cost CPU
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterEnv]:
    with local_cluster(tmp_path_factory.mktemp("cluster")) as ce:
        yield ce


# ------------------------------------------------------------------ jobs on it


def ray_cli(ce: ClusterEnv, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), "job", *args, "--address", ce.address],
        cwd=ROOT,
        env=ce.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def job_status(ce: ClusterEnv, submission_id: str) -> str:
    text = ray_cli(ce, "status", submission_id)
    for word, status in (
        ("succeeded", "SUCCEEDED"),
        ("failed", "FAILED"),
        ("was stopped", "STOPPED"),
    ):
        if re.search(rf"Job '{submission_id}' {word}", text):
            return status
    found = re.findall(r"Status for job '[^']+': (\w+)", text)
    assert found, text
    return found[-1]


def submit(ce: ClusterEnv, *entrypoint: str, name: str = "job") -> str:
    """``ray job submit --working-dir . --no-wait -- <entrypoint>``; the submission id."""
    submission_id = f"ageray-{name}-{uuid.uuid4().hex[:6]}"
    argv = [
        str(BIN / "ray"), "job", "submit", "--address", ce.address,
        "--submission-id", submission_id, "--no-wait", "--working-dir", ".",
        "--runtime-env", "platform/cluster/runtime_env.yaml", "--", *entrypoint,
    ]  # fmt: skip
    sub = subprocess.run(argv, cwd=ROOT, env=ce.env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return submission_id


def wait_job(ce: ClusterEnv, submission_id: str, timeout: float = 600) -> tuple[str, str]:
    """(status, logs) once the job is done."""
    deadline = time.monotonic() + timeout
    status = job_status(ce, submission_id)
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            ray_cli(ce, "stop", submission_id)
            raise AssertionError(ray_cli(ce, "logs", submission_id)[-4000:])
        time.sleep(3)
        status = job_status(ce, submission_id)
    return status, ray_cli(ce, "logs", submission_id)


def run_job(ce: ClusterEnv, *entrypoint: str, name: str = "job", timeout: float = 600) -> str:
    """Submit, wait, assert it succeeded; its logs."""
    status, logs = wait_job(ce, submit(ce, *entrypoint, name=name), timeout)
    assert status == "SUCCEEDED", logs[-6000:]
    return logs


def wipe_node_disks(ce: ClusterEnv) -> list[str]:
    """Empty every node's HOME and TMPDIR and the ``runs/`` folders jobs left in their
    unpacked working_dirs; returns what was there (relative paths). A later job that still
    works proves it needs nothing but S3 and MLflow."""
    left: list[str] = []
    for node in ce.cluster.nodes:
        for sub in ("home", "tmp"):
            d = Path(node.root) / sub
            for p in d.iterdir() if d.is_dir() else ():
                if p.name.startswith("_ray"):  # the running raylet's own lock files
                    continue
                left.append(f"{node.name}/{sub}/{p.name}")
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        for runs in Path(node.temp_dir).glob(
            "session_*/runtime_resources/working_dir_files/*/runs"
        ):
            left.append(f"{node.name}/working_dir/runs")
            shutil.rmtree(runs, ignore_errors=True)
    return left
