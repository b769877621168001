"""How a search maps onto MLflow: one parent run per search, one child run per trial, and the
verdict the search's driver writes into every child at the end.

This module holds the policy (which tags name a trial, what a parent run records, which run
status each trial outcome gets, which epochs to back-fill); the MLflow calls themselves are
:class:`~ageray.tracking.Tracker` methods (``find_run``, ``open_tagged_run``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ageray.config import Config, flatten
from ageray.tracking import Tracker
from ageray.tuning.metric import (
    DERIVED_KEY,
    EPOCH_KEY,
    FINAL_KEY,
    MetricSpec,
    finite_number,
)
from ageray.tuning.results import SearchOutcome
from ageray.tuning.space import SearchSettings, SearchSpace
from ageray.tuning.trial_records import TrialRecord

__all__ = [
    "backfill_epochs",
    "close_search_run",
    "open_search_run",
    "open_trial_run",
    "settle_trial_runs",
    "trial_tags",
]

ATTEMPTS_TAG = "ageray.tune.attempts"
ERROR_TAG = "ageray.tune.error"
OUTCOME_TAG = "ageray.tune.outcome"

#: A trial's outcome (TrialRecord.status) -> the status of its MLflow run.
RUN_STATUS = {
    "completed": "FINISHED",
    "stopped": "KILLED",
    "unfinished": "KILLED",
    "failed": "FAILED",
}

#: Keys Tune adds to every result; not the worker's metrics.
TUNE_KEYS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "trial_id",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_path",
    "experiment_tag",
    "should_checkpoint",
    EPOCH_KEY,
    FINAL_KEY,
    "num_params",
    DERIVED_KEY,
}


def trial_tags(search: str, trial_id: str) -> dict[str, str]:
    """The tags that name a trial's run: stable across Tune's retry and a resumed search."""
    return {"ageray.search": search, "ageray.trial_id": trial_id, "ageray.kind": "tune-trial"}


def open_trial_run(
    tracker: Tracker,
    *,
    search: str,
    trial_id: str,
    parent_run_id: str | None,
    params: Mapping[str, Any],
) -> str | None:
    """The trial's child run under the search's parent run; found again by its tags when
    Tune retries the trial or a resumed search restarts it, so a trial has exactly one run
    (its attempts counted in ``ageray.tune.attempts``)."""
    return tracker.open_tagged_run(
        trial_tags(search, trial_id),
        run_name=f"{search}/{trial_id}",
        stage="trial",
        parent_id=parent_run_id,
        params=params,
        attempts_tag=ATTEMPTS_TAG,
    )


def open_search_run(
    cfg: Config,
    *,
    enabled: bool,
    resume: bool,
    settings: SearchSettings,
    space: SearchSpace,
    spec: MetricSpec,
    concurrency: int,
) -> tuple[Tracker, str | None]:
    """The search's parent run (``cfg.run.name`` is the search's name; found again by its
    tags on resume) with the search's settings, space and metric as params."""
    tracker = Tracker(cfg, enabled=enabled)
    parent = tracker.start_pipeline("tune-search", resume=resume)
    if parent:
        flat = flatten(dataclasses.asdict(settings))
        tracker.set_tags(parent, {"ageray.search": cfg.run.name})
        tracker.log_params(
            parent,
            {
                **{f"search.{k}": v for k, v in flat.items()},
                **{f"space.{q.name.replace(',', '/')}": q.describe() for q in space.params},
                "search.metric_key": spec.key,
                "search.concurrency": concurrency,
            },
        )
        tracker.log_dict(parent, space.raw, "search/space.json")
    return tracker, parent


def close_search_run(tracker: Tracker, parent: str | None, outcome: SearchOutcome) -> None:
    """Counts, the best value and trial, the results folder; KILLED when interrupted."""
    if not parent:
        return
    spec = outcome.metric
    tracker.log_metrics(parent, {f"trials_{k}": v for k, v in outcome.counts().items()})
    if outcome.best is not None:
        v = outcome.best.best_value(spec)
        if v is not None:
            tracker.log_metrics(parent, {f"best_{spec.key}": v})
        tracker.set_tags(
            parent,
            {
                "ageray.tune.best_trial": outcome.best.trial_id,
                "ageray.tune.best_run": outcome.best.run_id or "",
            },
        )
    tracker.log_artifact(parent, outcome.results_dir, "results")
    tracker.end(parent, "KILLED" if outcome.interrupted else "FINISHED")


def settle_trial_runs(
    tracker: Tracker, search: str, records: Sequence[TrialRecord], epochs: int
) -> None:
    """Give every trial's child run the search's verdict: outcome, failures, epochs run, any
    epochs it missed (:func:`backfill_epochs`) and the matching run status; fills each
    record's ``run_id``.

    Why the driver and not the trials: Tune ends a trial's actor when ASHA stops it or the
    search is interrupted, so its driver cannot close its run, and an actor being torn down
    may still write (an interrupted attempt catching its controller's death marks the run
    FAILED, possibly after a resumed attempt reopened it). Tune's record is the truth.
    """
    if not tracker.enabled:
        return
    for rec in records:
        run = tracker.find_run(trial_tags(search, rec.trial_id))
        if run is None:
            continue
        rec.run_id = run.run_id
        status = rec.status(epochs)
        tags: dict[str, Any] = {OUTCOME_TAG: status, "ageray.tune.failures": rec.failures}
        if rec.error:
            tags[ERROR_TAG] = rec.error
        elif ERROR_TAG in run.tags:  # an earlier attempt failed, the retry did not
            tracker.delete_tags(rec.run_id, [ERROR_TAG])
        tracker.set_tags(rec.run_id, tags)
        tracker.log_metrics(rec.run_id, {"epochs_run": rec.epochs_run})
        backfill_epochs(tracker, rec)
        if run.status != RUN_STATUS[status]:
            tracker.end(rec.run_id, RUN_STATUS[status])


def backfill_epochs(tracker: Tracker, rec: TrialRecord) -> int:
    """Log the epochs Tune received but the trial's MLflow run lacks; return how many.

    Why: rank 0 logs an epoch's metrics after ``ray.train.report``, and ASHA's stop decision
    on that very report ends the trial's actors, so a stopped trial's last epoch can miss
    MLflow. Tune has it; the driver writes it at the same step (epoch), once.
    """
    if not rec.run_id or not rec.history:
        return 0
    logged = tracker.logged_steps(rec.run_id, "epoch")
    added = 0
    for row in rec.history:
        epoch = int(row[EPOCH_KEY]) - 1
        if epoch in logged:
            continue
        metrics = {
            k: float(v)
            for k, v in row.items()
            if k not in TUNE_KEYS and not k.startswith("config/") and finite_number(v) is not None
        }
        metrics["epoch"] = float(epoch)
        tracker.log_metrics(rec.run_id, metrics, step=epoch)
        added += 1
    return added
