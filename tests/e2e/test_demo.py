"""`make demo`, shortened: the same `python -m jobs.demo` code path (synthetic shards, a local
Ray, Ray Train stages, evaluation, the MLflow registry, Ray Serve answering HTTP, the table)
with smaller options, as a person would run it, and its console as a person would read it.

Asserts the served answers (one per sampled test image, ages in range, a head named), the
Table IX-style table, where to look next, and that the console is ageray's own: no Ray
internals, no warnings, fits on about two screens.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

#: What Ray, MLflow or Python say on their own; none of it belongs on the demo's console.
NOISE = (
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller",
    "PreemptionWatcher",
    "TrainController pid=",
    "RayTrainWorker pid=",
    "pid=",
    "core_worker.cc",
    "Traceback",
    "UserWarning",
    "FutureWarning",
    "Downloading artifacts",
    "INFO worker.py",
    "Token authentication is enabled",
    "Started a local Ray instance",
)


def test_short_demo_serves_answers_and_prints_the_table(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.pop("AGERAY_VERBOSE", None)
    env.pop("PYTHONWARNINGS", None)
    cmd = [
        sys.executable, "-m", "jobs.demo",
        "--num-samples", "300", "--skip-pretrain", "--port", str(free_port()),
        "--set", f"run.storage_path={tmp_path / 'runs'}",
        "--set", f"data.shards={tmp_path / 'shards'}",
        "--set", "train.stage1.epochs=1",
        "--set", "train.stage2.epochs=1",
    ]  # fmt: skip
    t0 = time.time()
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    wall = time.time() - t0
    console = done.stdout + done.stderr
    (tmp_path / "console.txt").write_text(console)  # kept by pytest for a look afterwards
    assert done.returncode == 0, console[-6000:]

    # 1-4: every step ran, training reported its epochs
    for step in range(1, 7):
        assert f"[demo {step}/6]" in done.stdout
    assert re.search(r"\[ageray\] stage1 epoch 1/1 done", done.stdout), done.stdout
    assert re.search(r"\[ageray\] stage2 epoch 1/1 done", done.stdout), done.stdout

    # 5: Serve answered real HTTP requests: rows of "key true answer head vanilla balanced"
    served = re.findall(
        r"^(\S+)\s+(\d+)\s+(\d+\.\d)\s+(vanilla|balanced)\s+(\d+\.\d)\s+(\S+)\s*$",
        done.stdout,
        flags=re.M,
    )
    assert len(served) >= 3, done.stdout
    for _, true, answer, _head, vanilla, balanced in served:
        assert 0 <= float(answer) <= 100 and 0 <= float(vanilla) <= 100
        assert balanced == "None" or 0 <= float(balanced) <= 100
        assert 0 <= int(true) <= 100
    assert re.search(r"serving models:/ageray-demo@candidate \(version \d+\)", done.stdout)

    # 6: the table, then where to look; the report it names exists
    out = done.stdout.splitlines()
    start = next(i for i, ln in enumerate(out) if ln.startswith("| row | MAE | CMAE |"))
    table = []
    for ln in out[start + 2 :]:  # the Table IX block: header, rule, then one line per row
        if not ln.startswith("| "):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        table.append((cells[0].split(" [")[0], float(cells[1]), float(cells[2])))
    names = {name for name, _, _ in table}
    assert {"Vanilla", "Balanced", "Smaller Υ (AR)"} <= names, done.stdout
    assert all(0 <= mae <= 100 and 0 <= cmae <= 100 for _, mae, cmae in table), table
    assert any("[served]" in ln for ln in out[start : start + 2 + len(table)])
    tail = done.stdout.rstrip().splitlines()
    assert any("Where to look next" in ln for ln in tail[-8:]), tail[-8:]
    report = re.search(r"report:\s+(\S+report\.md)", done.stdout)
    assert report and Path(report.group(1)).is_file()
    assert done.stdout.index("shut down Serve and Ray.") < done.stdout.index("Where to look")

    # the console is ageray's own and short
    noisy = [ln for ln in console.splitlines() if any(n in ln for n in NOISE)]
    assert not noisy, noisy[:10]
    lines = console.count("\n")
    assert lines <= 120, f"{lines} lines:\n{console}"
    print(f"short demo: {lines} console lines in {wall:.0f} s")
