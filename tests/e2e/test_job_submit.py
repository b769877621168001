"""``ray job submit`` of a tiny two-stage training to a real ``ray start --head`` on loopback,
exactly as the runtime_env in platform/cluster documents it: the checkout uploaded as the
working_dir, ``python -m jobs.train --config recipes/demo.yaml --set ...`` as the entrypoint.

The head is this module's own: started in a new session with a private ``--temp-dir`` and
stopped by signalling the processes of that session only. ``ray stop --force`` is never
used: it kills every Ray process of the user on the machine (other people's clusters and
this test session's in-process ``ray_local`` included), and a head at the default temp dir
would be joined by anybody's bare ``ray.init()`` while it is up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import BIN, free_port, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PORT_OPTIONS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def stop_session(sid: int, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL, every process of session ``sid`` (ours: started with setsid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.25)
        if not session_pids(sid):
            return


@contextlib.contextmanager
def private_ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[str]:
    """``ray start --head`` on 127.0.0.1 in its own session and temp dir; yields the dashboard
    address for ``ray job submit``; on exit stops exactly the processes it started."""
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: unix socket paths <= 107
    port, dash = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--object-store-memory=200000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--temp-dir={temp}",
            # Ray's fixed default ports (agent 52365, client server 10001, ...) are taken
            # when another cluster runs on the machine: the job agent would then never serve.
            *(f"--{opt}={free_port()}" for opt in PORT_OPTIONS),
            "--disable-usage-stats",
        ],
        env=env,
        cwd=temp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        wait_http(address + "/api/version", timeout=120)
        yield address
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv's
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token authentication, as Ray turns on by default, with this cluster's own token:
        # neither ~/.ray/auth_token nor the caller's environment decides whether it works.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    with private_ray_head(env) as address:
        yield {"address": address, "env": env, "work": tmp_path_factory.mktemp("job-submit")}


def make_shards(out: Path) -> None:
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "jobs.make_shards",
            "--source",
            "synthetic",
            "--num-samples",
            "256",
            "--image-size",
            "64",
            "--output",
            str(out),
            "--quiet",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def ray_cli(head: dict, *args: str) -> str:
    """``ray job ...`` against the head, with the head's token (as a user's shell has it)."""
    out = subprocess.run(
        [str(BIN / "ray"), "job", *args, "--address", head["address"]],
        cwd=ROOT,
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def job_status(head: dict, submission_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, read from ``ray job status``, which
    words the terminal states as sentences and the others as ``Status for job 'x': S``."""
    text = ray_cli(head, "status", submission_id)
    for pattern, status in (
        (rf"Job '{submission_id}' succeeded", "SUCCEEDED"),
        (rf"Job '{submission_id}' failed", "FAILED"),
        (rf"Job '{submission_id}' was stopped", "STOPPED"),
    ):
        if re.search(pattern, text):
            return status
    found = re.findall(r"Status for job '[^']+': (\w+)", text)
    assert found, text
    return found[-1]


def test_ray_job_submit_trains_both_stages(head: dict) -> None:
    work: Path = head["work"]
    shards, storage = work / "shards", work / "runs"
    make_shards(shards)  # absolute path: the job runs elsewhere (its unpacked working_dir)
    db = work / "mlflow.db"
    name, model = "e2e-submit", "ageray-e2e-submit"
    sets = {
        "run.name": name,
        "run.storage_path": storage,
        "data.shards": shards,
        "data.num_workers": 0,
        "data.batch_size": 32,
        "train.stage1.epochs": 1,
        "train.stage2.epochs": 1,
        "train.log_every": 0,
        "ray.num_workers": 1,
        "ray.cpus_per_worker": 1,
        "tracking.uri": f"sqlite:///{db}",
        "tracking.experiment": "e2e-submit",
        "tracking.registered_model": model,
    }
    submission_id = f"ageray-train-{uuid.uuid4().hex[:8]}"
    argv = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["address"],
        "--submission-id",
        submission_id,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env",
        "platform/cluster/runtime_env.yaml",
        "--",
        "python",
        "-m",
        "jobs.train",
        "--config",
        "recipes/demo.yaml",
        *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
    ]
    for _ in range(20):  # the head's job agent comes up a little after its dashboard
        sub = subprocess.run(argv, cwd=ROOT, env=head["env"], capture_output=True, text=True)
        if sub.returncode == 0 or "No available agent" not in sub.stderr:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    deadline = time.monotonic() + 900
    status = job_status(head, submission_id)
    while status not in TERMINAL:
        assert time.monotonic() < deadline, ray_cli(head, "logs", submission_id)[-4000:]
        time.sleep(3)
        status = job_status(head, submission_id)
    logs = ray_cli(head, "logs", submission_id)
    assert status == "SUCCEEDED", logs[-6000:]

    # the job ran the code it was given (the uploaded working_dir), both stages, evaluation
    assert f"[ageray] run '{name}' finished" in logs
    assert "stage 2 best:" in logs and "Smaller Υ (AR)" in logs
    run_dir = storage / name
    for stage in ("stage1", "stage2"):
        assert (run_dir / stage / "model" / "model.safetensors").is_file()
        assert json.loads((run_dir / stage / "result.json").read_text())["stage"] == stage
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["row_order"] == ["vanilla", "balanced", "routed_bigger", "routed"]

    # MLflow (the sqlite store named in the job's config): runs, epochs, registry alias
    with contextlib.closing(sqlite3.connect(db)) as con:
        stages = dict(
            con.execute(
                "select value, run_uuid from tags where key = 'ageray.stage' and run_uuid in "
                "(select run_uuid from tags where key = 'ageray.pipeline' and value = ?)",
                (name,),
            ).fetchall()
        )
        assert set(stages) == {"pipeline", "stage1", "stage2", "evaluate"}
        steps = con.execute(
            "select step from metrics where run_uuid = ? and key = 'val_mae'", (stages["stage1"],)
        ).fetchall()
        assert steps == [(0,)]
        alias = con.execute(
            "select version from registered_model_aliases where name = ? and alias = 'candidate'",
            (model,),
        ).fetchall()
        assert alias == [(1,)]
