"""Two-stage training: stage 1 (representation, the recipe's head, instance-balanced), stage 2
(backbone frozen, balanced classifier, class-balanced), then evaluation and registration.

    python -m jobs.train --config recipes/demo.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config recipes/glae_r18.yaml

Stage 2 alone from an earlier stage-1 model: ``--stage 2 --from runs/demo/stage1/model`` (a
folder, a checkpoint, or an MLflow ``runs:/`` / ``models:/`` URI). A resubmitted run with the
same ``run.name`` resumes from its latest checkpoint and continues the same MLflow runs.
"""

from __future__ import annotations

import json
import sys

from jobs._common import Timer, base_parser, load, setup_logging


def parse(argv: list[str] | None = None):
    p = base_parser("python -m jobs.train", __doc__)
    p.add_argument("--stage", choices=["1", "2", "all"], default="all", help="which stages to run")
    p.add_argument(
        "--from",
        dest="from_model",
        help="stage-1 model for --stage 2: folder, checkpoint, runs:/ or models:/ URI",
    )
    p.add_argument("--fresh", action="store_true", help="discard this run name's earlier state")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    p.add_argument("--no-register", action="store_true", help="do not register the final model")
    p.add_argument("--no-tracking", action="store_true", help="do not talk to MLflow at all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging()
    cfg = load(args)
    timer = Timer()

    from ageray.data.manifest import read_manifest
    from ageray.evaluation import evaluate_for_config, format_table
    from ageray.tracking import Tracker, log_model, resolve_model_dir
    from ageray.training.driver import local_run_dir, run_stage_on_ray

    tracker = Tracker(cfg, enabled=not args.no_tracking)  # fails fast if the server is down
    # --fresh retrains from scratch, so it also starts new MLflow runs: resuming the old ones
    # would mix two trainings' histories (and epochs already logged there are not re-logged).
    resume = not args.fresh
    parent = tracker.start_pipeline("train", resume=resume)
    manifest = read_manifest(cfg.data.shards)  # fails fast if the shards are missing
    tracker.log_manifest(parent, manifest, "shards")
    print(f"[ageray] run {cfg.run.name!r}: MLflow {tracker.run_url(parent)}", flush=True)

    model_dir = None
    stage1_uri = None
    mae_ref = None
    if args.stage in ("1", "all"):
        with tracker.stage("stage1", resume=resume) as rid:
            r1 = run_stage_on_ray(
                cfg,
                "stage1",
                tracking_uri=tracker.uri,
                mlflow_run_id=rid,
                init_backbone=cfg.train.init_from,
                fresh=args.fresh,
            )
            if not r1.reused:  # a finished stage logged these when it finished
                tracker.log_metrics(rid, {f"best_{k}": v for k, v in r1.metrics.items()})
                tracker.log_artifact(rid, r1.model_dir / "model.json", "model")
        model_dir, mae_ref = r1.model_dir, r1.metrics.get("val_mae")
        stage1_uri = r1.checkpoint  # in the run's storage: what stage 2's workers read
        print(f"[ageray] stage 1 best: {json.dumps(_pick(r1.metrics))} -> {model_dir}", flush=True)

    if args.stage in ("2", "all") and cfg.train.stage2.enabled:
        if model_dir is None:
            if not args.from_model:
                print("--stage 2 needs --from <stage-1 model>", file=sys.stderr)
                return 2
            model_dir = resolve_model_dir(args.from_model)
            stage1_uri = str(model_dir)
            info = json.loads((model_dir / "model.json").read_text())
            mae_ref = (info.get("meta") or {}).get("val_mae")
        with tracker.stage("stage2", resume=resume) as rid:
            tracker.log_params(rid, {"stage2.mae_ref": mae_ref, "stage2.init_model": model_dir})
            r2 = run_stage_on_ray(
                cfg,
                "stage2",
                tracking_uri=tracker.uri,
                mlflow_run_id=rid,
                init_model=stage1_uri,
                mae_ref=mae_ref,
                fresh=args.fresh,
            )
            if not r2.reused:
                tracker.log_metrics(rid, {f"best_{k}": v for k, v in r2.metrics.items()})
        model_dir = r2.model_dir
        print(f"[ageray] stage 2 best: {json.dumps(_pick(r2.metrics))} -> {model_dir}", flush=True)

    report = None
    if not args.no_eval and model_dir is not None:
        out = local_run_dir(cfg) / "eval"
        with tracker.stage("evaluate", resume=resume) as rid:
            report = evaluate_for_config(model_dir, cfg, out)
            tracker.log_artifact(rid, out, "evaluation")
            tracker.log_metrics(rid, report["flat_metrics"])
        tracker.log_artifact(parent, out, "evaluation")
        print(format_table(report), flush=True)

    registered = None
    if model_dir is not None and not args.no_register and tracker.enabled:
        metrics = report["flat_metrics"] if report else {}
        registered = log_model(tracker, parent, model_dir, metrics=metrics)
    tracker.end(parent)

    print(f"\n[ageray] run {cfg.run.name!r} finished in {timer}")
    print(f"  model:   {model_dir}")
    if registered and registered.get("name"):
        print(
            f"  registry: models:/{registered['name']}@{registered['alias']} "
            f"(version {registered['version']})"
        )
    if report:
        print(f"  report:  {local_run_dir(cfg) / 'eval' / 'report.md'}")
    print(f"  MLflow:  mlflow ui --backend-store-uri {tracker.uri}")
    return 0


def _pick(metrics: dict[str, float]) -> dict[str, float]:
    keys = ("val_mae", "val_cmae", "val_balanced_cmae", "val_routed_cmae", "val_routed_mae")
    return {k: round(metrics[k], 3) for k in keys if k in metrics}


if __name__ == "__main__":
    raise SystemExit(main())
