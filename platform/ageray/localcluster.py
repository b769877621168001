"""A multi-node Ray cluster on one machine: a head and worker raylets, each its own
``ray start --block`` process group with its own loopback IP, temp dir, HOME and TMPDIR.

Why: every run on one node hides the "works on one node only" faults (a path only the head
has, Train workers that never leave one node, Serve replicas on one node, a job that cannot
lose a node). Separate raylets on separate loopback addresses make those faults real while
all traffic stays on 127.0.0.0/8.

Why not 127.0.0.1 for the head: Ray rewrites ``127.0.0.1``/``localhost`` to the machine's
interface address (its GCS and raylet would then advertise and listen there); other
loopback addresses it keeps. So the default node IPs are 127.0.0.10 (head), 127.0.0.2 and
127.0.0.3. A driver joins with ``ray.init(address="127.0.0.10:<gcs>",
_node_ip_address="127.0.0.10")``.

The rules (addresses, ports, environments, commands, the state file, which sockets are off
loopback) are pure functions tested without Ray; :func:`start` / :func:`stop` run them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IPS",
    "Cluster",
    "ClusterError",
    "NodeSpec",
    "check_node_ip",
    "join_node",
    "node_command",
    "node_env",
    "off_loopback",
    "parse_ss",
    "plan_cluster",
    "start",
    "start_node",
    "stop",
]

DEFAULT_IPS = ("127.0.0.10", "127.0.0.2", "127.0.0.3")

#: Ports every raylet opens; left to Ray they default to fixed numbers (agent 52365,
#: metrics 8080, ...) that collide between nodes of one machine and with other Rays on it.
NODE_PORT_OPTIONS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
#: Ports only the head opens (besides the GCS ``--port`` and the dashboard).
HEAD_PORT_OPTIONS = ("ray-client-server-port",)


class ClusterError(RuntimeError):
    """The cluster cannot be planned or did not come up; the message says what to change."""


def check_node_ip(ip: str) -> str:
    """``ip`` if it is a loopback address Ray keeps as given; else a clear error."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ClusterError(f"node IP {ip!r} is not an IP address; use e.g. 127.0.0.2") from exc
    if not addr.is_loopback or addr.version != 4:
        raise ClusterError(f"node IP {ip} is not on 127.0.0.0/8: the local cluster stays there")
    if ip == "127.0.0.1":
        raise ClusterError(
            "node IP 127.0.0.1: Ray replaces it with the machine's interface address, so the "
            "node would listen off loopback; use another 127.x address (e.g. 127.0.0.10)"
        )
    return ip


@dataclass
class NodeSpec:
    """One raylet: its name, IP, custom resource (``{"node_<name>": 1}``) and folders."""

    name: str
    ip: str
    head: bool
    root: str  # this node's folder: home/, tmp/, log
    temp_dir: str  # Ray's --temp-dir (short: unix socket paths <= 107 characters)
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None

    @property
    def resource(self) -> str:
        return f"node_{self.name}"


@dataclass
class Cluster:
    """What ``start`` started and ``stop`` stops: written to ``state.json``."""

    root: str
    gcs_port: int
    dashboard_port: int
    token: str
    nodes: list[NodeSpec]
    num_cpus: int = 1
    object_store_mb: int = 100

    @property
    def head(self) -> NodeSpec:
        return next(n for n in self.nodes if n.head)

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a shell needs to talk to this cluster (``ray job submit``, ``ray.init``)."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        raw = json.loads(text)
        raw["nodes"] = [NodeSpec(**n) for n in raw["nodes"]]
        return cls(**raw)


def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def plan_cluster(
    root: str | Path,
    *,
    ips: Iterable[str] = DEFAULT_IPS,
    names: Iterable[str] | None = None,
    num_cpus: int = 1,
    object_store_mb: int = 100,
    token: str | None = None,
    port: Callable[[], int] = _free_port,
    temp_base: str = "/tmp",
) -> Cluster:
    """Addresses, ports and folders for a head (first IP) and one worker per further IP.

    Every port is chosen free (``port``), the head's GCS and dashboard too, so two clusters
    (or another Ray) on one machine never share one."""
    ips = [check_node_ip(ip) for ip in ips]
    if len(set(ips)) != len(ips) or not ips:
        raise ClusterError(f"node IPs {ips} must be distinct and at least one")
    names = list(names) if names is not None else ["head"] + [f"w{i}" for i in range(1, len(ips))]
    if len(names) != len(ips):
        raise ClusterError(f"{len(names)} names for {len(ips)} node IPs")
    root = Path(root).resolve()
    nodes = []
    for i, (name, ip) in enumerate(zip(names, ips, strict=True)):
        opts = NODE_PORT_OPTIONS + (HEAD_PORT_OPTIONS if i == 0 else ())
        temp = os.path.join(temp_base, f"rc-{secrets.token_hex(3)}-{name}")
        if len(temp) > 40:  # Ray appends session_<date>/sockets/<name> (~70 characters)
            raise ClusterError(f"temp dir {temp} is too long for unix sockets; use a short base")
        nodes.append(
            NodeSpec(
                name=name,
                ip=ip,
                head=i == 0,
                root=str(root / name),
                temp_dir=temp,
                ports={opt: port() for opt in opts},
            )
        )
    return Cluster(
        root=str(root),
        gcs_port=port(),
        dashboard_port=port(),
        token=token or secrets.token_hex(24),
        nodes=nodes,
        num_cpus=num_cpus,
        object_store_mb=object_store_mb,
    )


def node_command(cluster: Cluster, node: NodeSpec, ray: str = "ray") -> list[str]:
    """``ray start --block ...`` for ``node``: head or worker, its IP, ports, resource."""
    cmd = [
        ray,
        "start",
        "--block",
        f"--node-ip-address={node.ip}",
        f"--num-cpus={cluster.num_cpus}",
        f"--resources={json.dumps({node.resource: 1})}",
        f"--object-store-memory={cluster.object_store_mb * 1024 * 1024}",
        f"--temp-dir={node.temp_dir}",
        *(f"--{opt}={p}" for opt, p in sorted(node.ports.items())),
        "--disable-usage-stats",
    ]
    if node.head:
        cmd[3:3] = [
            "--head",
            f"--port={cluster.gcs_port}",
            "--include-dashboard=true",
            f"--dashboard-host={node.ip}",
            f"--dashboard-port={cluster.dashboard_port}",
        ]
    else:
        cmd.insert(3, f"--address={cluster.gcs_address}")
    return cmd


def node_env(cluster: Cluster, node: NodeSpec, base: Mapping[str, str], bin_dir: str) -> dict:
    """The node's environment: token auth, its own HOME and TMPDIR (so a file one node
    writes is not on another's disk), this venv first on PATH (a job's ``python``), and no
    address of another cluster."""
    # No PYTHONPATH either: a node has no checkout, a job brings its code (--working-dir).
    # Nor Ray's single-node switch (``driver.loopback_only``): these nodes need their IPs.
    drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
            "PYTHONPATH", "VIRTUAL_ENV")  # fmt: skip
    env = {k: v for k, v in base.items() if k not in drop}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=cluster.token,
        HOME=str(Path(node.root) / "home"),
        TMPDIR=str(Path(node.root) / "tmp"),
        PATH=f"{bin_dir}{os.pathsep}{base.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0",
        AGERAY_NODE=node.name,
    )
    return env


def start_node(
    cluster: Cluster, node: NodeSpec, *, bin_dir: str, base_env: Mapping[str, str]
) -> subprocess.Popen:
    """Start ``node``'s raylet as its own process group (its pid is the group's id)."""
    for sub in ("home", "tmp"):
        (Path(node.root) / sub).mkdir(parents=True, exist_ok=True)
    log = open(Path(node.root) / "ray.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        node_command(cluster, node, str(Path(bin_dir) / "ray")),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=node_env(cluster, node, base_env, bin_dir),
        cwd=str(Path(node.root) / "home"),
        start_new_session=True,
    )
    log.close()
    node.pid = proc.pid
    return proc


def alive_nodes(cluster: Cluster, *, timeout: float = 20.0) -> set[str]:
    """IPs of the nodes the GCS counts alive, from the dashboard's state API (an HTTP
    call with the cluster's token: ``ray list nodes`` would cost a Python start-up per poll,
    tens of seconds on a loaded machine). Empty while the dashboard does not answer."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{cluster.dashboard_url}/api/v0/nodes?detail=1&limit=1000",
        headers={"Authorization": f"Bearer {cluster.token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return set()
    rows = (body.get("data") or {}).get("result") or {}
    rows = rows.get("result", []) if isinstance(rows, dict) else rows
    return {r["node_ip"] for r in rows if r.get("state") == "ALIVE"}


def wait_for_nodes(
    cluster: Cluster,
    ips: Iterable[str],
    *,
    timeout: float = 300.0,
    proc: subprocess.Popen | None = None,
) -> bool:
    """Until every IP in ``ips`` is an alive node (True), or False when ``proc`` (the
    node's ``ray start``) exited first; a ClusterError naming the logs after ``timeout``."""
    want = set(ips)
    deadline = time.monotonic() + timeout
    while True:
        got = alive_nodes(cluster)
        if want <= got:
            return True
        if proc is not None and proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise ClusterError(
                f"nodes {sorted(want - got)} did not join within {timeout:.0f}s; "
                f"see {cluster.root}/<node>/ray.log"
            )
        time.sleep(1)


def join_node(
    cluster: Cluster,
    node: NodeSpec,
    *,
    bin_dir: str,
    base_env: Mapping[str, str],
    timeout: float = 300.0,
    attempts: int = 5,
) -> None:
    """Start ``node`` and wait until the GCS counts it alive, starting it again when its
    ``ray start`` gave up: Ray waits a fixed 30 s for a new raylet to register, which a
    loaded 2-core machine can exceed."""
    for attempt in range(1, attempts + 1):
        proc = start_node(cluster, node, bin_dir=bin_dir, base_env=base_env)
        if wait_for_nodes(cluster, [node.ip], timeout=timeout, proc=proc):
            return
        stop_group(proc.pid)  # what that ray start left behind (its raylet, agents)
        if attempt == attempts:
            raise ClusterError(
                f"node {node.name} ({node.ip}) failed to start {attempts} times; "
                f"see {node.root}/ray.log"
            )


def start(
    cluster: Cluster, *, bin_dir: str, base_env: Mapping[str, str], timeout: float = 300.0
) -> Cluster:
    """Start the head, then the workers one at a time (two raylets registering at once on
    a loaded machine is what times out); return once all are alive. On failure every
    node already started is stopped again."""
    try:
        for node in sorted(cluster.nodes, key=lambda n: not n.head):
            join_node(cluster, node, bin_dir=bin_dir, base_env=base_env, timeout=timeout)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop_group(pid: int | None, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL, to process group ``pid`` (a node's raylet and its children)."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop(cluster: Cluster) -> None:
    """Stop only this cluster's process groups (workers first); never ``ray stop``."""
    import shutil

    for node in sorted(cluster.nodes, key=lambda n: n.head):
        stop_group(node.pid)
        node.pid = None
        shutil.rmtree(node.temp_dir, ignore_errors=True)


# ------------------------------------------------------------------ loopback proof


@dataclass(frozen=True)
class Socket:
    state: str
    local: str
    peer: str
    pid: int
    name: str = ""


def _host(addr: str) -> str:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.split("%", 1)[0]


def parse_ss(text: str) -> list[Socket]:
    """Rows of ``ss -tanp`` output (``State Recv-Q Send-Q Local Peer Process``), one per
    (socket, process) in its ``users:(("name",pid=N,fd=M),...)``."""
    import re

    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[0] == "State":
            continue
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', " ".join(parts[5:])):
            out.append(
                Socket(state=parts[0], local=parts[3], peer=parts[4], pid=int(pid), name=name)
            )
    return out


WILDCARDS = ("*", "0.0.0.0", "::")

#: Ray's own servers that listen on every interface whenever the node IP is not 127.0.0.1
#: (its C++ gRPC servers, and the Prometheus exporters, which bind loopback only for a node
#: IP of 127.0.0.1): nothing in ``ray start`` moves them. A multi-node cluster on loopback
#: needs node IPs other than 127.0.0.1 (Ray rewrites that one), so these stay wildcard
#: listeners; their peers, and every address Ray advertises, are on loopback.
RAY_WILDCARD_LISTENERS = (
    "gcs_server",
    "raylet",
    "ray::*",  # every Ray worker and actor process (its core worker's gRPC server)
    "python",  # the dashboard's and the autoscaler monitor's Prometheus exporters
    # the dashboard's module processes (ray-dashboard-ServeHead, shown cut to 15 characters)
    # connect to the cluster as drivers once used (Serve's REST API: `serve shutdown`), and a
    # driver's core worker has the same wildcard gRPC server as ray::*
    "ray-dashboard-*",
)


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _named(name: str, patterns: set[str]) -> bool:
    """``name`` is one of ``patterns`` (a trailing ``*`` matches any rest)."""
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def off_loopback(
    sockets: Iterable[Socket], pids: Iterable[int], *, wildcard_ok: Iterable[str] = ()
) -> list[Socket]:
    """Sockets of ``pids`` with an address off loopback: a connection whose either end is
    not on 127.0.0.0/8 (or ::1), or a listener on an address that is not loopback. A
    wildcard listener (``*``, ``0.0.0.0``) also answers on the interface address, so it
    counts as off loopback unless its process name is in ``wildcard_ok`` (``ray::*``: any
    name with that prefix)."""
    wanted, allowed = set(pids), set(wildcard_ok)
    bad = []
    for s in sockets:
        if s.pid not in wanted:
            continue
        local, peer = _host(s.local), _host(s.peer)
        if s.state == "LISTEN":
            ok = _is_loopback(local) or (local in WILDCARDS and _named(s.name, allowed))
        else:
            ok = _is_loopback(local) and _is_loopback(peer)
        if not ok:
            bad.append(s)
    return bad


def process_tree(roots: Iterable[int]) -> set[int]:
    """``roots`` and all their descendants (from /proc), plus every process in their
    process groups and sessions (Ray's workers re-parent but keep the session)."""
    roots = set(roots)
    parent: dict[int, int] = {}
    group: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parent[int(entry.name)] = int(fields[1])
        group[int(entry.name)] = (int(fields[2]), int(fields[3]))  # pgrp, session
    found = set(roots)
    found |= {p for p, (pg, sid) in group.items() if pg in roots or sid in roots}
    grew = True
    while grew:
        extra = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= extra
        grew = bool(extra)
    return found & set(parent)


def state_file(root: str | Path) -> Path:
    return Path(root) / "state.json"


def env_lines(env: Mapping[str, Any]) -> str:
    """``export K=V`` lines for a shell (``eval $(python -m jobs.cluster env)``)."""
    import shlex

    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items())
