"""A three-node Ray cluster on this machine, on loopback: ``python -m jobs.cluster up``,
``status``, ``env`` (the shell lines that point ``ray job submit`` at it) and ``down``.

``up`` starts a head (127.0.0.10) and two workers (127.0.0.2, 127.0.0.3), one CPU each,
token auth, every port chosen free, and writes ``runs/cluster/state.json`` (pids, addresses,
token). ``down`` stops only those process groups (never ``ray stop``, which would end every
Ray on the machine). The rules are in :mod:`ageray.localcluster`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ageray import localcluster as lc

BIN = str(Path(sys.executable).parent)


def _load(root: Path) -> lc.Cluster | None:
    path = lc.state_file(root)
    return lc.Cluster.from_json(path.read_text()) if path.is_file() else None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def up(args: argparse.Namespace) -> int:
    root = Path(args.root)
    old = _load(root)
    if old is not None and any(_alive(n.pid) for n in old.nodes):
        print(
            f"[ageray] a cluster already runs from {root} ({old.dashboard_url}); "
            "`python -m jobs.cluster down` first"
        )
        return 2
    cluster = lc.plan_cluster(
        root, ips=args.ips.split(","), num_cpus=args.num_cpus, object_store_mb=args.object_mb
    )
    print(f"[ageray] starting {len(cluster.nodes)} Ray nodes on {args.ips} (about 30 s)")
    try:
        lc.start(cluster, bin_dir=BIN, base_env=dict(os.environ))
    except lc.ClusterError as exc:
        print(f"[ageray] cluster: {exc}", file=sys.stderr)
        return 1
    root.mkdir(parents=True, exist_ok=True)
    lc.state_file(root).write_text(cluster.to_json())
    os.chmod(lc.state_file(root), 0o600)  # it holds the cluster's token
    print(f"[ageray] cluster up: GCS {cluster.gcs_address}, dashboard {cluster.dashboard_url}")
    print(f"[ageray] state in {lc.state_file(root)}; for `ray job submit` in this shell:")
    print(f'  eval "$(python -m jobs.cluster env --root {root})"')
    return 0


def down(args: argparse.Namespace) -> int:
    root = Path(args.root)
    cluster = _load(root)
    if cluster is None:
        print(f"[ageray] no cluster state in {root}; nothing to stop")
        return 0
    lc.stop(cluster)
    lc.state_file(root).unlink()
    print(f"[ageray] stopped {len(cluster.nodes)} nodes (their process groups only)")
    return 0


def status(args: argparse.Namespace) -> int:
    cluster = _load(Path(args.root))
    if cluster is None:
        print(f"[ageray] no cluster state in {args.root}")
        return 1
    alive = lc.alive_nodes(cluster)
    rows = [
        {"node": n.name, "ip": n.ip, "pid": n.pid, "up": _alive(n.pid), "joined": n.ip in alive}
        for n in cluster.nodes
    ]
    print(
        json.dumps(
            {"gcs": cluster.gcs_address, "dashboard": cluster.dashboard_url, "nodes": rows},
            indent=2,
        )
    )
    return 0 if all(r["joined"] for r in rows) else 1


def env(args: argparse.Namespace) -> int:
    cluster = _load(Path(args.root))
    if cluster is None:
        print(f"[ageray] no cluster state in {args.root}", file=sys.stderr)
        return 1
    print(lc.env_lines(cluster.client_env()))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=("up", "down", "status", "env"))
    p.add_argument("--root", default="runs/cluster", help="state and node folders")
    p.add_argument("--ips", default=",".join(lc.DEFAULT_IPS), help="head first, then workers")
    p.add_argument("--num-cpus", type=int, default=1, help="CPUs each node offers")
    p.add_argument("--object-mb", type=int, default=100, help="object store per node (MB)")
    args = p.parse_args(argv)
    return {"up": up, "down": down, "status": status, "env": env}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
