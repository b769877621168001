"""Two-stage training: stage 1 (representation, the recipe's head, instance-balanced), stage 2
(backbone frozen, balanced classifier, class-balanced), then evaluation and registration.

    python -m jobs.train --config recipes/demo.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config recipes/glae_r18.yaml

Stage 2 alone from an earlier stage-1 model: ``--stage 2 --from runs/demo/stage1/model`` (a
folder, a checkpoint, or an MLflow ``runs:/`` / ``models:/`` URI). A resubmitted run with the
same ``run.name`` resumes from its latest checkpoint and continues the same MLflow runs.
The sequence itself is ``ageray.training.pipeline.run_pipeline`` (Tune trials run it too).

The hybrid net (``model.multitask=hybrid``) trains in Xing 3.3.3's three steps: ``--stage
all`` runs ``hybrid_groups`` (the race-gender group classifier), ``hybrid_ages`` (each group's
age estimator on its group's images) and ``hybrid_finetune`` (end to end), then stage 2 when
the recipe enables it; ``--stage hybrid`` runs the three steps, ``--stage hybrid_ages --from
<step-1 model>`` one of them; ``--stage 1`` trains the hybrid net end to end in one go.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ageray.training.stage_names import HYBRID_STEPS  # no torch at parse time
from jobs._common import Timer, base_parser, load, require_resources, setup_logging

STAGES = {
    "1": ("stage1",),
    "2": ("stage2",),
    "all": ("stage1", "stage2"),
    "hybrid": HYBRID_STEPS,
    **{step: (step,) for step in HYBRID_STEPS},
}


def stages_for(choice: str, multitask: str) -> tuple[str, ...]:
    """``--stage all`` trains a hybrid net in Xing's three steps (then stage 2)."""
    if choice == "all" and multitask == "hybrid":
        return (*HYBRID_STEPS, "stage2")
    return STAGES[choice]


def parse(argv: list[str] | None = None):
    p = base_parser("python -m jobs.train", __doc__)
    p.add_argument("--stage", choices=list(STAGES), default="all", help="which stages to run")
    p.add_argument(
        "--from",
        dest="from_model",
        help="stage-1 model for --stage 2 (or the previous step's for a hybrid step): "
        "folder, checkpoint, runs:/ or models:/ URI",
    )
    p.add_argument("--fresh", action="store_true", help="discard this run name's earlier state")
    p.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    p.add_argument("--no-register", action="store_true", help="do not register the final model")
    p.add_argument("--no-tracking", action="store_true", help="do not talk to MLflow at all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, log: Callable[[str], None] | None = None) -> int:
    """``log``: where the pipeline's progress and tables go (default: stdout); the demo
    passes its own to keep its console short."""
    args = parse(argv)
    setup_logging()
    cfg = load(args)
    timer = Timer()

    from ageray.redaction import redact
    from ageray.tracking import Tracker
    from ageray.training.pipeline import PipelineError, run_pipeline

    tracker = Tracker(cfg, enabled=not args.no_tracking)  # fails fast if the server is down
    require_resources(cfg, "python -m jobs.train")  # fails fast if the cluster cannot fit it
    try:
        result = run_pipeline(
            cfg,
            tracker=tracker,
            stages=stages_for(args.stage, cfg.model.multitask),
            from_model=args.from_model,
            evaluate=not args.no_eval,
            register=not args.no_register,
            fresh=args.fresh,
            log=log or (lambda text: print(text, flush=True)),
        )
    except PipelineError as exc:
        print(f"python -m jobs.train: {exc}", file=sys.stderr)
        return 2

    print(f"\n[ageray] run {cfg.run.name!r} finished in {timer}")
    print(f"  model:   {result.model_dir}")
    registered = result.registered
    if registered and registered.get("name"):
        print(
            f"  registry: models:/{registered['name']}@{registered['alias']} "
            f"(version {registered['version']})"
        )
    if result.eval_dir is not None:
        print(f"  report:  {result.eval_dir / 'report.md'}")
    print(f"  MLflow:  mlflow ui --backend-store-uri {redact(tracker.uri)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
