"""Serve's two backends side by side on the CPU: eager PyTorch (``backend: torch``) against
the ONNX export in ONNX Runtime (``backend: onnxruntime``), same model, batch 1 and 32, one
run.

    python -m benchmarks.serve_backends                      # resnet18 GLAE at 112 px
    python -m benchmarks.serve_backends --image-size 64 --seconds 1 --repeats 1   # check

What is timed is :meth:`ageray.serving.ServedModel.forward`, the call a replica's batch runs
(image + flip, both heads, the routing rule, the answer rows), on already-preprocessed faces,
with the replica's settings from serve/config.yaml (``torch_threads: 1``; ``channels_last``
for torch as configured; ONNX Runtime with one intra-op thread). HTTP, decoding and batching
cost the same for both backends, so the forward is where they differ. The backends alternate
within each repeat (a row sees one machine load) and each cell reports the repeat with the
median throughput, plus p50 / p95 latency per batch. The answers of both are compared too
(max |age difference|; the parity bound of ``jobs.export`` is 1e-4).

The faster one becomes the CPU default in serve/config.yaml only after this has been run on an
idle machine (benchmarks/RESULTS.md, with the command); until then the default is ``torch``.
The model is GLAE's resnet18 with two heads, random weights (speed does not depend on them);
``--model`` takes a real one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model folder (default: random GLAE resnet18, two heads)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per cell and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="= the replica's torch_threads")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

    import shutil

    import numpy as np
    import torch
    import yaml

    from ageray.inference import fetch_model_files, with_export
    from ageray.serving import Limits, load_served_model
    from benchmarks.serve_load import floor_point, load_images, make_model

    torch.set_num_threads(args.threads)
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    uc = config["applications"][0]["deployments"][0]["user_config"]
    channels_last = bool(uc.get("channels_last", True))
    with tempfile.TemporaryDirectory(prefix="ageray-bench-") as tmp:
        work = Path(tmp)
        src = Path(args.model) if args.model else make_model(work / "model", args.image_size)
        folder = work / "served"
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("export"))
        # exported once, written beside the weights as jobs.export logs it, found by both
        for rel, data in with_export(fetch_model_files(folder)).files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        onnx = folder / "export" / "onnx" / "model.onnx"
        served = {
            "torch": load_served_model(str(folder), "cpu", channels_last=channels_last),
            "onnxruntime": load_served_model(
                str(folder), "cpu", backend="onnxruntime", threads=args.threads
            ),
        }
        images, what = load_images(64)
        tensors = [served["torch"].model_input(d, "bench", Limits()).tensor for d in images]
        x = torch.stack(tensors[:32])
        ages = {k: np.array([r["age"] for r in s.forward(x)]) for k, s in served.items()}
        diff = float(np.max(np.abs(ages["torch"] - ages["onnxruntime"])))
        cells: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                for name, s in served.items():
                    cells.setdefault((name, b), []).append(floor_point(s, tensors, b, args.seconds))
    rows: dict[str, Any] = {}
    print(f"model: {src if args.model else 'GLAE resnet18, two heads, random weights'} at "
          f"{args.image_size} px; faces: {what}; {args.threads} thread(s); "
          f"torch channels_last={channels_last}; ONNX {onnx.name}")  # fmt: skip
    print("| batch | backend | images/s | p50 ms | p95 ms | vs torch |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for b in args.batch_sizes:
        base = None
        for name in ("torch", "onnxruntime"):
            runs = cells[(name, b)]
            med = statistics.median(r["throughput"] for r in runs)
            cell = min(runs, key=lambda r: abs(r["throughput"] - med))
            base = base or cell["throughput"]
            rows[f"{name}@{b}"] = cell
            print(f"| {b} | {name} | {cell['throughput']:.1f} | {cell['p50']:.1f} | "
                  f"{cell['p95']:.1f} | {cell['throughput'] / base:.2f}x |")  # fmt: skip
    print(f"answers: max |age(torch) - age(onnxruntime)| = {diff:.2e} years over 32 faces")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "max_age_diff": diff}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
