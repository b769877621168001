"""``ray job submit`` of a tiny two-stage training to a real ``ray start --head`` on loopback,
exactly as the runtime_env in platform/cluster documents it: the checkout uploaded as the
working_dir, ``python -m jobs.train --config recipes/demo.yaml --set ...`` as the entrypoint.

The head is ``services.ray_head``: its own process group and a private ``--temp-dir``,
stopped without ``ray stop`` (which would kill every Ray process of the user on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import BIN, ray_head

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("job-submit")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    # ray_head turns on token auth with this cluster's own token and puts the venv first on
    # PATH (a job's `python`), both written into env
    with ray_head(work, env=env) as address:
        yield {"address": address, "env": env, "work": work}


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
    assert report["row_order"] == [
        "vanilla",
        "balanced",
        "routed_bigger",
        "routed",
        "routed_threshold",
        "routed_learned",
        "oracle",
    ]

    # MLflow (the sqlite store named in the job's config): runs, epochs, registry alias
    with contextlib.closing(sqlite3.connect(db)) as con:
        stages = dict(
            con.execute(
                "select value, run_uuid from tags where key = 'ageray.stage' and run_uuid in "
                "(select run_uuid from tags where key = 'ageray.pipeline' and value = ?)",
                (name,),
            ).fetchall()
        )
        assert set(stages) == {"pipeline", "stage1", "stage2", "routing", "evaluate"}
        steps = con.execute(
            "select step from metrics where run_uuid = ? and key = 'val_mae'", (stages["stage1"],)
        ).fetchall()
        assert steps == [(0,)]
        alias = con.execute(
            "select version from registered_model_aliases where name = ? and alias = 'candidate'",
            (model,),
        ).fetchall()
        assert alias == [(1,)]
