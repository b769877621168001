"""Export the whole routed model as one graph: ONNX or TorchScript, with a dynamic batch axis.

    python -m jobs.export --model models:/ageray@candidate --format onnx --output runs/export
    python -m jobs.export --model runs/demo/stage2/model --format torchscript --output out/ \\
        --parity-input ../shared/data/utkface-dev.tar

The graph takes (B, 3, S, S) float32 images, preprocessed as the model was trained (size,
normalisation and alignment are in ``export.json``), and computes what Serve answers: the
images and their flips through the backbone once, both heads, the routing rule with its fitted
parameters, the routed distribution and age. Checks before anything is written out as done:
every ONNX operator is one TensorRT and OpenVINO accept (no Col2Im, no float64), and the
export answers within 1e-4 of PyTorch on ``--parity-images`` faces from ``--parity-input``
(a folder, tar, shards or s3://; synthetic faces when not given) at two batch sizes.

For a registered model (``models:/...``) the export is logged to MLflow beside it: ONNX into
the registered model's own artifact tree (``artifacts/model/export/onnx/``: Serve's
``backend: onnxruntime`` and ``jobs.predict --backend onnxruntime`` use it when it matches the
weights), TorchScript (a zip whose data.pkl is pickle-format) to the model's run under
``export/torchscript/``, so the registered model stays free of pickle. The model version gets
an ``ageray.export.<format>`` tag saying where.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from jobs._common import Timer, base_parser, load, setup_logging


def parse(argv: list[str] | None = None):
    p = base_parser("python -m jobs.export", __doc__)
    p.add_argument("--model", required=True, help="model folder or MLflow URI (models:/...)")
    p.add_argument("--format", dest="fmt", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--output", required=True, help="folder for the export + export.json")
    p.add_argument("--rule", help="routing rule to bake in (default: the model's own)")
    p.add_argument("--parity-input", help="faces for the parity check (folder, tar, shards)")
    p.add_argument("--parity-images", type=int, default=16, help="how many (default 16)")
    p.add_argument("--no-log", action="store_true", help="do not log the export to MLflow")
    return p.parse_args(argv)


def parity_images(path: Any, source: str | None, n: int) -> Any:
    """(n, 3, S, S) faces prepared by the one path: from ``source`` or synthetic."""
    import torch

    if source:
        from ageray.inference.sources import list_items, read_item

        rows = (r for item in list_items(source) for r in read_item(item))
        images = []
        for row in rows:
            if row["image"] is None:
                continue
            try:
                images.append(path.prepare(row["image"], row["key"]).tensor)
            except Exception:  # an unusable image is no parity input; skip it
                continue
            if len(images) == n:
                break
    else:
        from ageray.data.synthetic import iter_synthetic

        faces = iter_synthetic(num_samples=n, image_size=max(96, path.image_size), seed=7)
        images = [path.prepare(r.image, r.key).tensor for r in faces]
    if len(images) < 2:
        raise ValueError(f"--parity-input {source!r}: fewer than 2 usable images")
    return torch.stack(images)


def log_export(model_uri: str, fmt: str, folder: Path) -> str | None:
    """Log the export beside the registered model (module docstring); returns where."""
    import mlflow

    from ageray.tracking import model_info

    if not model_uri.startswith(("models:/", "runs:/")):
        return None
    client = mlflow.MlflowClient()
    reg = model_info(model_uri) if model_uri.startswith("models:/") else {}
    model_id = None
    if reg.get("name") and reg.get("version"):
        mv = client.get_model_version(reg["name"], reg["version"])
        model_id = getattr(mv, "model_id", None)
        source = str(mv.source or "")
        if not model_id and source.startswith("models:/m-"):  # a REST server may omit it
            model_id = source[len("models:/") :].split("/", 1)[0]
    elif model_uri.startswith("models:/m-"):
        model_id = model_uri[len("models:/") :].split("/", 1)[0]
    run_id = reg.get("run_id")
    if fmt == "onnx" and model_id:
        client.log_model_artifacts(model_id, str(folder), "artifacts/model/export/onnx")
        where = f"models:/{model_id}/artifacts/model/export/onnx"
    elif run_id:
        client.log_artifacts(run_id, str(folder), f"export/{fmt}")
        where = f"runs:/{run_id}/export/{fmt}"
    else:
        return None
    if reg.get("name") and reg.get("version"):
        client.set_model_version_tag(reg["name"], reg["version"], f"ageray.export.{fmt}", where)
    return where


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging()
    cfg = load(args)
    timer = Timer()

    from ageray.inference import load_predictor, resolve_model_dir
    from ageray.inference.export import export_model
    from ageray.tracking import Tracker

    remote = ":/" in args.model
    tracking = bool(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if remote and tracking:
        Tracker(cfg)  # points MLflow at the configured server
    tmp = tempfile.mkdtemp(prefix="ageray-export-") if remote else None
    try:
        folder = resolve_model_dir(args.model, dst=tmp)
        path = load_predictor(folder)
        try:
            images = parity_images(path, args.parity_input, args.parity_images)
            info = export_model(folder, args.output, fmt=args.fmt, images=images, rule=args.rule)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    worst = max(info["parity"]["max_abs_diff"].values())
    print(
        f"[ageray] exported {args.model} as {args.fmt} -> {info['path']} "
        f"(rule {info['rule']!r}, outputs {', '.join(info['outputs'])})"
    )
    print(
        f"  parity on {info['parity']['images']} faces, batch sizes "
        f"{info['parity']['batch_sizes']}: max |diff| {worst:.2e} <= {info['parity']['tolerance']}"
    )
    if args.fmt == "onnx":
        print(f"  ONNX operators (TensorRT + OpenVINO): {', '.join(info['ops'])}")
    if remote and tracking and not args.no_log:
        where = log_export(args.model, args.fmt, Path(args.output))
        print(f"  logged to MLflow: {where or 'nothing (no registered model or run found)'}")
    print(f"[ageray] export done in {timer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
