"""Identity pretraining with AM-softmax (LAE 2.3) on shards that carry identity labels.

    python -m jobs.pretrain --config recipes/demo.yaml [--set pretrain.epochs=2]
    ray job submit --working-dir . -- python -m jobs.pretrain --config recipes/lae_strong.yaml

Writes ``<storage>/<run>/pretrain/model/backbone.safetensors``; start training from it with
``python -m jobs.train --set train.init_from=<that file>`` (the path is printed at the end).
"""

from __future__ import annotations

from jobs._common import Timer, base_parser, load, require_resources, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = base_parser("python -m jobs.pretrain", __doc__)
    p.add_argument("--fresh", action="store_true", help="discard this run name's earlier state")
    p.add_argument("--no-tracking", action="store_true", help="do not talk to MLflow at all")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load(args)
    timer = Timer()

    from ageray.data.manifest import read_manifest
    from ageray.tracking import Tracker
    from ageray.training.driver import run_stage_on_ray

    tracker = Tracker(cfg, enabled=not args.no_tracking)
    require_resources(cfg, "python -m jobs.pretrain")
    parent = tracker.start_pipeline("train")
    shards = cfg.pretrain.shards or cfg.data.shards
    manifest = read_manifest(shards)
    tracker.log_manifest(parent, manifest, "pretrain_shards")
    with tracker.stage("pretrain") as rid:
        result = run_stage_on_ray(
            cfg, "pretrain", tracking_uri=tracker.uri, mlflow_run_id=rid, fresh=args.fresh
        )
        tracker.log_metrics(rid, {f"best_{k}": v for k, v in result.metrics.items()})
        tracker.log_artifact(rid, result.model_dir / "model.json", "pretrain")
    tracker.end(parent)  # jobs.train with the same run.name reopens this parent run
    # The storage copy (s3:// on a cluster) is what a later jobs.train on any node can read.
    backbone = f"{result.checkpoint.rstrip('/')}/backbone.safetensors"
    print(f"\n[ageray] pretraining of {cfg.model.backbone} finished in {timer}")
    print(
        f"  identities: {int(manifest.get('num_identities') or 0)}, "
        f"final loss {result.metrics.get('train_loss', float('nan')):.3f}, "
        f"train accuracy {result.metrics.get('train_acc', float('nan')):.3f}"
    )
    print(f"  backbone:   {backbone}")
    print(f"  next:       python -m jobs.train ... --set train.init_from={backbone}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
