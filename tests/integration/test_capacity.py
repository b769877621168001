"""Runs that ask for more than the cluster has fail in seconds, before anything trains: the
real entry points, each starting its own local Ray (2 CPUs, GPUs hidden), exit 2 with one
line that names the setting to change.

The recipes are the repository's own: the Xing and paper-scale (GLAE, LAE) recipes ask for
a GPU per worker (``ray.use_gpu: true``); before this check they waited forever for one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 90  # a local Ray start on a loaded 2-core machine, plus the check
CPUS2 = ["--set", "ray.num_cpus=2"]  # the local Ray's size, whatever the machine has


def run(args: list[str], tmp_path: Path) -> tuple[int, str, str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only local Ray also on a machine with GPUs
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform")])
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args, "--set", f"run.storage_path={tmp_path / 'runs'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a job that hangs is stopped with the Ray it started
    )
    try:
        out, err = proc.communicate(timeout=LIMIT_S * 2)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[0]} still running after {LIMIT_S * 2}s:\n{out[-2000:]}{err[-2000:]}")
    return proc.returncode, out, err, time.monotonic() - t0


def one_line(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if "this run needs" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    ("recipe", "workers", "fix"),
    [
        ("xing_ldl", 1, "--set ray.use_gpu=false (train on CPUs)"),
        ("glae_r50", 8, "--set ray.use_gpu=false --set ray.num_workers=2 (train on CPUs)"),
    ],
)
def test_gpu_recipe_on_a_cpu_only_local_ray_fails_at_once(
    recipe: str, workers: int, fix: str, tmp_path: Path
) -> None:
    rc, out, err, took = run(
        ["jobs.train", "--config", f"recipes/{recipe}.yaml", "--no-tracking", *CPUS2],
        tmp_path,
    )
    assert rc == 2, (out[-2000:], err[-3000:])
    assert took < LIMIT_S
    line = one_line(err, f"python -m jobs.train: this run needs {workers} worker(s) x {{CPU: 1")
    assert "has {CPU: 2, GPU: 0}" in line and fix in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("stage1"))


def test_more_workers_than_cpus_names_the_number_that_fits(tmp_path: Path) -> None:
    rc, out, err, took = run(
        [
            "jobs.pretrain",
            "--config",
            "recipes/demo.yaml",
            "--no-tracking",
            "--set",
            "ray.num_cpus=2",
            "--set",
            "ray.num_workers=6",
        ],
        tmp_path,
    )
    assert rc == 2, (out[-2000:], err[-3000:])
    assert took < LIMIT_S
    line = one_line(err, "python -m jobs.pretrain: this run needs 6 worker(s) x {CPU: 1}")
    assert "too few CPU (2 of 6)" in line and "--set ray.num_workers=2" in line


def test_search_for_a_gpu_recipe_fails_before_any_trial(tmp_path: Path) -> None:
    rc, out, err, took = run(
        [
            "tuning.search",
            "--config",
            "recipes/glae_r18.yaml",
            "--space",
            "tuning/spaces/glae_r18.yaml",
            "--no-tracking",
            *CPUS2,
        ],
        tmp_path,
    )
    assert rc == 2, (out[-2000:], err[-3000:])
    assert took < LIMIT_S
    needs = "search error: this run needs 8 worker(s) x {CPU: 1, GPU: 1} + a trial driver"
    line = one_line(err, needs)
    # beside the trial driver's 0.1 CPU, one 1-CPU worker fits the 2 CPUs
    assert "--set ray.use_gpu=false --set ray.num_workers=1 (train on CPUs)" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("tune"))
