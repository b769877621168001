"""The training pipeline: stage 1, stage 2 (with stage 1's validation MAE), the test-split
evaluation and the registration of the final model, each stage through Ray Train.

Why one function: ``jobs.train`` and every Tune trial run this same sequence (Made-With-ML's
"tune reuses train"); written twice, the two copies drift (which model stage 2 starts from,
which MAE it reads, what reaches MLflow). The callers differ only in policy, passed as
keywords: which stages run, whether to evaluate and register, which MLflow run the pipeline
writes into and which steps get a child run of their own, the callbacks of stage 1 (a Tune
trial's report callback), and where progress lines go.

MLflow layout: the pipeline's run (``run_id``; when None the pipeline opens its own parent
run for ``cfg.run.name`` and closes it) holds the registered model and the evaluation; each
step named in ``child_runs`` gets a child run under it, the others log into it directly
(``jobs.train``: a child run per step; a Tune trial: stage 1 and the evaluation in the
trial's own run, stage 2 in a child run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ageray.config import Config
from ageray.data.manifest import read_manifest
from ageray.evaluation import evaluate_for_config, format_table
from ageray.inference import resolve_model_dir
from ageray.tracking import Tracker, log_model
from ageray.training.driver import StageResult, local_run_dir, run_stage_on_ray
from ageray.training.plans import HYBRID_STEPS

__all__ = ["STEPS", "PipelineError", "PipelineResult", "run_pipeline"]

#: The steps of a pipeline that may get MLflow child runs of their own.
STEPS = ("stage1", *HYBRID_STEPS, "stage2", "routing", "evaluate")


class PipelineError(ValueError):
    """The pipeline was asked for something it cannot do; the message says what to pass."""


@dataclass
class PipelineResult:
    """What a pipeline produced: the stage results it ran, the final model, the evaluation
    report and the registry entry (each None when that step did not run)."""

    run_id: str | None  # the pipeline's MLflow run
    stage1: StageResult | None = None
    stage2: StageResult | None = None
    model_dir: Path | None = None  # the routed model, else stage 2's, stage 1's, the --from one
    routing: dict[str, Any] | None = None  # fit reports of the routing rules
    report: dict[str, Any] | None = None
    eval_dir: Path | None = None
    registered: dict[str, Any] | None = None


@dataclass
class _PipelineRun:
    """The pipeline's MLflow run and policy, which every step reads."""

    cfg: Config
    tracker: Tracker
    run_id: str | None
    child_runs: Collection[str]
    fresh: bool
    say: Callable[[str], None]

    @property
    def uri(self) -> str | None:
        return self.tracker.uri if self.tracker.enabled else None

    @contextlib.contextmanager
    def step_run(self, step: str) -> Iterator[str | None]:
        """The MLflow run ``step`` logs into: a child run of its own, or the pipeline's."""
        if step in self.child_runs:
            with self.tracker.stage(step, resume=not self.fresh) as rid:
                yield rid
        else:
            yield self.run_id

    def train(
        self,
        step: str,
        label: str,
        *,
        params: dict[str, Any] | None = None,
        log_model_json: bool = True,
        **stage_kwargs: Any,
    ) -> StageResult:
        """Run one training stage through Ray Train and log it, the same way for every
        stage: ``params`` before it starts; after a stage that ran (a reused finished stage
        logged these when it finished) its ``best_*`` metrics and, with
        ``log_model_json``, its ``model.json``; then one console line named ``label``."""
        with self.step_run(step) as rid:
            if params is not None:
                self.tracker.log_params(rid, params)
            r = run_stage_on_ray(
                self.cfg, step, tracking_uri=self.uri, mlflow_run_id=rid, fresh=self.fresh,
                **stage_kwargs,
            )  # fmt: skip
            if not r.reused:
                self.tracker.log_metrics(rid, {f"best_{k}": v for k, v in r.metrics.items()})
                if log_model_json:
                    self.tracker.log_artifact(rid, r.model_dir / "model.json", "model")
        self.say(f"[ageray] {label} best: {json.dumps(_shown(r.metrics))} -> {r.model_dir}")
        return r


def _check_stages(
    cfg: Config, stages: Collection[str], from_model: str | None
) -> tuple[list[str], bool]:
    """(the hybrid steps to run, whether stage 2 runs); a request the pipeline cannot do
    fails with a PipelineError saying what to pass."""
    unknown = set(stages) - {"stage1", "stage2", *HYBRID_STEPS}
    if unknown:
        raise PipelineError(
            f"unknown stage(s) {sorted(unknown)}; choose stage1, stage2 or the hybrid net's "
            f"steps {', '.join(HYBRID_STEPS)}"
        )
    hybrid = [s for s in HYBRID_STEPS if s in stages]
    if hybrid and cfg.model.multitask != "hybrid":
        raise PipelineError(
            f"stages {hybrid} are Xing 3.3.3's training of the hybrid net; the recipe has "
            f"model.multitask={cfg.model.multitask!r}"
        )
    if hybrid and hybrid[0] != HYBRID_STEPS[0] and "stage1" not in stages and not from_model:
        before = HYBRID_STEPS[HYBRID_STEPS.index(hybrid[0]) - 1]
        raise PipelineError(f"{hybrid[0]} starts from the {before} model: pass --from <it>")
    run_stage2 = "stage2" in stages and cfg.train.stage2.enabled
    if run_stage2 and "stage1" not in stages and not from_model:
        raise PipelineError(
            "stage 2 without stage 1 needs the stage-1 model (jobs.train: --from <folder, "
            "checkpoint, runs:/ or models:/ URI>)"
        )
    return hybrid, run_stage2


def _open_run(cfg: Config, tracker: Tracker, run_id: str | None, *, fresh: bool) -> str | None:
    """The pipeline's MLflow run: the caller's (child runs go under it), or a new parent
    run for ``cfg.run.name`` with the shards' manifest (which fails fast if they are
    missing)."""
    if run_id is not None:
        tracker.parent_id = run_id
        return run_id
    run_id = tracker.start_pipeline("train", resume=not fresh)
    tracker.log_manifest(run_id, read_manifest(cfg.data.shards), "shards")
    return run_id


def _train_representation(
    run: _PipelineRun,
    result: PipelineResult,
    *,
    stages: Collection[str],
    hybrid: list[str],
    from_model: str | None,
    stage1_callbacks: Sequence[Any] | None,
) -> tuple[str | None, float | None]:
    """Stage 1, then the hybrid net's steps, each from the one before (step 1 from a fresh
    net or the identity-pretrained trunk). Returns (the last checkpoint, in the run's
    storage: what stage 2's workers read; its validation MAE)."""
    cfg = run.cfg
    stage1_uri, mae_ref = None, None
    if "stage1" in stages:
        r1 = run.train(
            "stage1",
            "stage 1",
            init_backbone=cfg.train.init_from,
            callbacks=list(stage1_callbacks or []),
        )
        result.stage1, result.model_dir = r1, r1.model_dir
        mae_ref, stage1_uri = r1.metrics.get("val_mae"), r1.checkpoint
    for step in hybrid:
        init = stage1_uri
        if init is None and step != HYBRID_STEPS[0]:
            init = str(resolve_model_dir(str(from_model)))
        r = run.train(
            step,
            step,
            init_model=init,
            init_backbone=cfg.train.init_from if step == HYBRID_STEPS[0] else None,
        )
        result.stage1, result.model_dir = r, r.model_dir
        mae_ref, stage1_uri = r.metrics.get("val_mae"), r.checkpoint
    return stage1_uri, mae_ref


def _train_classifier(
    run: _PipelineRun,
    result: PipelineResult,
    *,
    from_model: str | None,
    stage1_uri: str | None,
    mae_ref: float | None,
) -> None:
    """Stage 2 from stage 1's model (or ``from_model`` and the MAE in its model.json), then
    the routing rules fitted on the validation split."""
    if result.stage1 is None:
        result.model_dir = resolve_model_dir(str(from_model))
        stage1_uri = str(result.model_dir)
        info = json.loads((result.model_dir / "model.json").read_text())
        mae_ref = (info.get("meta") or {}).get("val_mae")
    r2 = run.train(
        "stage2",
        "stage 2",
        params={"stage2.mae_ref": mae_ref, "stage2.init_model": result.model_dir},
        log_model_json=False,
        init_model=stage1_uri,
        mae_ref=mae_ref,
    )
    result.stage2, result.model_dir = r2, r2.model_dir
    with run.step_run("routing") as rid:
        result.model_dir, result.routing = _fit_routing_step(
            run.cfg, r2.model_dir, tracker=run.tracker, run_id=rid, say=run.say
        )


def _evaluate(run: _PipelineRun, result: PipelineResult) -> None:
    """The test-split evaluation of the final model, logged in its step's run and (when
    that is a child run) in the pipeline's run too."""
    out = local_run_dir(run.cfg) / "eval"
    with run.step_run("evaluate") as rid:
        report = evaluate_for_config(result.model_dir, run.cfg, out)
        run.tracker.log_artifact(rid, out, "evaluation")
        run.tracker.log_metrics(rid, report["flat_metrics"])
    if rid != run.run_id:
        run.tracker.log_artifact(run.run_id, out, "evaluation")
    result.report, result.eval_dir = report, out
    run.say(format_table(report))


def run_pipeline(
    cfg: Config,
    *,
    tracker: Tracker,
    stages: Collection[str] = ("stage1", "stage2"),
    from_model: str | None = None,
    evaluate: bool = True,
    register: bool = True,
    fresh: bool = False,
    run_id: str | None = None,
    child_runs: Collection[str] = STEPS,
    stage1_callbacks: Sequence[Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Run the pipeline of ``cfg``; see the module docstring for the keywords' policy.

    Stage 2 runs when ``"stage2"`` is in ``stages`` and ``train.stage2.enabled``; without
    stage 1 it starts from ``from_model`` (a folder, checkpoint, ``runs:/`` or ``models:/``
    URI) and reads the MAE recorded in its ``model.json``. ``fresh`` discards this run
    name's earlier stage results and starts new MLflow runs (resuming the old ones would mix
    two trainings' histories). Registration needs tracking.
    """
    hybrid, run_stage2 = _check_stages(cfg, stages, from_model)
    say = log or (lambda _text: None)
    own_run = run_id is None
    run_id = _open_run(cfg, tracker, run_id, fresh=fresh)
    if own_run:
        say(f"[ageray] run {cfg.run.name!r}: MLflow {tracker.run_url(run_id)}")
    run = _PipelineRun(cfg, tracker, run_id, child_runs, fresh, say)
    result = PipelineResult(run_id=run_id)
    stage1_uri, mae_ref = _train_representation(
        run,
        result,
        stages=stages,
        hybrid=hybrid,
        from_model=from_model,
        stage1_callbacks=stage1_callbacks,
    )
    if run_stage2:
        _train_classifier(
            run, result, from_model=from_model, stage1_uri=stage1_uri, mae_ref=mae_ref
        )
    if evaluate and result.model_dir is not None:
        _evaluate(run, result)
    if register and result.model_dir is not None and tracker.enabled:
        metrics = result.report["flat_metrics"] if result.report else {}
        result.registered = log_model(tracker, run_id, result.model_dir, metrics=metrics)
    if own_run:
        tracker.end(run_id)
    return result


def _fit_routing_step(
    cfg: Config,
    model_dir: Path,
    *,
    tracker: Tracker,
    run_id: str | None,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any] | None]:
    """After stage 2: fit the configured routing rules on the validation split and save the
    routed model (stage 2's weights + the fitted rules + the served rule) beside the stages;
    the evaluation and the registry get that model. Nothing to fit and eq. 11 served: the
    stage-2 model as it is."""
    from ageray.model.routing import rules_to_fit
    from ageray.model.routing.fitting import routing_fit_metrics
    from ageray.training.routing import NothingToRoute, fit_routing

    if not rules_to_fit(cfg.routing) and cfg.routing.rule == "smaller":
        return model_dir, None
    out = local_run_dir(cfg) / "routing" / "model"
    try:
        routed, reports = fit_routing(model_dir, cfg, out)
    except NothingToRoute as exc:
        say(f"[ageray] routing: nothing to fit ({exc})")
        return model_dir, None
    params = {f"routing.{k}": v for k, v in dataclasses.asdict(cfg.routing).items()}
    tracker.log_params(run_id, params)
    tracker.log_metrics(run_id, routing_fit_metrics(reports))
    tracker.log_artifact(run_id, routed / "model.json", "model")
    fits = ", ".join(
        f"{name} (objective {r['objective']:.3f} vs eq. 11's {r['objective_smaller']:.3f})"
        for name, r in reports.items()
    )
    say(
        f"[ageray] routing: fitted on {cfg.routing.fit_split!r}: {fits or 'nothing'}; "
        f"serves {cfg.routing.rule!r} -> {routed}"
    )
    return routed, reports


def _shown(metrics: dict[str, float]) -> dict[str, float]:
    """The validation numbers a person reads after a stage (rounded)."""
    keys = (
        "val_mae",
        "val_cmae",
        "val_balanced_cmae",
        "val_routed_cmae",
        "val_routed_mae",
        "val_group_acc",
        "val_gender_acc",
        "val_race_acc",
    )
    return {k: round(metrics[k], 3) for k in keys if k in metrics}
