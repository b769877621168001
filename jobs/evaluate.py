"""Evaluate a model on a split: every Table IX row the model has, routing usage, plots.

    python -m jobs.evaluate --model models:/ageray@candidate --shards runs/shards/synthetic \\
        --split test --output runs/eval
    python -m jobs.evaluate --model runs/demo/stage2/model --baseline runs/base/stage1/model ...
    python -m jobs.evaluate --model old/stage2/model --fit-routing ...   # fit missing rules on val

Every routing rule is a row (bigger, smaller = GLAE's AR, threshold and learned when the model
carries them, the oracle bound) with the share of the smaller -> oracle gap it closes, and
many/medium/few-shot MAE by training images per age (from the shards' manifest).

``--model`` is a model folder, a checkpoint folder, an MLflow URI (``models:/name@alias``,
``models:/name/3``, ``runs:/<run id>/...``) or an MLflow run id whose logged model to use.
Writes report.json (``rows.<row>.{mae,cmae,aar,group_mae,...}``, ``routing_usage``),
report.md and PNG plots to ``--output``, and logs them to MLflow.
"""

from __future__ import annotations

import re

from jobs._common import Timer, base_parser, load, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = base_parser("python -m jobs.evaluate", __doc__)
    p.add_argument("--model", required=True, help="model folder, MLflow URI or run id")
    p.add_argument("--shards", help="shards folder or s3:// URL (default: data.shards)")
    p.add_argument("--split", default=None, help="split to evaluate (default: eval.split)")
    p.add_argument("--output", required=True, help="folder for report.json, report.md, PNGs")
    p.add_argument("--baseline", help="an l_base model to add as the first row")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time averaging")
    p.add_argument(
        "--fit-routing",
        action="store_true",
        help="fit the routing rules of routing.fit the model lacks on routing.fit_split (val) "
        "first, in memory (models saved before routing rules existed)",
    )
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = p.parse_args(argv)
    setup_logging()
    cfg = load(args)
    timer = Timer()

    from ageray.evaluation import evaluate_to_dir, format_table
    from ageray.tracking import Tracker, logged_model_uri

    tracker = Tracker(cfg, enabled=not args.no_tracking)
    model_ref = args.model
    if re.fullmatch(r"[0-9a-f]{32}", model_ref):
        model_ref = logged_model_uri(tracker, model_ref)
    shards = args.shards or cfg.data.shards
    split = args.split or cfg.eval.split
    report = evaluate_to_dir(
        model_ref,
        shards,
        split,
        args.output,
        flip=not args.no_flip,
        aar_groups=cfg.eval.aar_groups,
        ccs_max=cfg.eval.ccs_max,
        baseline_ref=args.baseline,
        num_workers=cfg.data.num_workers,
        routing=cfg.routing if args.fit_routing else None,
        train_split=cfg.data.train_split,
    )
    if tracker.enabled:
        tracker.start_pipeline("evaluate")
        with tracker.stage(f"evaluate-{split}") as rid:
            tracker.log_params(rid, {"eval.model": model_ref, "eval.shards": shards})
            tracker.log_metrics(rid, report["flat_metrics"])
            tracker.log_artifact(rid, args.output, "evaluation")
        tracker.end(tracker.parent_id)
    print(format_table(report))
    print(f"[ageray] evaluated {report['num_samples']} samples of {split!r} in {timer}")
    print(f"  report: {args.output}/report.md, report.json; plots: {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
