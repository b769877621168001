"""Batch prediction (``jobs.predict``: Ray Data, an actor pool) against the bare batched
forward, per CPU core, in one run.

    python -m benchmarks.predict_throughput                     # the 14k UTKFace dev faces
    python -m benchmarks.predict_throughput --limit 64 --image-size 64 --seconds 2   # check

What it measures, side by side and at the same batch size:

* **bare forward, per core**: :meth:`ageray.inference.ImagePredictor.forward` (image + flip,
  both heads, the routing rule) on already-preprocessed faces, one torch thread, in this
  process: the ceiling a core can reach. Measured before and after the job; the mean is used.
* **jobs.predict**: the real job as a child process (``python -m jobs.predict``: its own local
  Ray with ``--cpus`` CPUs, ``--cpus`` actors with one thread each, reading the images from
  the tar through the storage layer, decoding, predicting, writing Parquet). Its images/s
  are taken from the first answers to the last (the steady state; Ray's and the actors'
  start-up are reported apart) and divided by ``--cpus``.

The issue's target: jobs.predict per core >= 80% of the bare forward per core. Run it on an
otherwise idle machine (the lead does; the numbers go to benchmarks/RESULTS.md with the
command). The model is GLAE's resnet18 with two heads at ``--image-size`` px, random weights
(speed does not depend on them); ``--model`` takes a real one instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGERAY_SHARED", ROOT.parent / "shared"))
UTKFACE_TAR = SHARED / "data" / "utkface-dev.tar"


def make_input(limit: int | None, folder: Path) -> tuple[Path, int, str]:
    """The input tar: the UTKFace dev tar itself (all of it), its first ``limit`` faces in a
    temporary tar, or synthetic faces when the tar is absent."""
    if UTKFACE_TAR.is_file() and not limit:
        with tarfile.open(UTKFACE_TAR) as tar:
            n = sum(1 for m in tar if m.isfile() and m.name.lower().endswith(".jpg"))
        return UTKFACE_TAR, n, f"UTKFace dev ({UTKFACE_TAR}, {n} faces)"
    out = folder / "faces.tar"
    n = 0
    with tarfile.open(out, "w") as dst:
        if UTKFACE_TAR.is_file():
            with tarfile.open(UTKFACE_TAR) as src:
                for m in src:
                    if m.isfile() and m.name.lower().endswith(".jpg"):
                        dst.addfile(m, src.extractfile(m))
                        n += 1
                        if n == limit:
                            break
            what = f"UTKFace dev, first {n} faces"
        else:
            import io

            from ageray.data.synthetic import iter_synthetic

            for r in iter_synthetic(num_samples=limit or 256, image_size=200):
                info = tarfile.TarInfo(f"{r.key}.jpg")
                info.size = len(r.image)
                dst.addfile(info, io.BytesIO(r.image))
                n += 1
            what = f"synthetic faces ({n}, 200x200 JPEG)"
    return out, n, what


def bare_forward(path: Any, images: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of the forward alone on one thread (prepared tensors, batch ``batch``)."""
    import torch

    torch.set_num_threads(1)
    tensors = [path.prepare(d, "bench").tensor for d in images[:batch]]
    x = torch.stack([tensors[i % len(tensors)] for i in range(batch)])
    path.forward(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2:
        path.forward(x)
        n += 1
    return batch * n / (time.perf_counter() - t0)


def read_faces(tar: Path, n: int) -> list[bytes]:
    out = []
    with tarfile.open(tar) as t:
        for m in t:
            if m.isfile() and m.name.lower().endswith(".jpg"):
                out.append(t.extractfile(m).read())  # type: ignore[union-attr]
                if len(out) == n:
                    break
    return out


def run_job(model: Path, tar: Path, out: Path, batch: int, cpus: int) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "jobs.predict", "--model", str(model), "--input", str(tar),
        "--output", str(out), "--batch-size", str(batch), "--actors", str(cpus),
        "--cpus-per-actor", "1", "--no-progress", "--set", f"ray.num_cpus={cpus}",
        "--faces", "largest",  # chips: one answer per file, as the RESULTS figures were measured
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'platform'}"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"jobs.predict failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    m = re.search(r"([\d.]+) images/s overall, ([\d.]+) images/s from the first", done.stdout)
    rows = re.search(r"\] (\d+) rows: (\d+) answered", done.stdout)
    if not (m and rows):
        raise RuntimeError(f"cannot read jobs.predict's summary:\n{done.stdout[-3000:]}")
    return {
        "command": " ".join(cmd),
        "wall_s": wall,
        "overall": float(m.group(1)),
        "steady": float(m.group(2)),
        "rows": int(rows.group(1)),
        "answered": int(rows.group(2)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model folder (default: random GLAE resnet18, two heads)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--limit", type=int, default=0, help="first N faces only (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0, help="bare forward, each time")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

    from ageray.inference import load_predictor
    from benchmarks.serve_load import make_model

    with tempfile.TemporaryDirectory(prefix="ageray-bench-") as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else make_model(work / "model", args.image_size)
        tar, n, what = make_input(args.limit or None, work)
        path = load_predictor(model)
        faces = read_faces(tar, args.batch_size)
        before = bare_forward(path, faces, args.batch_size, args.seconds)
        job = run_job(model, tar, work / "out.parquet", args.batch_size, args.cpus)
        after = bare_forward(path, faces, args.batch_size, args.seconds)
    bare = (before + after) / 2
    per_core, per_core_all = job["steady"] / args.cpus, job["overall"] / args.cpus
    result = {
        "input": what,
        "images": n,
        "batch_size": args.batch_size,
        "cpus": args.cpus,
        "bare_forward_per_core": {"before": before, "after": after, "mean": bare},
        "predict": job,
        "predict_per_core_steady": per_core,
        "predict_per_core_overall": per_core_all,
        "ratio_steady": per_core / bare,
        "ratio_overall": per_core_all / bare,
        "target": 0.8,
    }
    print(f"input: {what}; batch {args.batch_size}; {args.cpus} CPUs")
    print("| | images/s per core | vs bare forward |")
    print("| --- | ---: | ---: |")
    print(f"| bare batched forward (1 thread; before / after {before:.1f} / {after:.1f}) "
          f"| {bare:.1f} | 100% |")  # fmt: skip
    print(f"| jobs.predict, steady state | {per_core:.1f} | {100 * per_core / bare:.0f}% |")
    print(
        f"| jobs.predict, incl. start-up | {per_core_all:.1f} | {100 * per_core_all / bare:.0f}% |"
    )
    print(
        f"jobs.predict: {job['rows']} rows ({job['answered']} answered), wall {job['wall_s']:.0f} s"
    )
    print(f"target >= 80% (steady state): {'met' if per_core / bare >= 0.8 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
