"""Soak of the Serve endpoint: does the replica's or the proxy's memory only grow?

    python -m benchmarks.serve_soak                         # 20,000 requests, 8 clients
    python -m benchmarks.serve_soak --requests 300 --every 100 --clients 4   # a quick check

What it does: deploys serve/config.yaml's application (as ``serve run serve/config.yaml``
would: its deployment options and ``runtime_env``, the model a temporary GLAE resnet18 with
random weights) on a local Ray with Serve's default proxy, then sends ``--requests``
requests from ``--clients`` closed-loop clients (each sends its next request when the
previous one is answered, so the load is bounded), cycling through a fixed mix:

* valid: one JPEG (64, 200 and 640 px, and a 2000 x 1500 photo), one PNG, a multipart
  upload of three images, a JSON body with two base64 images;
* hostile: corrupt bytes behind a JPEG signature, a truncated JPEG, a PNG whose header
  claims 40000 x 40000 pixels, a wrong content type, an empty body, and a body over the
  per-image cap (rarer: 11 MB each).

Every ``--every`` answered requests it records the resident memory (RSS, from
``/proc/<pid>/status``) of the replica and of the proxy, found in this process's own
process tree (Ray's workers are its descendants, so another Ray on the machine is never
measured). It prints a markdown table, the status counts (no 5xx other than 503 is
allowed) and the growth of each process between the end of warm-up (``--warmup``
requests, default 10%) and the end: the target is <= 10%.

Run it on an idle machine for figures. The replica's allocator settings (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_``) come from serve/config.yaml; ``--malloc off`` drops them, to
compare.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import os
import platform
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
APP = "ageray-soak"
TARGET_GROWTH = 10.0  # percent, after warm-up


# ------------------------------------------------------------------ the request mix


def _encode(size: int, fmt: str, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, 3)
    arr = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _photo(width: int, height: int) -> bytes:
    """A smooth camera-sized JPEG (a photo, not a face chip: decoded whole, ~9 MB RGB)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG signature + IHDR saying ``width x height``, then a tiny IDAT: the size check
    must refuse it from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\0" * 64)
    body = b"IDAT" + idat
    tail = struct.pack(">I", len(idat)) + body + struct.pack(">I", zlib.crc32(body))
    return b"\x89PNG\r\n\x1a\n" + head + tail


def request_mix() -> list[tuple[str, dict[str, Any]]]:
    """(name, aiohttp request kwargs) in the order the clients cycle through them."""
    jpg64, jpg200, jpg640 = (_encode(s, "JPEG", s) for s in (64, 200, 640))
    png200 = _encode(200, "PNG", 7)
    photo = _photo(2000, 1500)
    jpeg, js = {"Content-Type": "image/jpeg"}, {"Content-Type": "application/json"}

    def multipart() -> Any:
        import aiohttp

        form = aiohttp.FormData()
        for i, data in enumerate((jpg64, jpg200, png200)):
            form.add_field("file", data, filename=f"f{i}.jpg", content_type="image/jpeg")
        return form

    b64 = [base64.b64encode(d).decode() for d in (jpg64, jpg200)]
    valid: list[tuple[str, dict[str, Any]]] = [
        ("jpeg 64", {"data": jpg64, "headers": jpeg}),
        ("jpeg 200", {"data": jpg200, "headers": jpeg}),
        ("jpeg 640", {"data": jpg640, "headers": jpeg}),
        ("jpeg 2000x1500", {"data": photo, "headers": jpeg}),
        ("png 200", {"data": png200, "headers": {"Content-Type": "image/png"}}),
        ("multipart x3", {"data": multipart}),
        ("json x2", {"data": json.dumps({"images": b64}), "headers": js}),
    ]  # fmt: skip
    hostile: list[tuple[str, dict[str, Any]]] = [
        ("corrupt", {"data": b"\xff\xd8\xff\xe0" + os.urandom(4000), "headers": jpeg}),
        ("truncated", {"data": jpg200[: len(jpg200) // 2], "headers": jpeg}),
        ("huge header", {"data": _png_header_claiming(40000, 40000), "headers": jpeg}),
        ("wrong type", {"data": jpg64, "headers": {"Content-Type": "text/plain"}}),
        ("empty", {"data": b"", "headers": jpeg}),
    ]
    mix = [*valid, *valid, *hostile]  # two valid rounds per hostile round
    oversized = (
        "oversized 11 MB",
        {"data": b"\xff\xd8" + b"\0" * (11 * 1024 * 1024), "headers": jpeg},
    )
    return [*mix * 3, oversized]  # fmt: skip


# ------------------------------------------------------------------ processes and memory


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry)] = (ppid, cmd)
    return out


def find_pids() -> dict[str, int]:
    """The replica's and the proxy's pids among this process's descendants."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo, mine = [os.getpid()], []
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            mine.append(child)
            todo.append(child)
    found: dict[str, int] = {}
    for pid in mine:
        cmd = table[pid][1]
        if f"ServeReplica:{APP}" in cmd:
            found["replica"] = pid
        elif "ProxyActor" in cmd:
            found["proxy"] = pid
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ deploy and load


def deploy(model_dir: Path, malloc: str) -> None:
    """serve/config.yaml's application with this model (its deployment options and
    runtime_env kept; one replica; the benchmark's own name and route). ``malloc="off"``
    drops the file's ``MALLOC_*`` settings for the replica, to compare."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = copy.deepcopy(doc["applications"][0])
    app.update(name=APP, route_prefix="/")
    app["args"] = {"model_uri": str(model_dir)}
    dep = app["deployments"][0]
    dep.pop("autoscaling_config", None)
    dep["num_replicas"] = 1
    dep["user_config"] = {**dep.get("user_config", {}), "device": "cpu"}
    if malloc == "off":
        for env in (app.get("runtime_env"), dep.get("ray_actor_options", {}).get("runtime_env")):
            for key in [k for k in (env or {}).get("env_vars", {}) if k.startswith("MALLOC_")]:
                del env["env_vars"][key]
    schema = ServeDeploySchema.model_validate({"applications": [app], "proxy_location": "HeadOnly"})
    _get_global_client().deploy_apps(schema)  # not Serve's 60 s wait: ONNX export + warm-up


def wait_ready(base: str, timeout: float = 900.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the application did not become ready within {timeout:.0f}s")


async def soak(
    base: str, mix: list[tuple[str, dict[str, Any]]], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, dict[int, int]]]:
    """``args.requests`` requests from ``args.clients`` closed-loop clients; a memory
    sample every ``args.every`` answers (and one before the first request)."""
    import aiohttp

    statuses: dict[str, dict[int, int]] = {}
    samples: list[dict[str, Any]] = []
    pids = find_pids()
    state = {"sent": 0, "done": 0}
    t0 = time.perf_counter()

    def sample() -> None:
        row = {"requests": state["done"], "seconds": time.perf_counter() - t0}
        row.update({name: rss_mb(pid) for name, pid in pids.items()})
        samples.append(row)
        print(
            f"  {row['requests']:>6} requests  replica {row.get('replica', 0):7.1f} MB  "
            f"proxy {row.get('proxy', 0):7.1f} MB  {row['seconds']:6.0f}s",
            flush=True,
        )

    async def client(session: aiohttp.ClientSession) -> None:
        while state["sent"] < args.requests:
            name, kwargs = mix[state["sent"] % len(mix)]
            state["sent"] += 1
            kw = dict(kwargs)
            if callable(kw.get("data")):
                kw["data"] = kw["data"]()
            try:
                async with session.post(base + "/v1/predict", **kw) as resp:
                    await resp.read()
                    status = resp.status
            except aiohttp.ClientError:
                status = 0  # no HTTP answer at all: counted, and it fails the run
            per = statuses.setdefault(name, {})
            per[status] = per.get(status, 0) + 1
            state["done"] += 1
            if state["done"] % args.every == 0:
                sample()

    sample()
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(args.clients)))
    return samples, statuses


def growth(samples: list[dict[str, Any]], key: str, warmup: int) -> float:
    after = [s for s in samples if s["requests"] >= warmup and key in s]
    if len(after) < 2:
        return float("nan")
    return (after[-1][key] - after[0][key]) / after[0][key] * 100


def report(samples: list[dict[str, Any]], statuses: dict[str, dict[int, int]], warmup: int) -> str:
    lines = [
        "| requests | replica RSS (MB) | proxy RSS (MB) | seconds |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for s in samples:
        lines.append(
            f"| {s['requests']} | {s.get('replica', float('nan')):.1f} | "
            f"{s.get('proxy', float('nan')):.1f} | {s['seconds']:.0f} |"
        )
    lines.append("")
    for key in ("replica", "proxy"):
        g = growth(samples, key, warmup)
        verdict = "ok" if g <= TARGET_GROWTH else f"OVER the {TARGET_GROWTH:.0f}% target"
        lines.append(f"- {key} RSS growth after warm-up ({warmup} requests): {g:+.1f}% ({verdict})")
    lines.append("")
    lines.append("| request | statuses |")
    lines.append("| --- | --- |")
    for name, per in statuses.items():
        lines.append(f"| {name} | {', '.join(f'{k}: {v}' for k, v in sorted(per.items()))} |")
    return "\n".join(lines)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    p.add_argument("--every", type=int, default=1000, help="requests between memory samples")
    p.add_argument("--warmup", type=int, help="requests before growth counts (default 10%%)")
    p.add_argument("--image-size", type=int, default=112, help="model input size (default 112)")
    p.add_argument(
        "--malloc",
        choices=("config", "off"),
        default="config",
        help="the replica's MALLOC_* settings: serve/config.yaml's, or none (to compare)",
    )
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(args.every, args.requests // 10)
    sys.path.insert(0, str(ROOT))

    import ray
    from ray import serve

    from benchmarks.serve_load import make_model
    from tests.services import free_port

    tmp = Path(tempfile.mkdtemp(prefix="ageray-soak-"))
    model_dir = make_model(tmp / "model", args.image_size)
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    try:
        deploy(model_dir, args.malloc)
        wait_ready(f"http://127.0.0.1:{port}")
        print(f"deployed (malloc: {args.malloc}); pids {find_pids()}; {args.requests} requests, "
              f"{args.clients} clients",
              flush=True)  # fmt: skip
        samples, statuses = asyncio.run(soak(f"http://127.0.0.1:{port}", request_mix(), args))
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
    )
    print(report(samples, statuses, warmup))
    bad = {n: s for n, per in statuses.items() for s in per if s == 0 or (s >= 500 and s != 503)}
    if bad:
        print(f"FAILED: answers without a status or with a 5xx other than 503: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
