"""Hyperparameter search with Ray Tune: every trial is a real training run (stage 1 through
Ray Train, optionally stage 2 and the test evaluation), reporting each epoch's validation
metrics to Tune; ASHA stops weak trials early; MLflow gets a parent run for the search and a
child run per trial; the results are a GLAE Table III / IV style table (Markdown + CSV), plots
and the best configuration as a recipe for jobs.train.

    python -m tuning.search --config recipes/demo.yaml --space tuning/spaces/fr_kernel_stride.yaml
    python -m tuning.search --config recipes/demo.yaml --space tuning/spaces/proj_depth.yaml \\
        --set data.shards=runs/shards/synthetic --epochs 4 --metric mae+cmae --metric-weight 0.5
    python -m tuning.search --config recipes/demo.yaml --space tuning/spaces/optim.yaml \\
        --search optuna --num-samples 12
    ray job submit --working-dir . -- python -m tuning.search --config recipes/glae_r18.yaml \\
        --space tuning/spaces/glae_r18.yaml --set ray.use_gpu=true --resume

An interrupted search (Ctrl+C, a lost driver) continues with the same arguments plus
--resume: finished trials are kept, unfinished ones restart from their last Train
checkpoint. Space files: see tuning/spaces/ and ageray.tuning. Outputs go to
<run.storage_path>/<name>/ (results/, tune/, one folder per trial).
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import base_parser, setup_logging


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from ageray.tuning import ALGORITHMS, METRICS

    p = base_parser("python -m tuning.search", __doc__ or "")
    p.add_argument("--space", required=True, help="space file (tuning/spaces/*.yaml)")
    p.add_argument("--name", help="search name (default: <run.name>-<space file stem>)")
    p.add_argument("--num-samples", type=int, help="grid: grid repeats; random/optuna: trials")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the search of this name (finished trials are kept); starts a new "
        "one when there is none",
    )
    p.add_argument(
        "--retry-errored", action="store_true", help="with --resume: rerun failed trials too"
    )
    p.add_argument("--metric", choices=list(METRICS), help="what to optimise (val split)")
    p.add_argument(
        "--metric-weight",
        type=float,
        help="MAE's weight w in mae+cmae = w*MAE + (1-w)*CMAE (default 0.5)",
    )
    p.add_argument("--search", dest="algorithm", choices=list(ALGORITHMS), help="search algorithm")
    p.add_argument("--epochs", type=int, help="stage-1 epochs per trial (ASHA's budget)")
    p.add_argument(
        "--stage2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train stage 2 in every trial",
    )
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also evaluate every trial's model on the test split",
    )
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="early stopping or none")
    p.add_argument("--grace-period", type=int, help="ASHA: first epoch a trial can be cut")
    p.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/rf at each rung")
    p.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: from cluster resources)"
    )
    p.add_argument("--driver-cpus", type=float, help="CPU share of each trial's driver (0.1)")
    p.add_argument("--no-tracking", action="store_true", help="do not talk to MLflow")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (trials, concurrency) and exit"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging()
    from ageray.tuning import SearchOptions, TuningError, format_summary, run_search

    opts = SearchOptions(
        space=args.space,
        config=args.config,
        overrides=args.overrides,
        name=args.name,
        resume=args.resume,
        retry_errored=args.retry_errored,
        num_samples=args.num_samples,
        metric=args.metric,
        metric_weight=args.metric_weight,
        algorithm=args.algorithm,
        epochs=args.epochs,
        stage2=args.stage2,
        evaluate=args.evaluate,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        driver_cpus=args.driver_cpus,
        tracking=not args.no_tracking,
        dry_run=args.dry_run,
    )
    try:
        outcome = run_search(opts)
    except TuningError as exc:
        print(f"search error: {exc}", file=sys.stderr)
        return 2
    if opts.dry_run:
        return 0
    command = "python -m tuning.search " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_summary(outcome, command.replace(" --resume", "")), flush=True)
    if outcome.interrupted:
        return 130
    counts = outcome.counts()
    return 0 if counts["completed"] + counts["stopped"] > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
