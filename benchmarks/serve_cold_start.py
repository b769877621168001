"""Cold start of the endpoint: from ``python -m serve.run`` to the first answered request,
split where it can be acted on, and the replica's memory once warm.

    python -m benchmarks.serve_cold_start                  # 3 starts of each model kind
    python -m benchmarks.serve_cold_start --runs 1 --kinds exported

Each run starts a fresh process, ``python -m serve.run serve.app:app model_uri=<folder>
backend=auto --address local --num-cpus 2`` (a private local Ray, as a user's first
``serve run``), and times from the moment the process is spawned:

* **Ray up**: its "Started a local Ray instance" line;
* **ready**: the first ``/readyz`` 200 (polled every 50 ms);
* **first answer**: the first ``POST /v1/predict`` of a real UTKFace face answered 200,
  sent as soon as ready.

Between Ray up and ready the replica starts, loads and warms up; ``GET /v1/model``'s
``load_ms`` splits its load into the loader's phases (``fetch`` the files, ``device``:
torch's import and the CUDA probe, ``export`` to ONNX when the weights came without an
export, the ONNX Runtime ``session``, the face ``aligner``) and the ``warmup``; what is
left is Serve's own start (controller, proxy, replica actor and its imports). Two model
kinds: ``exported`` (the folder holds the ONNX export of its weights, as a model logged by
``jobs.train``/``jobs.export`` does) and ``bare`` (weights only: the replica exports at
load). The replica's RSS is read from ``/proc`` once ready. The model is GLAE's ResNet-18
with two heads at 112 px, random weights. Run it on an idle machine; each start is stopped
by its process group (SIGTERM: the drain).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("exported", "bare")


def _models(tmp: Path, image_size: int) -> dict[str, Path]:
    """A bare model folder and a copy with its ONNX export inside (``export/onnx``)."""
    import shutil

    from ageray.inference.export import export_model
    from benchmarks.serve_load import make_model

    bare = make_model(tmp / "bare", image_size)
    exported = tmp / "exported"
    shutil.copytree(bare, exported)
    export_model(exported, exported / "export" / "onnx", fmt="onnx")
    return {"bare": bare, "exported": exported}


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _post(url: str, body: bytes, timeout: float = 30.0) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _replica_rss_mb(root_pid: int) -> float | None:
    """RSS of the ServeReplica process among ``root_pid``'s descendants."""
    from benchmarks.serve_soak import _proc_table, rss_mb

    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cmd) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if "ServeReplica" in table[child][1]:
                return rss_mb(child)
            todo.append(child)
    return None


def one_start(model: Path, body: bytes, timeout: float, backend: str) -> dict[str, Any]:
    """One cold start: seconds to Ray up, ready and first answer; load phases; RSS."""
    from tests.services import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "serve.run", "serve.app:app",
        f"model_uri={model}", f"backend={backend}",
        "--address", "local", "--num-cpus", "2", "--object-store-mb", "200",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    marks: dict[str, float] = {}
    tail: list[str] = []

    def read_output() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            del tail[:-40]
            if "Started a local Ray instance" in line and "ray_up" not in marks:
                marks["ray_up"] = time.perf_counter() - t0

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = t0 + timeout
        while time.perf_counter() < deadline and proc.poll() is None:
            if _get(base + "/readyz", timeout=1.0)[0] == 200:
                marks["ready"] = time.perf_counter() - t0
                break
            time.sleep(0.05)
        if "ready" not in marks:
            raise RuntimeError("no /readyz 200 within the timeout:\n" + "\n".join(tail))
        status = _post(base + "/v1/predict", body)
        marks["first_answer"] = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"first request answered {status}")
        _code, raw = _get(base + "/v1/model", timeout=10.0)
        described = json.loads(raw or b"{}")
        return {
            **{k: round(v, 2) for k, v in marks.items()},
            "load_ms": described.get("load_ms", {}),
            "backend": described.get("backend"),
            "replica_rss_mb": _replica_rss_mb(proc.pid),
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def _phase_median(runs: list[dict[str, Any]], phase: str) -> float | None:
    values = [r["load_ms"][phase] for r in runs if r["load_ms"].get(phase) is not None]
    return round(statistics.median(values) / 1000.0, 2) if values else None


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    phases = ("fetch", "device", "export", "session", "aligner", "warmup")
    head = ["model", "starts", "Ray up (s)", "ready (s)", "first answer (s)"]
    head += [f"{p} (s)" for p in phases] + ["replica RSS (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kind, runs in results.items():
        row = [kind, str(len(runs))]
        row += [str(_median(runs, k)) for k in ("ray_up", "ready", "first_answer")]
        row += [str(_phase_median(runs, p)) for p in phases]
        rss = _median(runs, "replica_rss_mb")
        row.append(f"{rss:.0f}" if rss is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_cold_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runs", type=int, default=3, help="starts per model kind (default 3)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a start may take")
    p.add_argument("--backend", default="auto", help="the replica's backend (default auto)")
    p.add_argument("--json", help="also write every run here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.serve_load import load_images

    bodies, what = load_images(1)
    tmp = Path(tempfile.mkdtemp(prefix="ageray-cold-"))
    models = _models(tmp, args.image_size)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.kinds}
    for i in range(args.runs):  # kinds interleaved: each sees the same machine
        for kind in args.kinds:
            r = one_start(models[kind], bodies[0], args.timeout, args.backend)
            results[kind].append(r)
            print(f"[cold start] {kind} run {i + 1}/{args.runs}: {json.dumps(r)}", flush=True)
    print(f"\nface: {what}; model GLAE resnet18 two heads at {args.image_size} px; "
          f"{os.cpu_count()} CPUs; medians over {args.runs} start(s)")  # fmt: skip
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
