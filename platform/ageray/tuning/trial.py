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
from typing import Any

from ageray.config import Config, config_from_dict
from ageray.tuning.metric import EPOCH_KEY, FINAL_KEY, TuningError, parse_metric
from ageray.tuning.results import short_error
from ageray.tuning.runs import open_trial_run
from ageray.tuning.space import parse_space, resolve_sample, trial_config

__all__ = ["TrialContext", "count_model_parameters", "trial_driver"]


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
    """One Tune trial: build the trial's config, train stage 1 through Ray Train (every
    epoch's report reaches Tune through :class:`TrialReportCallback`, so ASHA can stop it),
    optionally stage 2 and the test evaluation, then one closing report.

    This is Ray's driver-function pattern: the function holds a sliver of CPU and waits on
    the ``TorchTrainer`` it builds (``run_stage_on_ray``); the workers hold the resources.
    ``run.name`` is ``<search>/<trial id>``, stable across Tune's retry and a resumed
    search, so a restarted trial resumes from its last Train checkpoint.
    """
    from ray import tune

    from ageray.evaluation import evaluate_for_config
    from ageray.tracking import Tracker
    from ageray.training.driver import local_run_dir, run_stage_on_ray
    from ageray.tuning.callbacks import TrialReportCallback

    c = TrialContext(**ctx)
    space = parse_space(c.space, source=f"search {c.search}")
    spec = parse_metric(c.metric, c.metric_weight)
    trial_id = tune.get_context().get_trial_id()
    overrides = resolve_sample(space, config, c.base)
    invalid: TuningError | None = None
    try:
        cfg = trial_config(c.base, overrides)
    except TuningError as exc:  # reported through the trial's MLflow run, then raised
        cfg, invalid = config_from_dict(c.base), exc
    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"{c.search}/{trial_id}"),
        tracking=dataclasses.replace(cfg.tracking, uri=c.tracking_uri),
    )
    epochs = cfg.train.stage1.epochs
    tracker = Tracker(cfg, enabled=bool(c.tracking_uri))
    params = {f"tune.{k}": v for k, v in overrides.items()}
    params.update({"tune.trial_id": trial_id, "tune.label": space.label(config)})
    run_id = open_trial_run(
        tracker, search=c.search, trial_id=trial_id, parent_run_id=c.parent_run_id, params=params
    )
    uri = tracker.uri if tracker.enabled else None
    try:
        if invalid is not None:
            raise invalid
        num_params = count_model_parameters(cfg)
        tracker.log_metrics(run_id, {"num_params": num_params})
        callback = TrialReportCallback(
            metric=spec.name,
            weight=spec.weight,
            constants={"num_params": num_params},
            tracking_uri=uri,
            run_id=run_id,
        )
        r1 = run_stage_on_ray(
            cfg,
            "stage1",
            tracking_uri=uri,
            mlflow_run_id=run_id,
            init_backbone=cfg.train.init_from,
            callbacks=[callback],
        )
        final: dict[str, Any] = {
            FINAL_KEY: 1,
            EPOCH_KEY: epochs,
            "num_params": num_params,
            **{k: v for k, v in r1.metrics.items() if k.startswith("val_")},
        }
        objective = spec.value(r1.metrics)
        if objective is not None:
            final[spec.key] = objective
        tracker.log_metrics(run_id, {f"best_{k}": v for k, v in r1.metrics.items()})
        model_dir = r1.model_dir
        if c.stage2:
            tracker.parent_id = run_id
            with tracker.stage("stage2") as rid2:
                r2 = run_stage_on_ray(
                    cfg,
                    "stage2",
                    tracking_uri=uri,
                    mlflow_run_id=rid2,
                    init_model=str(r1.model_dir),
                    mae_ref=r1.metrics.get("val_mae"),
                )
            model_dir = r2.model_dir
            stage2 = {f"stage2_{k}": v for k, v in r2.metrics.items() if k.startswith("val_")}
            final.update(stage2)
            tracker.log_metrics(run_id, stage2)
        if c.evaluate:
            out = local_run_dir(cfg) / "eval"
            report = evaluate_for_config(model_dir, cfg, out)
            test = {
                k: v
                for k, v in report["flat_metrics"].items()
                if re.fullmatch(r"test_[a-z_]+?_(mae|cmae|aar)", k)
            }
            final.update(test)
            tracker.log_metrics(run_id, report["flat_metrics"])
            tracker.log_artifact(run_id, out, "evaluation")
        tracker.log_metrics(run_id, {"epochs_run": epochs})
        tracker.set_tags(run_id, {"ageray.tune.outcome": "completed"})
        tracker.end(run_id, "FINISHED")
    except Exception as exc:
        tracker.set_tags(
            run_id, {"ageray.tune.outcome": "failed", "ageray.tune.error": short_error(exc)}
        )
        tracker.end(run_id, "FAILED")
        raise
    tune.report(final)
