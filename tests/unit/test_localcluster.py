"""The local cluster's rules without Ray: node IPs, ports, commands, environments, the state
file and which sockets count as off loopback."""

from __future__ import annotations

import itertools
import json

import pytest

from ageray import localcluster as lc


def _plan(tmp_path, **kw):
    ports = itertools.count(20000)
    return lc.plan_cluster(tmp_path / "c", port=lambda: next(ports), token="t0k", **kw)


def test_node_ips_stay_on_loopback_and_127_0_0_1_is_refused() -> None:
    assert lc.check_node_ip("127.0.0.2") == "127.0.0.2"
    with pytest.raises(lc.ClusterError, match="interface address"):
        lc.check_node_ip("127.0.0.1")
    for bad in ("10.0.0.2", "0.0.0.0", "::1", "node-a"):
        with pytest.raises(lc.ClusterError, match=bad.replace(".", r"\.")):
            lc.check_node_ip(bad)


def test_plan_gives_every_node_its_own_ports_ip_resource_and_folders(tmp_path) -> None:
    c = _plan(tmp_path)
    assert [n.ip for n in c.nodes] == ["127.0.0.10", "127.0.0.2", "127.0.0.3"]
    assert [n.resource for n in c.nodes] == ["node_head", "node_w1", "node_w2"]
    ports = [c.gcs_port, c.dashboard_port, *(p for n in c.nodes for p in n.ports.values())]
    assert len(ports) == len(set(ports))  # nothing shared, no fixed Ray default
    assert "ray-client-server-port" in c.head.ports
    assert "ray-client-server-port" not in c.nodes[1].ports
    assert len({n.temp_dir for n in c.nodes}) == 3
    assert all(len(n.temp_dir) <= 40 for n in c.nodes)  # unix sockets under it: <= 107
    assert len({n.root for n in c.nodes}) == 3
    with pytest.raises(lc.ClusterError, match="distinct"):
        _plan(tmp_path, ips=["127.0.0.2", "127.0.0.2"])


def test_commands_head_and_worker(tmp_path) -> None:
    c = _plan(tmp_path)
    head = lc.node_command(c, c.head, "ray")
    assert head[:4] == ["ray", "start", "--block", "--head"]
    assert f"--port={c.gcs_port}" in head
    assert "--dashboard-host=127.0.0.10" in head and "--node-ip-address=127.0.0.10" in head
    assert '--resources={"node_head": 1}' in head and "--num-cpus=1" in head
    w = lc.node_command(c, c.nodes[2], "ray")
    assert f"--address=127.0.0.10:{c.gcs_port}" in w and "--head" not in w
    assert "--node-ip-address=127.0.0.3" in w and not any("dashboard-port" in x for x in w)
    assert f"--object-store-memory={100 * 1024 * 1024}" in w


def test_node_env_has_token_own_home_tmp_and_no_checkout(tmp_path) -> None:
    c = _plan(tmp_path)
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/src", "RAY_ADDRESS": "x:1", "KEEP": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    e1, e2 = (lc.node_env(c, n, base, "/venv/bin") for n in c.nodes[1:])
    assert e1["RAY_AUTH_MODE"] == "token" and e1["RAY_AUTH_TOKEN"] == "t0k"
    assert e1["HOME"] != e2["HOME"] and e1["TMPDIR"] != e2["TMPDIR"]
    assert e1["PATH"].startswith("/venv/bin") and e1["KEEP"] == "1"
    assert "PYTHONPATH" not in e1 and "RAY_ADDRESS" not in e1
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in e1


def test_state_round_trips_and_client_env(tmp_path) -> None:
    c = _plan(tmp_path)
    c.nodes[1].pid = 4242
    back = lc.Cluster.from_json(c.to_json())
    assert back == c and back.nodes[1].pid == 4242
    assert json.loads(c.to_json())["token"] == "t0k"
    assert back.client_env() == {
        "RAY_ADDRESS": f"http://127.0.0.10:{c.dashboard_port}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "t0k",
    }
    assert "export RAY_AUTH_TOKEN=t0k" in lc.env_lines(back.client_env())


SS = """State  Recv-Q Send-Q Local Address:Port  Peer Address:Port Process
LISTEN 0 128 127.0.0.10:4000 0.0.0.0:* users:(("gcs_server",pid=10,fd=3))
LISTEN 0 128 *:4001 *:* users:(("raylet",pid=11,fd=3))
LISTEN 0 128 0.0.0.0:4002 0.0.0.0:* users:(("moto",pid=12,fd=3))
ESTAB 0 0 127.0.0.2:5000 127.0.0.10:4000 users:(("raylet",pid=11,fd=9),("x",pid=13,fd=1))
ESTAB 0 0 [::ffff:127.0.0.3]:5001 [::ffff:127.0.0.10]:4000 users:(("raylet",pid=14,fd=9))
ESTAB 0 0 192.0.2.2:5002 192.0.2.2:4001 users:(("python",pid=15,fd=4))
LISTEN 0 128 192.0.2.2:4003 0.0.0.0:* users:(("gcs_server",pid=10,fd=5))
"""


def test_off_loopback_flags_interface_addresses_and_unexpected_wildcards() -> None:
    socks = lc.parse_ss(SS)
    assert len(socks) == 8  # one row per (socket, process)
    assert socks[0] == lc.Socket("LISTEN", "127.0.0.10:4000", "0.0.0.0:*", 10, "gcs_server")
    bad = lc.off_loopback(socks, [10, 11, 12, 13, 14, 15], wildcard_ok=("raylet",))
    assert sorted((s.pid, s.local) for s in bad) == [
        (10, "192.0.2.2:4003"),
        (12, "0.0.0.0:4002"),
        (15, "192.0.2.2:5002"),
    ]
    assert lc.off_loopback(socks, [13, 14]) == []  # only the pids asked about
    assert [s.local for s in lc.off_loopback(socks, [11])] == ["*:4001"]
    actor = lc.parse_ss('LISTEN 0 128 *:13812 *:* users:(("ray::ActorLocat",pid=20,fd=3))')
    assert lc.off_loopback(actor, [20], wildcard_ok=lc.RAY_WILDCARD_LISTENERS) == []
    assert lc.off_loopback(actor, [20], wildcard_ok=("raylet",)) == actor
