"""One Tune trial: the driver function Tune runs per trial, and what it is handed.

This is Ray's driver-function pattern: the function holds a sliver of CPU and waits on the
``TorchTrainer`` it builds; the Train workers hold the resources. Ray is imported inside
:func:`trial_driver` only, so this module (and ``ageray.tuning``) imports without Ray.
Pickles name the driver ``ageray.tuning.trial.trial_driver``; a Tune state written before
the package split names it ``ageray.tuning.trial_driver``, which the package re-exports.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ageray.config import Config, config_from_dict
from ageray.tuning.metric import EPOCH_KEY, FINAL_KEY, MetricSpec, TuningError, parse_metric
from ageray.tuning.runs import open_trial_run
from ageray.tuning.space import parse_space, resolve_sample, trial_config
from ageray.tuning.trial_records import short_error

if TYPE_CHECKING:
    from ageray.training.pipeline import PipelineResult

__all__ = ["TrialContext", "closing_report", "count_model_parameters", "trial_driver"]


@dataclass
class TrialContext:
    """What every trial driver gets besides its sampled values (plain data)."""

    search: str  # the search's name
    base: dict[str, Any]  # runtime base config (absolute paths), nested dict
    space: dict[str, Any]  # the space file's content
    metric: str
    metric_weight: float
    tracking_uri: str | None
    parent_run_id: str | None
    stage2: bool = False
    evaluate: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_model_parameters(cfg: Config) -> int:
    """Parameters of the trial's model, built on the meta device (no memory, no weights):
    also checks its shapes before any worker starts (an FR kernel larger than the map fails
    here, in a second, not after Train has started)."""
    import torch

    from ageray.model import build_model, count_parameters

    cfg_meta = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    with torch.device("meta"):
        model = build_model(cfg_meta)
    return count_parameters(model)


def trial_driver(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: build the trial's config and run the training pipeline on it (the one
    ``jobs.train`` runs: stage 1, optionally stage 2 and the test evaluation, never the
    registration), then one closing report. Every stage-1 epoch's report reaches Tune
    through :class:`~ageray.tuning.callbacks.TrialReportCallback`, so ASHA can stop it.

    This is Ray's driver-function pattern: the function holds a sliver of CPU and waits on
    the ``TorchTrainer`` each stage builds; the workers hold the resources. ``run.name`` is
    ``<search>/<trial id>``, stable across Tune's retry and a resumed search, so a restarted
    trial resumes from its last Train checkpoint. MLflow: stage 1 and the evaluation log
    into the trial's run, stage 2 into a child run of it.
    """
    from ray import tune

    from ageray.tracking import Tracker

    c = TrialContext(**ctx)
    space = parse_space(c.space, source=f"search {c.search}")
    spec = parse_metric(c.metric, c.metric_weight)
    trial_id = tune.get_context().get_trial_id()
    overrides = resolve_sample(space, config, c.base)
    cfg, invalid = _trial_config(c, overrides, trial_id=trial_id)
    tracker = Tracker(cfg, enabled=bool(c.tracking_uri))
    params = {f"tune.{k}": v for k, v in overrides.items()}
    params.update({"tune.trial_id": trial_id, "tune.label": space.label(config)})
    run_id = open_trial_run(
        tracker, search=c.search, trial_id=trial_id, parent_run_id=c.parent_run_id, params=params
    )
    try:
        if invalid is not None:
            raise invalid
        final = _train(cfg, c, spec=spec, tracker=tracker, run_id=run_id)
        tracker.set_tags(run_id, {"ageray.tune.outcome": "completed"})
        tracker.end(run_id, "FINISHED")
    except Exception as exc:
        tracker.set_tags(
            run_id, {"ageray.tune.outcome": "failed", "ageray.tune.error": short_error(exc)}
        )
        tracker.end(run_id, "FAILED")
        raise
    tune.report(final)


def _trial_config(
    c: TrialContext, overrides: dict[str, Any], *, trial_id: str
) -> tuple[Config, TuningError | None]:
    """The trial's config (its run named ``<search>/<trial id>``, the search's tracking and
    stage-2 settings); an invalid sample gives the base config and the error, so the
    error is reported through the trial's MLflow run before it is raised."""
    invalid: TuningError | None = None
    try:
        cfg = trial_config(c.base, overrides)
    except TuningError as exc:
        cfg, invalid = config_from_dict(c.base), exc
    train = cfg.train
    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"{c.search}/{trial_id}"),
        tracking=dataclasses.replace(cfg.tracking, uri=c.tracking_uri),
        # the search's stage2 setting decides, whatever the recipe says
        train=dataclasses.replace(
            train, stage2=dataclasses.replace(train.stage2, enabled=c.stage2)
        ),
    )
    return cfg, invalid


def _train(
    cfg: Config, c: TrialContext, *, spec: MetricSpec, tracker: Any, run_id: str | None
) -> dict[str, Any]:
    """Run the pipeline with every stage-1 epoch reported to Tune; the closing report."""
    from ageray.training.pipeline import run_pipeline
    from ageray.tuning.callbacks import TrialReportCallback

    epochs = cfg.train.stage1.epochs
    num_params = count_model_parameters(cfg)
    tracker.log_metrics(run_id, {"num_params": num_params})
    callback = TrialReportCallback(
        metric=spec.name,
        weight=spec.weight,
        constants={"num_params": num_params},
        tracking_uri=tracker.uri if tracker.enabled else None,
        run_id=run_id,
    )
    result = run_pipeline(
        cfg,
        tracker=tracker,
        evaluate=c.evaluate,
        register=False,
        run_id=run_id,
        child_runs=("stage2",),
        stage1_callbacks=[callback],
    )
    final = closing_report(result, spec, epochs=epochs, num_params=num_params)
    stage2 = {k: v for k, v in final.items() if k.startswith("stage2_")}
    tracker.log_metrics(run_id, {**stage2, "epochs_run": epochs})
    return final


def closing_report(
    result: PipelineResult, spec: MetricSpec, *, epochs: int, num_params: int
) -> dict[str, Any]:
    """A trial's last report to Tune: marked final, stage 1's best validation metrics and
    the search metric, stage 2's as ``stage2_val_*``, the test split's MAE / CMAE / AAR
    per row (``test_<row>_<metric>``) when they ran."""
    r1 = result.stage1.metrics if result.stage1 is not None else {}
    final: dict[str, Any] = {
        FINAL_KEY: 1,
        EPOCH_KEY: epochs,
        "num_params": num_params,
        **{k: v for k, v in r1.items() if k.startswith("val_")},
    }
    objective = spec.value(r1)
    if objective is not None:
        final[spec.key] = objective
    if result.stage2 is not None:
        final.update(
            {f"stage2_{k}": v for k, v in result.stage2.metrics.items() if k.startswith("val_")}
        )
    if result.report is not None:
        final.update(
            {
                k: v
                for k, v in result.report["flat_metrics"].items()
                if re.fullmatch(r"test_[a-z_]+?_(mae|cmae|aar)", k)
            }
        )
    return final
