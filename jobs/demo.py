"""The whole platform on embedded defaults, in one command (``make demo``):

  1. synthetic long-tailed faces -> train/val/test shards        (jobs.make_shards)
  2. a local Ray sized for this machine
  3. identity pretraining with AM-softmax                          (jobs.pretrain)
  4. stage 1 (FR + PA), stage 2 (balanced head), evaluation,
     registration in a local MLflow store                          (jobs.train)
  5. Ray Serve with the registered model, real HTTP requests       (serve.app)
  6. clean shutdown, the Table IX-style table and where to look next

    python -m jobs.demo [--config recipes/demo.yaml] [--set key=value ...] [--keep-serving]

Everything lands under ``runs/`` (shards, checkpoints, the MLflow store ``runs/mlflow.db``).
A second run reuses finished stages; ``--fresh`` starts over. The console shows ageray's
progress and results only (Ray's own lines stay in its logs; ``--verbose`` shows them).
A shortened demo (``--num-samples 300 --skip-pretrain`` and 1-epoch stages) runs in CI:
``tests/e2e/test_demo.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from jobs._common import Timer, base_parser, load, setup_logging

STEPS = 6


def banner(i: int, text: str) -> None:
    print(f"\n{'=' * 78}\n[demo {i}/{STEPS}] {text}\n{'=' * 78}", flush=True)


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free TCP port on 127.0.0.1")


def sample_images(shards: str, split: str, per_group: int = 2) -> list[tuple[str, float, bytes]]:
    """A few encoded test images across the age groups (key, age, JPEG bytes)."""
    from ageray.data.manifest import read_manifest

    manifest = read_manifest(shards)
    groups = {(0, 17): [], (18, 65): [], (66, 200): []}
    for shard in manifest["splits"][split]["shards"]:
        path = Path(shards) / shard["name"]
        with tarfile.open(path) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                key = name[: -len(".json")]
                labels = json.loads(tf.extractfile(member).read())
                image = members.get(key + ".jpg") or members.get(key + ".png")
                age = labels.get("age")
                if image is None or age is None:
                    continue
                for (lo, hi), bucket in groups.items():
                    if lo <= age <= hi and len(bucket) < per_group:
                        bucket.append((Path(key).name, float(age), tf.extractfile(image).read()))
        if all(len(b) >= per_group for b in groups.values()):
            break
    return [item for bucket in groups.values() for item in bucket]


def post_image(url: str, data: bytes) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait_ready(base: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception:  # not up yet: connection refused or 503 while warming up
            pass
        time.sleep(1.0)
    raise TimeoutError(f"Serve did not report ready at {base}/readyz within {timeout:.0f}s")


def first_table(markdown: str) -> str:
    """The report's first block (its caption and the Table IX-style table); the rest of
    the report stays in report.md, so the console fits on two screens."""
    out: list[str] = []
    for line in markdown.splitlines():
        if out and not line.strip() and any(x.startswith("|") for x in out):
            break
        out.append(line)
    return "\n".join(out) + "\n"


def _without_tables(text: str) -> None:
    """The pipeline's progress as it comes, its report tables replaced by one line (the
    table is printed once, at the end)."""
    if text.startswith("Split `"):
        print("[ageray] evaluation on the test split done; the table follows at the end")
    else:
        print(text, flush=True)


def _ray_logs_dir() -> str:
    """Where this Ray's own log files are (the quiet console leaves Ray's lines there)."""
    try:
        import ray

        return str(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # a private attribute; the documented default otherwise
        return "/tmp/ray/session_latest/logs"


def _parse(argv: list[str] | None) -> Any:
    """The demo's arguments; the recipe defaults to ``recipes/demo.yaml``."""
    p = base_parser("python -m jobs.demo", __doc__)
    p.add_argument("--num-samples", type=int, default=3000, help="synthetic images to generate")
    p.add_argument("--skip-pretrain", action="store_true", help="start from random weights")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo outputs first")
    p.add_argument("--port", type=int, default=8000, help="HTTP port for Serve (127.0.0.1)")
    p.add_argument("--keep-serving", action="store_true", help="leave Serve up until Ctrl-C")
    if argv is None:
        argv = sys.argv[1:]
    args = p.parse_args(argv)
    if not args.config:
        args.config = str(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml")
    return args


def _set_environment() -> None:
    """Quiet logging, one BLAS thread per process, no usage stats, and the request guard
    for Serve's replicas and proxy (as under ``serve run serve.app:app``); read by the Ray
    processes this job starts."""
    setup_logging()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ageray.serving.guard import EDGE_CALLBACK, EDGE_ENV

    os.environ.setdefault(EDGE_ENV, EDGE_CALLBACK)


def _make_shards(cfg: Any, args: Any) -> None:
    """Step 1: synthetic faces -> shards (reused when their manifest exists)."""
    from jobs import make_shards

    banner(1, f"synthetic faces -> shards in {cfg.data.shards}")
    manifest = Path(cfg.data.shards) / "manifest.json"
    if manifest.is_file():
        print(f"reusing {manifest} (--fresh regenerates)")
        return
    make_shards.main(
        [
            "--source", "synthetic",
            "--num-samples", str(args.num_samples),
            "--image-size", str(cfg.data.image_size),
            "--output", cfg.data.shards,
            *([] if sys.stderr.isatty() else ["--quiet"]),  # bars only on a terminal
        ]
    )  # fmt: skip


def _start_ray(cfg: Any) -> str:
    """Step 2: a local Ray sized for this machine; returns where its own logs are."""
    from ageray.training.driver import init_ray

    banner(2, "local Ray")
    init_ray(cfg)
    import ray

    res = ray.cluster_resources()
    ray_logs = _ray_logs_dir()
    print(
        f"Ray {ray.__version__}: {res.get('CPU', 0):g} CPUs, object store "
        f"{res.get('object_store_memory', 0) / 2**20:.0f} MiB; its own logs: {ray_logs}"
    )
    return ray_logs


def _pretrain(args: Any, common: list[str], run_dir: Path) -> Path | None:
    """Step 3: identity pretraining (LAE 2.3); returns the trunk's weights file, or None
    with ``--skip-pretrain``."""
    from jobs import pretrain

    if args.skip_pretrain:
        banner(3, "identity pretraining skipped (--skip-pretrain)")
        return None
    banner(3, "identity pretraining with AM-softmax (LAE 2.3)")
    pretrain.main(common)
    return run_dir / "pretrain" / "model" / "backbone.safetensors"


def _train(common: list[str], backbone: Path | None) -> int:
    """Step 4: stage 1, stage 2, evaluation and registration (jobs.train's exit code)."""
    from jobs import train

    banner(4, "stage 1 (FR + PA), stage 2 (balanced head), evaluation, registration")
    extra = ["--set", f"train.init_from={backbone}"] if backbone else []
    return train.main(common + extra, log=_without_tables)


def _deploy(cfg: Any, port: int) -> tuple[str, str]:
    """Serve the registered model on 127.0.0.1; returns (its model URI, the base URL)
    once Serve reports ready."""
    import logging

    from ray import serve

    from ageray.tracking import resolve_tracking_uri
    from jobs._common import verbose
    from serve.app import build_app

    if not verbose():
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
    model_uri = f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    port = _free_port(port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    env = {"MLFLOW_TRACKING_URI": resolve_tracking_uri(cfg), "OMP_NUM_THREADS": "1"}
    serve.run(
        build_app(
            model_uri,
            settings={"device": "cpu"},
            ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}},
        ),
        name="ageray",
        route_prefix="/",
        blocking=False,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base)
    return model_uri, base


def _ask_served_model(cfg: Any, model_uri: str, base: str) -> None:
    """A few test images of each age group through HTTP, one line per answer."""
    with urllib.request.urlopen(base + "/v1/model", timeout=30) as resp:
        info = json.loads(resp.read())
    print(f"serving {model_uri} (version {info.get('version')}) at {base}")
    print(f"\n{'image':<28} {'true':>5} {'answer':>7}  head      vanilla  balanced")
    for key, age, data in sample_images(cfg.data.shards, cfg.eval.split):
        out = post_image(base + "/v1/predict?faces=largest", data)  # test-split chips
        heads = out["heads"]
        bal = heads.get("balanced", {}).get("age")
        print(
            f"{key[:28]:<28} {age:5.0f} {out['age']:7.1f}  {out['head']:<9} "
            f"{heads['vanilla']['age']:7.1f}  {bal if bal is None else round(bal, 1)!s:>8}"
        )


def _serve(cfg: Any, args: Any) -> str:
    """Step 5: Ray Serve with the registered model, real HTTP requests, then Serve and Ray
    shut down (``--keep-serving``: after Ctrl-C). Returns the served model URI."""
    import ray
    from ray import serve

    banner(5, "Ray Serve: the registered model behind HTTP")
    model_uri, base = _deploy(cfg, args.port)
    _ask_served_model(cfg, model_uri, base)
    if args.keep_serving:
        print(f"\nServing until Ctrl-C: web page {base}/ , OpenAPI {base}/docs")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    ray.shutdown()
    print("shut down Serve and Ray.")
    return model_uri


def _results(
    cfg: Any, report: dict[str, Any], *, run_dir: Path, model_uri: str, ray_logs: str, timer: Timer
) -> None:
    """Step 6: the Table IX-style table and where to look next."""
    from ageray.evaluation.tables import markdown_table
    from ageray.redaction import redact
    from ageray.tracking import resolve_tracking_uri

    banner(6, "results")
    print(first_table(markdown_table(report)))
    print("Routing rules against the oracle bound, shot MAE, routing usage and CCS: report.md.")
    # a tracking URI with user:password in it stays off the console
    tracking_uri = redact(resolve_tracking_uri(cfg))
    print(f"demo finished in {timer}. Where to look next:")
    print(f"  report:      {run_dir / 'eval' / 'report.md'}")
    print(f"  plots:       {run_dir / 'eval'}/{{per_age_mae,routing_usage,ccs}}.png")
    print(f"  MLflow UI:   mlflow ui --backend-store-uri {tracking_uri} --port 5000")
    print(
        f"  serve again: MLFLOW_TRACKING_URI={tracking_uri} serve run serve.app:app "
        f"model_uri={model_uri}   (web page http://127.0.0.1:8000/)"
    )
    print(f"  Ray's logs:  {ray_logs}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _set_environment()
    cfg = load(args)
    timer = Timer()
    # Step-level progress lines off (an epoch line every few seconds is enough here); a
    # user's --set comes later and wins.
    common = ["--config", args.config, "--set", "train.log_every=0"]
    common += [x for o in args.overrides for x in ("--set", o)]

    from ageray.training.driver import local_run_dir

    run_dir = local_run_dir(cfg)
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(cfg.data.shards, ignore_errors=True)
    _make_shards(cfg, args)
    ray_logs = _start_ray(cfg)
    backbone = _pretrain(args, common, run_dir)
    rc = _train(common, backbone)
    if rc:
        return rc
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    model_uri = _serve(cfg, args)
    _results(cfg, report, run_dir=run_dir, model_uri=model_uri, ray_logs=ray_logs, timer=timer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
