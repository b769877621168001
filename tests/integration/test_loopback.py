"""A Ray that ageray starts itself (a job in local mode, the demo) binds to loopback only.

Why: Ray replaces a node IP of 127.0.0.1 with the machine's interface address, so a job's
local Ray used to advertise that address and listen on every interface (its GCS, raylet and
agents). ``ageray.training.driver.init_ray`` now starts it in Ray's single-node mode
(``loopback_only``). Checked on the sockets themselves, with ``ss``, in a fresh process (its
own session, so every Ray process it starts is found) that runs a task and lists them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, subprocess
import ray
from ageray.config import load_config
from ageray.localcluster import off_loopback, parse_ss, process_tree
from ageray.training.driver import init_ray

cfg = load_config(None, ["ray.num_cpus=1", "ray.object_store_mb=100"])
init_ray(cfg)

@ray.remote
def where():
    return ray.util.get_node_ip_address()

ip = ray.get(where.remote())
pids = process_tree([os.getsid(0)])
socks = [s for s in parse_ss(subprocess.run(["ss", "-tanp"], capture_output=True,
         text=True).stdout) if s.pid in pids]
print("RESULT " + json.dumps({
    "node_ip": ip,
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
    "sockets": len(socks),
    "listening": sorted({s.local for s in socks if s.state == "LISTEN"}),
    "off": [str(s) for s in off_loopback(socks, pids)],
}))
ray.shutdown()
"""


def test_local_ray_of_a_job_binds_loopback_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=f"{ROOT / 'platform'}:{ROOT}", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,  # the probe's session id finds every Ray process it starts
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(line[len("RESULT ") :])
    assert got["node_ip"] == "127.0.0.1" and got["nodes"] == ["127.0.0.1"]
    assert got["sockets"] > 10 and len(got["listening"]) >= 5  # GCS, raylet, agents, worker
    assert got["off"] == [], got
