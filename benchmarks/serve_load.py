"""Closed-loop load test of the Serve endpoint against the bare model forward, in one run.

    python -m benchmarks.serve_load                    # 1, 8, 32, 64 clients, both ingresses
    python -m benchmarks.serve_load --seconds 5 --repeats 1 --concurrency 1 8 --ingress direct

What it measures, side by side:

* **floor**: ``ServedModel.forward`` (the one path's forward: image + flip in one
  pass, both heads, Adaptive Routing) in this process on already-preprocessed images, at
  batch size = concurrency, same torch thread count as the replica. No HTTP, no decode.
* **endpoint, batching off** (``max_batch_size: 1``) and **on** (``max_batch_size: 32``,
  adaptive batch window), deployed from serve/config.yaml exactly as
  ``serve run serve/config.yaml`` would (switching between them is an in-place user_config
  reconfigure of the same replica), behind two ingress paths:

  - ``proxy``: Serve's default HTTP proxy actor (client -> proxy -> replica; the replica
    pulls the body back from the proxy with one more RPC);
  - ``direct``: Serve's high-throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: direct
    ingress, the replica serves HTTP itself on a port the controller assigns; in a cluster
    ``RAY_SERVE_ENABLE_HA_PROXY=1`` puts HAProxy on :8000 in front of those ports). The
    client here connects to the replica port, which is what HAProxy forwards to.

Load: N concurrent aiohttp clients, each sending the next request as soon as the previous
one answers (closed loop), raw ``image/jpeg`` bodies of real UTKFace faces from
``../shared/data/utkface-dev.tar`` read into memory (never copied into the repository), or
synthetic faces when the tar is absent. Throughput = answers / measured seconds (after a
warm-up); latency = client-side wall time per request.

Method, for a machine shared with other work: for every concurrency the floor, batching
off and batching on run back to back (so a row sees one machine load), the whole sweep is
repeated ``--repeats`` times, and each cell reports the repeat with the median throughput.
Each ingress path runs in a fresh child process with its own local Ray (Serve reads its mode
from the environment when its processes start).

The model is GLAE's resnet18 with two heads at 112 px, random weights (speed does not depend
on the weights), saved with ``save_model`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGERAY_SHARED", ROOT.parent / "shared"))
UTKFACE_TAR = SHARED / "data" / "utkface-dev.tar"
APP = "ageray-bench"


def load_images(n: int) -> tuple[list[bytes], str]:
    """``n`` encoded face images in memory: UTKFace when present, else synthetic."""
    if UTKFACE_TAR.is_file():
        out: list[bytes] = []
        with tarfile.open(UTKFACE_TAR) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    f = tar.extractfile(member)
                    if f is not None:
                        out.append(f.read())
                if len(out) >= n:
                    break
        return out, f"UTKFace ({UTKFACE_TAR.name}, first {len(out)} faces, 200x200 JPEG)"
    from ageray.data.synthetic import iter_synthetic

    faces = [r.image for r in iter_synthetic(num_samples=n, image_size=200)]
    return faces, f"synthetic faces (ageray.data.synthetic, {n}, 200x200 JPEG)"


def make_model(folder: Path, image_size: int = 112) -> Path:
    """GLAE resnet18 (FR r=16), vanilla + balanced head, random weights."""
    import torch

    from ageray.config import Config, ModelConfig
    from ageray.model import build_model, save_model

    cfg = Config()
    cfg.data.image_size = image_size
    cfg.model = ModelConfig(backbone="resnet18", head="glae")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.add_balanced_head(freeze=False)
    with torch.no_grad():
        for p in model.heads["balanced"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(model, folder, cfg, meta={"benchmark": True})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def floor_point(served: Any, tensors: list[Any], b: int, seconds: float) -> dict[str, float]:
    """The floor at batch ``b``: forward only (image + flip, both heads, AR), this process."""
    import torch

    x = torch.stack([tensors[i % len(tensors)] for i in range(b)])
    for _ in range(2):
        served.forward(x)
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(lat) < 5:
        t0 = time.perf_counter()
        served.forward(x)
        lat.append((time.perf_counter() - t0) * 1000)
    return {
        "throughput": b * len(lat) / (sum(lat) / 1000),
        "p50": pct(lat, 50),
        "p95": pct(lat, 95),
        "p99": pct(lat, 99),
        "n": len(lat),
    }


async def closed_loop(
    url: str, images: list[bytes], concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """N clients, each sends its next request when the previous one answers."""
    import aiohttp

    lat: list[float] = []
    statuses: dict[int, int] = {}
    batch_sizes: list[int] = []
    server: dict[str, list[float]] = {
        k: [] for k in ("read", "decode", "queue", "forward", "total")
    }
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_stop = t_measure + seconds
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        i = k * 7919
        while True:
            data = images[i % len(images)]
            i += 1
            t0 = time.perf_counter()
            if t0 >= t_stop:
                return
            async with session.post(url, data=data, headers={"Content-Type": "image/jpeg"}) as resp:
                body = await resp.read()
                t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_stop:
                lat.append((t1 - t0) * 1000)
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.status == 200:
                    doc = json.loads(body)
                    batch_sizes.append(doc.get("batch_size", 1))
                    for key, v in doc.get("timing_ms", {}).items():
                        server[key].append(v)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    ok = statuses.get(200, 0)
    return {
        "throughput": ok / seconds,
        "p50": pct(lat, 50),
        "p95": pct(lat, 95),
        "p99": pct(lat, 99),
        "n": len(lat),
        "statuses": statuses,
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
        "server_ms": {k: statistics.median(v) if v else None for k, v in server.items()},
    }


def deploy(model_dir: Path, user_config: dict[str, Any], num_cpus: float) -> None:
    """serve/config.yaml's application with this model, as `serve run` deploys it."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = copy.deepcopy(doc["applications"][0])
    app.update(name=APP, route_prefix="/")
    app["args"] = {"model_uri": str(model_dir)}
    app["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": "1"}}
    dep = app["deployments"][0]
    dep.pop("autoscaling_config", None)
    dep.update(num_replicas=1, ray_actor_options={"num_cpus": num_cpus})
    dep["user_config"] = {**dep.get("user_config", {}), **user_config}
    schema = ServeDeploySchema.model_validate({"applications": [app], "proxy_location": "HeadOnly"})
    _get_global_client().deploy_apps(schema, _blocking=True)


def replica_url(timeout: float = 60.0) -> str:
    """Direct ingress: the HTTP address the controller assigned to the app's replica."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.time() + timeout
    while time.time() < deadline:
        for group in ray.get(controller.get_target_groups.remote(APP)):
            if str(getattr(group, "protocol", "")).upper().endswith("HTTP") and group.targets:
                # single-node benchmark: the replica listens on all interfaces
                return f"http://127.0.0.1:{group.targets[0].port}"
        time.sleep(0.5)
    raise TimeoutError("no direct-ingress HTTP target for the benchmark app")


def wait_for(url: str, want: dict[str, Any], timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/model", timeout=5) as r:
                serving = json.loads(r.read())["serving"]
            if all(serving.get(k) == v for k, v in want.items()):
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the endpoint did not pick up {want} within {timeout}s")


def markdown(
    conc: list[int],
    floor: dict[int, dict[str, float]],
    off: dict[int, dict[str, Any]],
    on: dict[int, dict[str, Any]],
) -> str:
    lines = [
        "| clients | floor: bare forward (batch = clients) | endpoint, batching off "
        "| endpoint, batching on | on / off | mean batch (on) |",
        "| ---: | --- | --- | --- | ---: | ---: |",
    ]

    def cell(r: dict[str, Any], unit: str) -> str:
        return (
            f"{r['throughput']:.1f} {unit}; p50 {r['p50']:.1f} / p95 {r['p95']:.1f} / "
            f"p99 {r['p99']:.1f} ms"
        )

    for c in conc:
        ratio = on[c]["throughput"] / off[c]["throughput"] if off[c]["throughput"] else 0
        lines.append(
            f"| {c} | {cell(floor[c], 'img/s')} | {cell(off[c], 'req/s')} | "
            f"{cell(on[c], 'req/s')} | {ratio:.2f}x | {on[c]['mean_batch']:.1f} |"
        )
    return "\n".join(lines)


def run_endpoint(args: argparse.Namespace, model_dir: Path, images: list[bytes]) -> dict:
    """One ingress path, one local Ray. For every concurrency, back to back: the floor at
    that batch size, the endpoint with batching off, then on (in-place reconfigures of the
    same replica), so the three numbers of a row see the same machine load; ``repeats``
    times over."""
    import ray
    import torch
    from ray import serve

    from ageray.serving import Limits, load_served_model
    from tests.services import free_port

    torch.set_num_threads(args.threads)
    served = load_served_model(str(model_dir), "cpu", channels_last=True)  # as served
    tensors = [served.model_input(d, "bench", Limits()).tensor for d in images[:64]]
    common = {
        "device": "cpu",
        "torch_threads": args.threads,
        "batch_wait_timeout_s": args.batch_wait,
        "warmup_batch_sizes": [1, args.max_batch],
    }
    ingress = args.ingress[0]
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    runs: dict[str, Any] = {k: {c: [] for c in args.concurrency} for k in ("floor", "off", "on")}
    try:
        for rep in range(args.repeats):
            for c in args.concurrency:
                f = floor_point(served, tensors, c, args.seconds / 3)
                runs["floor"][c].append(f)
                print(
                    f"  [{rep}] {ingress:>6} floor b={c:>3}: {f['throughput']:7.1f} img/s  "
                    f"p50 {f['p50']:.1f} ms",
                    flush=True,
                )
                for mode, mbs in (("off", 1), ("on", args.max_batch)):
                    deploy(model_dir, {**common, "max_batch_size": mbs}, args.num_cpus)
                    base = replica_url() if ingress == "direct" else f"http://127.0.0.1:{port}"
                    wait_for(base, {"max_batch_size": mbs})
                    r = asyncio.run(
                        closed_loop(base + "/v1/predict", images, c, args.seconds, args.warmup)
                    )
                    runs[mode][c].append(r)
                    print(
                        f"  [{rep}] {ingress:>6} batching {mode:>3} c={c:>3}: "
                        f"{r['throughput']:7.1f} req/s  p50 {r['p50']:.1f} p95 {r['p95']:.1f} "
                        f"p99 {r['p99']:.1f} ms  batch {r['mean_batch']:.1f}  server "
                        f"{r['server_ms']}  {r['statuses']}",
                        flush=True,
                    )
    finally:
        serve.shutdown()
        ray.shutdown()
    return runs


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput (its latencies come with it)."""
    return sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time per point")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per point")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--num-cpus", type=float, default=1.0, help="replica num_cpus")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (replica + floor)")
    ap.add_argument("--batch-wait", type=float, default=0.002)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument(
        "--ingress", nargs="+", choices=["proxy", "direct"], default=["proxy", "direct"]
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    images, source = load_images(args.images)
    if args.model_dir is not None:  # child: one ingress path, env set by the parent
        result = run_endpoint(args, args.model_dir, images)
        if args.out:
            args.out.write_text(json.dumps(result, default=str))
        return 0

    print(f"images: {source}")
    tmp = Path(tempfile.mkdtemp(prefix="ageray-bench-"))
    results: dict[str, Any] = {}
    try:
        model_dir = make_model(tmp / "model")
        for ingress in args.ingress:
            # Serve reads its mode from the environment when its processes (and this
            # driver's ray.serve) start: each ingress path runs in a fresh process + Ray.
            env = {
                **os.environ,
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if ingress == "direct" else "0",
            }
            out = tmp / f"{ingress}.json"
            child = [
                sys.executable, "-m", "benchmarks.serve_load",
                "--ingress", ingress, "--model-dir", str(model_dir), "--out", str(out),
                "--concurrency", *map(str, args.concurrency),
                "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                "--images", str(args.images), "--num-cpus", str(args.num_cpus),
                "--threads", str(args.threads), "--batch-wait", str(args.batch_wait),
                "--max-batch", str(args.max_batch), "--repeats", str(args.repeats),
            ]  # fmt: skip
            subprocess.run(child, env=env, cwd=ROOT, check=True)
            raw = json.loads(out.read_text())
            results[ingress] = {k: {int(c): v for c, v in d.items()} for k, d in raw.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tables = {
        ingress: markdown(
            args.concurrency,
            *({c: median_run(res[k][c]) for c in args.concurrency} for k in ("floor", "off", "on")),
        )
        for ingress, res in results.items()
    }
    for ingress, table in tables.items():
        print(f"\n{ingress} ingress\n{table}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "command": "python -m benchmarks.serve_load " + " ".join(argv or sys.argv[1:]),
                    "images": source,
                    "machine": {
                        "cpus": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(),
                    },
                    "runs": results,
                    "tables": tables,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
