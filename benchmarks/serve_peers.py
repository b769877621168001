"""ageray's Serve endpoint side by side with its peers, one exported model, one run (issue 24).

    python -m benchmarks.serve_peers                                    # full: ~25 min
    python -m benchmarks.serve_peers --seconds 2 --warmup 1 --repeats 1 --concurrency 1 8

How long: the smoke line took 2 min on 2 shared cores (~70 s of it starting the six servers,
the export and the bare forward); the full run is 3 repeats x 4 concurrencies x 6 servers x
(15 + 3) s = ~22 min of load plus that, ~25 min.
    python -m benchmarks.serve_peers --servers asgi asgi-batch litserve --json peers.json

The model: GLAE's resnet18 with two heads at 112 px, random weights (speed does not depend on
them), saved with ``save_model`` and exported to ONNX by ``with_export`` (``jobs.export``'s
op and parity checks), written beside the weights as the loader finds it. Every server runs
that one ``model.onnx`` in ONNX Runtime on the CPU with the replica's threads (serve/config.yaml:
``torch_threads`` = intra-op threads, 1 inter-op), one model instance per server.

Servers, each started as its own process group on 127.0.0.1 and pinned to the same cores
(``--cores``, default the first two):

* ``ageray-proxy`` / ``ageray-direct``: serve/config.yaml's application (``backend: auto`` =
  ONNX Runtime, its batching and limits) deployed as ``benchmarks.serve_load`` deploys it,
  one replica, in a local Ray of its own; behind Serve's default HTTP proxy, or with direct
  ingress (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: the replica serves HTTP itself). Requests
  ask ``faces=largest`` (one answer per face chip, no face detector), the same work as the
  peers: decode, preprocess, forward, answer.
* ``asgi`` / ``asgi-batch``: benchmarks/peers/asgi_onnx.py, uvicorn + a plain ASGI app,
  ageray's own ``ImagePredictor.prepare`` / ``forward`` / ``rows``; without batching, and with
  its own micro-batching (asyncio queue, max batch 32, 2 ms window).
* ``litserve`` / ``bentoml``: benchmarks/peers/litserve_onnx.py and bentoml_onnx.py with the
  frameworks' own batching (max batch 32), each in its own venv (``--litserve-python``,
  ``--bentoml-bin``; made with ``python3 -m venv /work/peers-venv/NAME`` and
  ``pip install NAME onnxruntime numpy pillow``); preprocessing is ageray's replicated in
  numpy (benchmarks/peers/preprocess.py). A server whose venv is missing or that does not
  start or answer is skipped with the reason printed.

Before anything is timed every server answers the same ``--check`` UTKFace faces and its
ages must equal ageray's ``ImagePredictor.predict`` on them within 1e-4 (else it is dropped,
with the difference printed).

``bare``: the batched ONNX Runtime forward alone (``OnnxBackend`` on prepared faces, batch 1
and 32) in a process of its own pinned like the servers, same thread settings: the floor.

Load: N closed-loop aiohttp clients (``--concurrency``, default 1 8 32 64), each sending its
next raw ``image/jpeg`` body of a real UTKFace face (``../shared/data/utkface-dev.tar``, read
into memory) as soon as the previous one answers, ``--warmup`` s unmeasured then
``--seconds`` s measured. Points are interleaved: for every repeat and concurrency each server
in turn (the order rotates), so the servers of one row see the same machine load; every server
stays up for the whole run (the idle ones' CPU during a point is recorded as ``others_cpu``).
Each cell is the repeat with the median throughput. Per point: answers/s, client p50/p95/p99,
server CPU seconds per answer (the server's whole process tree, user + system from /proc,
over the measured window / answers in it), and the tree's RSS at the end of the point (sum
over its processes; PSS in the JSON). The load generator runs in this process, on the same
cores (the machine has two), and its CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "peers"
SERVERS = ("ageray-proxy", "ageray-direct", "asgi", "asgi-batch", "litserve", "bentoml")
TOLERANCE = 1e-4
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
MAX_SERVE_S = 6 * 3600.0  # an ageray child exits by itself after this


# --------------------------------------------------------------------------- /proc


Stat = tuple[int, int, float, int, int]  # ppid, session, cpu s, rss bytes, start time


def _stat(pid: int) -> Stat | None:
    """(ppid, session, cpu seconds, rss bytes, start time) of ``pid``; None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return int(fields[1]), int(fields[3]), cpu, int(fields[21]) * PAGE, int(fields[19])


def all_stats() -> dict[int, Stat]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := _stat(int(entry))) is not None:
            out[int(entry)] = s
    return out


def tree(root: int, stats: dict[int, Stat] | None = None) -> dict[int, Stat]:
    """Every process of a server: ``root``, its session (daemons that re-parent keep it)
    and the descendants of all of those (workers started in a session of their own)."""
    stats = all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, s in stats.items():
        children.setdefault(s[0], []).append(pid)
    found: set[int] = set()
    todo = [root, *(pid for pid, s in stats.items() if s[1] == root)]
    for _ in range(len(stats) + len(todo)):  # each process is visited once
        if not todo:
            break
        pid = todo.pop()
        if pid in found or pid not in stats:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return {pid: stats[pid] for pid in found}


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    """One server under test: how it starts, where it answers, its process group."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    url: str = ""  # the predict URL; ageray's children write theirs to url_file
    url_file: Path | None = None
    log: Path | None = None
    proc: subprocess.Popen | None = None
    skipped: str | None = None
    seen: set[tuple[int, int]] = field(default_factory=set)  # (pid, start time) ever

    def start(self, cores: set[int], logdir: Path) -> None:
        self.log = logdir / f"{self.name}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group and session
                preexec_fn=lambda: _child_setup(cores),
            )

    def procs(self, stats: dict[int, Stat] | None = None) -> dict[int, Stat]:
        """The server's processes now; each is remembered with its start time."""
        if self.proc is None:
            return {}
        t = tree(self.proc.pid, stats)
        self.seen.update((pid, st[4]) for pid, st in t.items())
        return t

    def log_tail(self, n: int = 15) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join("    " + s for s in lines[-n:])

    def stop(self) -> None:
        """SIGTERM to the root (ageray's child shuts Serve and Ray down), then SIGKILL to
        whatever of its process group and tree is left, each by its id."""
        if self.proc is None:
            return
        self.procs()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            _wait_unreaped(self.proc.pid, STOP_TIMEOUT_S)
            # the root is not reaped yet (a zombie at most), so its id still names only its
            # own process group: no other process can have taken it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.seen.update((pid, st[4]) for pid, st in tree(self.proc.pid).items())
        now = all_stats()
        for pid, started in sorted(self.seen):  # still the same process: same start time
            if pid != os.getpid() and pid in now and now[pid][4] == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None


_PR_SET_PDEATHSIG = 1
_LIBC: Any = None


def _child_setup(cores: set[int]) -> None:
    """In a server's process before it execs: pinned to ``cores``, and SIGTERM when this
    benchmark dies, even by SIGKILL where no ``finally`` runs, so no server outlives a run."""
    os.sched_setaffinity(0, cores)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_libc() -> None:
    """libc for prctl, loaded before any fork (nothing is imported in a forked child)."""
    global _LIBC
    with contextlib.suppress(OSError):
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Until child ``pid`` exits (bounded), without reaping it (``WNOWAIT``): while it is a
    zombie its id cannot be reused, so ``killpg`` on it reaches its own group only."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.1)
    return False


def _raise_interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM / SIGHUP to the benchmark: unwind like Ctrl-C, so every server is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_settings() -> dict[str, Any]:
    """The replica's CPU settings from serve/config.yaml: cores (num_cpus) and threads."""
    import yaml

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    dep = doc["applications"][0]["deployments"][0]
    uc = dep.get("user_config", {})
    return {
        "num_cpus": float(dep.get("ray_actor_options", {}).get("num_cpus", 1)),
        "threads": int(uc.get("torch_threads") or 1),
        "max_batch_size": int(uc.get("max_batch_size", 32)),
        "batch_wait_timeout_s": float(uc.get("batch_wait_timeout_s", 0.002)),
        "backend": uc.get("backend", "auto"),
    }


def make_servers(
    args: argparse.Namespace, model_dir: Path, work: Path, settings: dict[str, Any]
) -> list[Server]:
    py = sys.executable
    onnx = model_dir / "export" / "onnx" / "model.onnx"
    threads = str(settings["threads"])
    mb = str(args.max_batch)
    base_env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    out: list[Server] = []
    for name in args.servers:
        port = _free_port()
        if name.startswith("ageray-"):
            ingress = name.split("-", 1)[1]
            url_file = work / f"{name}.url"
            env = {
                **base_env,
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if ingress == "direct" else "0",
            }
            cmd = [
                py, "-m", "benchmarks.serve_peers", "--ageray-child", ingress,
                "--model-dir", str(model_dir), "--port", str(port), "--url-file", str(url_file),
                "--max-batch", mb,
            ]  # fmt: skip
            out.append(Server(name, cmd, env, ROOT, url_file=url_file))
        elif name in ("asgi", "asgi-batch"):
            batch = mb if name == "asgi-batch" else "1"
            cmd = [
                py, str(PEERS / "asgi_onnx.py"), "--model-dir", str(model_dir),
                "--port", str(port), "--threads", threads, "--max-batch", batch,
                "--wait-ms", str(args.batch_wait * 1000),
            ]  # fmt: skip
            out.append(Server(name, cmd, base_env, ROOT, url=f"http://127.0.0.1:{port}/predict"))
        elif name == "litserve":
            lpy = Path(args.litserve_python)
            srv = Server(name, [], {}, PEERS, url=f"http://127.0.0.1:{port}/predict")
            if not lpy.is_file():
                srv.skipped = f"no LitServe venv ({lpy} missing; module docstring: how to make it)"
            else:
                srv.cmd = [
                    str(lpy), "litserve_onnx.py", "--onnx", str(onnx), "--port", str(port),
                    "--threads", threads, "--max-batch", mb,
                    "--batch-timeout", str(args.batch_wait),
                ]  # fmt: skip
                srv.env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
                           "HOME": os.environ.get("HOME", "/root")}  # fmt: skip
            out.append(srv)
        elif name == "bentoml":
            bento = Path(args.bentoml_bin)
            srv = Server(name, [], {}, PEERS, url=f"http://127.0.0.1:{port}/predict")
            if not bento.is_file():
                srv.skipped = f"no BentoML venv ({bento} missing; module docstring: how to make it)"
            else:
                srv.cmd = [
                    str(bento), "serve", "bentoml_onnx:Front", "--working-dir", str(PEERS),
                    "--host", "127.0.0.1", "--port", str(port),
                ]  # fmt: skip
                srv.env = {
                    "PATH": os.environ.get("PATH", ""),
                    "HOME": os.environ.get("HOME", "/root"),
                    "OMP_NUM_THREADS": "1",
                    "BENTOML_DO_NOT_TRACK": "True",
                    "BENTOML_HOME": str(work / "bentoml-home"),
                    "AGERAY_PEER_ONNX": str(onnx),
                    "AGERAY_PEER_THREADS": threads,
                    "AGERAY_PEER_MAX_BATCH": mb,
                }
            out.append(srv)
        else:
            raise ValueError(f"unknown server {name!r}; one of {SERVERS}")
    return out


def post(url: str, data: bytes, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read()[:300].decode(errors="replace")}


def wait_ready(srv: Server, image: bytes, timeout: float = START_TIMEOUT_S) -> None:
    """Until the server answers an image with 200 (bounded); raises with the reason."""
    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        if srv.proc is None or srv.proc.poll() is not None:
            code = None if srv.proc is None else srv.proc.returncode
            raise RuntimeError(f"exited with {code} before answering:\n{srv.log_tail()}")
        if not srv.url and srv.url_file is not None and srv.url_file.is_file():
            srv.url = srv.url_file.read_text().strip()
        if srv.url:
            try:
                status, doc = post(srv.url, image, timeout=10)
                if status == 200 and "age" in doc:
                    return
                last = f"HTTP {status}: {doc}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"not answering within {timeout:.0f}s ({last}):\n{srv.log_tail()}")


# --------------------------------------------------------------------------- ageray child


def ageray_child(args: argparse.Namespace) -> int:
    """serve/config.yaml's app in a local Ray of this process, until SIGTERM (bounded)."""
    import ray
    from ray import serve

    from benchmarks.serve_load import deploy, replica_url, wait_for

    def on_term(*_: Any) -> None:
        # unwind now, also mid-startup; the shutdown below runs once, not interrupted again
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    settings = replica_settings()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port}, proxy_location="HeadOnly"
        )
        uc = {"device": "cpu", "max_batch_size": args.max_batch}
        deploy(args.model_dir, uc, settings["num_cpus"])
        if args.ageray_child == "direct":
            base = replica_url()
        else:
            base = f"http://127.0.0.1:{args.port}"
        wait_for(base, {"max_batch_size": args.max_batch})
        args.url_file.write_text(base + "/v1/predict?faces=largest")
        t_end = time.time() + MAX_SERVE_S
        while time.time() < t_end:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return 0


# --------------------------------------------------------------------------- bare forward


def bare_child(args: argparse.Namespace) -> int:
    """The exported graph's forward alone, this process pinned like the servers: OnnxBackend
    with the replica's threads, on prepared UTKFace faces, at each batch size."""
    import torch

    from ageray.inference import load_predictor
    from benchmarks.serve_load import load_images, pct

    settings = replica_settings()
    predictor = load_predictor(
        str(args.model_dir), backend="onnxruntime", threads=settings["threads"]
    )
    images, _ = load_images(64)
    tensors = [predictor.prepare(d).tensor for d in images]
    out: dict[str, Any] = {}
    for b in args.bare_batches:
        x = torch.stack([tensors[i % len(tensors)] for i in range(b)]).numpy()
        for _ in range(3):
            predictor.forward(x)
        lat: list[float] = []
        c0 = time.process_time()
        t_end = time.perf_counter() + args.seconds
        while (time.perf_counter() < t_end or len(lat) < 5) and len(lat) < 1_000_000:
            t0 = time.perf_counter()
            predictor.forward(x)
            lat.append((time.perf_counter() - t0) * 1000)
        cpu = time.process_time() - c0
        out[str(b)] = {
            "throughput": b * len(lat) / (sum(lat) / 1000),
            "p50": pct(lat, 50),
            "p95": pct(lat, 95),
            "p99": pct(lat, 99),
            "cpu_per_req": cpu / (b * len(lat)),
            "n": len(lat),
        }
    args.out.write_text(json.dumps(out))
    return 0


def run_bare(args: argparse.Namespace, model_dir: Path, work: Path, cores: set[int]) -> dict:
    out = work / "bare.json"
    cmd = [
        sys.executable, "-m", "benchmarks.serve_peers", "--bare-child",
        "--model-dir", str(model_dir), "--out", str(out), "--seconds", str(args.seconds / 2),
        "--bare-batches", *map(str, args.bare_batches),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}"}
    subprocess.run(
        cmd,
        env=env,
        cwd=ROOT,
        check=True,
        timeout=600,
        preexec_fn=lambda: _child_setup(cores),
    )
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- load


async def closed_loop(
    url: str,
    images: list[bytes],
    concurrency: int,
    seconds: float,
    warmup: float,
    target: Server,
    others: list[Server],
) -> dict[str, Any]:
    """N clients, each sends its next request when the previous one answers; the server's
    process-tree CPU sampled at the start and end of the measured window."""
    import aiohttp

    from benchmarks.serve_load import pct

    lat: list[float] = []
    statuses: dict[int, int] = {}
    t_measure = time.perf_counter() + warmup
    t_stop = t_measure + seconds
    samples: dict[str, Any] = {}

    def cpu_of(servers: list[Server], stats: dict[int, Stat]) -> dict[int, float]:
        return {pid: s[2] for srv in servers for pid, s in srv.procs(stats).items()}

    def sample() -> tuple[float, dict[int, float], dict[int, float]]:
        stats = all_stats()
        return time.perf_counter(), cpu_of([target], stats), cpu_of(others, stats)

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        samples["t0"], samples["c0"], samples["o0"] = sample()
        await asyncio.sleep(max(0.0, t_stop - time.perf_counter()))
        samples["t1"], samples["c1"], samples["o1"] = sample()
        procs = target.procs()
        samples["rss"] = sum(s[3] for s in procs.values())
        samples["pss"] = pss_bytes(list(procs))
        samples["nproc"] = len(procs)

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        i = k * 7919
        for _ in range(10_000_000):
            data = images[i % len(images)]
            i += 1
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            try:
                async with session.post(
                    url, data=data, headers={"Content-Type": "image/jpeg"}
                ) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                status = 599
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_stop:
                lat.append((t1 - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        task = asyncio.create_task(sampler())
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
        await task
    ok = statuses.get(200, 0)
    window = samples["t1"] - samples["t0"]

    def delta(a: dict[int, float], b: dict[int, float]) -> float:
        return sum(v - a.get(pid, 0.0) for pid, v in b.items())

    cpu = delta(samples["c0"], samples["c1"])
    return {
        "throughput": ok / seconds,
        "p50": pct(lat, 50),
        "p95": pct(lat, 95),
        "p99": pct(lat, 99),
        "n": len(lat),
        "statuses": statuses,
        "cpu_s": cpu,
        "cpu_per_req": cpu / ok if ok else float("nan"),
        "server_cores": cpu / window if window > 0 else float("nan"),
        "others_cpu": delta(samples["o0"], samples["o1"]) / window if window > 0 else 0.0,
        "rss_mib": samples["rss"] / 2**20,
        "pss_mib": samples["pss"] / 2**20,
        "processes": samples["nproc"],
    }


# --------------------------------------------------------------------------- report


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]


def markdown(conc: list[int], names: list[str], cells: dict[str, dict[int, dict[str, Any]]]) -> str:
    lines = [
        "| clients | server | answers/s | p50 ms | p95 ms | p99 ms | CPU ms / answer "
        "| server cores busy | RSS MiB | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in conc:
        for name in names:
            r = cells[name].get(c)
            if r is None:
                continue
            errors = sum(v for k, v in r["statuses"].items() if int(k) != 200)
            lines.append(
                f"| {c} | {name} | {r['throughput']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
                f"{r['p99']:.1f} | {r['cpu_per_req'] * 1000:.1f} | {r['server_cores']:.2f} | "
                f"{r['rss_mib']:.0f} | {errors} |"
            )
    return "\n".join(lines)


def bare_markdown(bare: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| batch | images/s | p50 ms / batch | p95 ms | p99 ms | CPU ms / image |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b, r in bare.items():
        lines.append(
            f"| {b} | {r['throughput']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | "
            f"{r['p99']:.1f} | {r['cpu_per_req'] * 1000:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def check_answers(servers: list[Server], images: list[bytes], ref: list[float]) -> None:
    """Every server's ages on the check faces within TOLERANCE of ageray's own path."""
    for srv in servers:
        if srv.skipped:
            continue
        ages = []
        for data in images:
            status, doc = post(srv.url, data)
            if status != 200 or "age" not in doc:
                srv.skipped = f"check: HTTP {status} {doc}"
                break
            ages.append(float(doc["age"]))
        if srv.skipped:
            continue
        diff = max(abs(a - b) for a, b in zip(ages, ref))
        print(f"  {srv.name:>14}: max |age - ageray predict| = {diff:.2e} over {len(ref)} faces")
        if diff > TOLERANCE:
            srv.skipped = f"answers differ from ageray's by {diff:.2e} > {TOLERANCE:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time per point")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per point")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--check", type=int, default=8, help="faces whose answers are compared")
    ap.add_argument("--max-batch", type=int, default=32, help="every batching server's cap")
    ap.add_argument("--batch-wait", type=float, default=0.002, help="peers' batch window, s")
    ap.add_argument("--bare-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--no-bare", action="store_true", help="skip the bare forward")
    ap.add_argument("--cores", default=None, help="e.g. 0,1 (default: the first two)")
    ap.add_argument("--litserve-python", default="/work/peers-venv/litserve/bin/python")
    ap.add_argument("--bentoml-bin", default="/work/peers-venv/bentoml/bin/bentoml")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--ageray-child", choices=["proxy", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--url-file", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "platform")]
    if args.ageray_child:
        return ageray_child(args)
    if args.bare_child:
        return bare_child(args)

    from ageray.inference import fetch_model_files, load_predictor, with_export
    from benchmarks.serve_load import load_images, make_model

    avail = sorted(os.sched_getaffinity(0))
    cores = {int(c) for c in args.cores.split(",")} if args.cores else set(avail[:2])
    settings = replica_settings()
    images, source = load_images(args.images)
    print(f"faces: {source}; cores {sorted(cores)}; replica settings {settings}", flush=True)
    _load_libc()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    work = Path(tempfile.mkdtemp(prefix="ageray-peers-"))
    servers: list[Server] = []
    results: dict[str, Any] = {"bare": [], "points": {}}
    try:
        model_dir = make_model(work / "model")
        # exported once beside the weights (jobs.export's checks), found by every loader
        for rel, data in with_export(fetch_model_files(model_dir)).files.items():
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / rel).write_bytes(data)
        ref_pred = load_predictor(str(model_dir), backend="onnxruntime", threads=1)
        check_imgs = images[: args.check]
        ref = [float(r["age"]) for r in ref_pred.predict(check_imgs, faces="largest")]
        del ref_pred
        servers = make_servers(args, model_dir, work, settings)
        for srv in servers:  # one at a time: starting Ray and the frameworks is CPU-heavy
            if srv.skipped:
                continue
            t0 = time.time()
            srv.start(cores, work)
            try:
                wait_ready(srv, images[0])
                print(f"  started {srv.name} in {time.time() - t0:.0f}s: {srv.url}", flush=True)
            except RuntimeError as exc:
                srv.skipped = f"did not start: {exc}"
                srv.stop()
        check_answers(servers, check_imgs, ref)
        live = [s for s in servers if not s.skipped]
        for s in servers:
            if s.skipped:
                print(f"  SKIPPED {s.name}: {s.skipped}", flush=True)
                s.stop()
        points: dict[str, dict[int, list[dict[str, Any]]]] = {
            s.name: {c: [] for c in args.concurrency} for s in live
        }
        for rep in range(args.repeats):
            if not args.no_bare:
                bare = run_bare(args, model_dir, work, cores)
                results["bare"].append(bare)
                speeds = ", ".join(f"b={b} {r['throughput']:.1f} img/s" for b, r in bare.items())
                print(f"  [{rep}] bare forward: {speeds}", flush=True)
            for ci, c in enumerate(args.concurrency):
                k = (rep + ci) % max(1, len(live))
                for srv in live[k:] + live[:k]:
                    others = [s for s in live if s is not srv]
                    r = asyncio.run(
                        closed_loop(srv.url, images, c, args.seconds, args.warmup, srv, others)
                    )
                    points[srv.name][c].append(r)
                    print(
                        f"  [{rep}] {srv.name:>14} c={c:>3}: {r['throughput']:7.1f} req/s  "
                        f"p50 {r['p50']:.1f} p95 {r['p95']:.1f} p99 {r['p99']:.1f} ms  "
                        f"cpu {r['cpu_per_req'] * 1000:.1f} ms/req ({r['server_cores']:.2f} "
                        f"cores; others {r['others_cpu']:.2f})  rss {r['rss_mib']:.0f} MiB  "
                        f"{r['statuses']}",
                        flush=True,
                    )
        results["points"] = points
    finally:
        # stopping is bounded (STOP_TIMEOUT_S each, then SIGKILL): a second Ctrl-C or
        # SIGTERM must not cut it short and leave servers behind
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for srv in servers:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    names = [s.name for s in servers if not s.skipped]
    cells = {n: {c: median_run(v) for c, v in results["points"][n].items() if v} for n in names}
    table = markdown(args.concurrency, names, cells)
    print(f"\nservers (median of {args.repeats} repeat(s), {args.seconds:g} s per point)")
    print(table)
    bare_cells: dict[str, Any] = {}
    if results["bare"]:
        for b in map(str, args.bare_batches):
            runs = [r[b] for r in results["bare"]]
            bare_cells[b] = median_run(runs)
        print("\nbare ONNX Runtime forward (own process, replica threads)")
        print(bare_markdown(bare_cells))
    skipped = {s.name: s.skipped for s in servers if s.skipped}
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": "python -m benchmarks.serve_peers " + " ".join(argv or sys.argv[1:]),
                    "faces": source,
                    "cores": sorted(cores),
                    "replica": settings,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(),
                    },
                    "runs": results,
                    "cells": cells,
                    "bare": bare_cells,
                    "skipped": skipped,
                    "tables": {"servers": table, "bare": bare_markdown(bare_cells)},
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
