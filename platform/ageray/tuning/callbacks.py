"""The search's Ray callbacks: the Train-side report callback that carries each epoch to
Tune, and the Tune-side monitor that prints progress and runs the placement-group janitor.

Ray is imported at the top: this is the Ray half of the tuning package, imported by the
search and the trial driver only when they run (``import ageray.tuning`` stays Ray-free).
Pickles name these classes ``ageray.tuning.callbacks.<Name>``; a Tune state written before
the package split names them ``ageray.tuning.<Name>``, which ``ageray.tuning`` still
resolves (lazily), so such a search still resumes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ageray.tracking import RunLogger
from ageray.tuning.metric import EPOCH_KEY, FINAL_KEY, enrich_report, finite_number, parse_metric
from ageray.tuning.resources import release_orphaned_placement_groups
from ageray.tuning.space import SearchSpace, parse_space
from ageray.tuning.trial_records import TrialRecord, read_error, short_error

__all__ = ["SearchMonitor", "TrialReportCallback"]


class TrialReportCallback(TuneReportCallback):
    """Forward each epoch's Train report to Tune with ``tune_epoch``, the derived metric
    and the trial's constants added (:func:`enrich_report`); log the derived metric to
    the trial's MLflow run per epoch, beside the worker's own metrics.

    Runs on the Ray Train controller (the trial's driver side), once per report: the
    workers' loop stays search-agnostic and the weight stays a search setting.
    """

    def __init__(
        self,
        metric: str,
        weight: float,
        constants: Mapping[str, Any] | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
    ) -> None:
        super().__init__()
        self.metric = metric
        self.weight = weight
        self.constants = dict(constants or {})
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        spec = parse_metric(self.metric, self.weight)
        rows = [dict(m) for m in metrics] or [{}]
        rows[0] = enrich_report(rows[0], spec, self.constants)
        if spec.derived and spec.key in rows[0] and self.run_id:
            step = int(rows[0].get(EPOCH_KEY, 1)) - 1
            RunLogger(self.tracking_uri, self.run_id).log_metrics(
                {spec.key: rows[0][spec.key]}, step=step
            )
        super().after_report(run_context, rows, checkpoint)


class SearchMonitor(tune.Callback):
    """Progress a person can follow (one line per epoch and per trial event) and the
    placement-group janitor (:func:`release_orphaned_placement_groups`)."""

    def __init__(
        self,
        space: dict[str, Any],
        metric: str,
        weight: float,
        epochs: int,
        total: int,
        max_failures: int = 1,
    ) -> None:
        self.space_raw = space
        self.metric = metric
        self.weight = weight
        self.epochs = epochs
        self.total = total
        self.max_failures = max_failures
        self.t0 = time.time()
        self.best: tuple[float, str] | None = None
        self.last_sweep = 0.0
        self.ended: dict[str, str] = {}
        self.epochs_seen: dict[str, int] = {}

    def seed(self, records: Sequence[TrialRecord]) -> None:
        """Count a resumed search's ended trials and best value."""
        spec = parse_metric(self.metric, self.weight)
        for rec in records:
            status = rec.status(self.epochs)
            if status != "unfinished":
                self.ended[rec.trial_id] = status
            v = rec.best_value(spec)
            if v is not None and (self.best is None or spec.better(v, self.best[0])):
                self.best = (v, rec.trial_id)

    def _space(self) -> SearchSpace:
        return parse_space(self.space_raw, source="search")

    def _say(self, text: str) -> None:
        m, s = divmod(int(time.time() - self.t0), 60)
        print(f"[tune {m:d}m{s:02d}s] {text}", flush=True)

    def _sweep(self, force: bool = False) -> None:
        if not force and time.time() - self.last_sweep < 2.0:
            return
        self.last_sweep = time.time()
        for pg in release_orphaned_placement_groups():
            self._say(f"released placement group {pg[:12]} left by a stopped trial")

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._sweep()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info):
        running = sum(1 for t in trials if t.status == "RUNNING")
        self._say(
            f"trial {trial.trial_id} started: {self._space().label(trial.config)} "
            f"({len(self.ended)}/{self.total} done, {running} running)"
        )

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result, **info):
        spec = parse_metric(self.metric, self.weight)
        value = spec.value(result)
        if result.get(FINAL_KEY) or value is None:
            return
        epoch = int(result.get(EPOCH_KEY, 0))
        self.epochs_seen[trial.trial_id] = epoch
        if self.best is None or spec.better(value, self.best[0]):
            self.best = (value, trial.trial_id)
        extra = " ".join(
            f"{k} {result[k]:.3f}"
            for k in ("val_mae", "val_cmae")
            if k != spec.key and finite_number(result.get(k)) is not None
        )
        self._say(
            f"trial {trial.trial_id} epoch {epoch}/{self.epochs}: {spec.key} {value:.3f} "
            f"{extra} (best so far {self.best[0]:.3f}, trial {self.best[1]})"
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info):
        seen = self.epochs_seen.get(trial.trial_id, 0)
        final = bool((trial.last_result or {}).get(FINAL_KEY))
        if final or seen >= self.epochs:
            what = "completed"
        else:
            what = f"stopped early by ASHA after {seen}/{self.epochs} epochs"
        self.ended[trial.trial_id] = what
        self._say(f"trial {trial.trial_id} {what} ({len(self.ended)}/{self.total} done)")
        self._sweep(force=True)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info):
        self._say(
            f"trial {trial.trial_id} failed (attempt {trial.num_failures}); retrying once: "
            f"{short_error(read_error(trial))}"
        )
        self._sweep(force=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info):
        self.ended[trial.trial_id] = "failed"
        self._say(
            f"trial {trial.trial_id} FAILED after {trial.num_failures} attempt(s): "
            f"{short_error(read_error(trial))} ({len(self.ended)}/{self.total} done)"
        )
        self._sweep(force=True)
