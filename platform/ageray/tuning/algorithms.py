"""What Tune is handed for a search: the param space, the searcher (grid, random, Optuna's
TPE) and the ASHA scheduler, with the rungs at which ASHA compares trials and their replay
when a search resumes.

Ray (and Optuna) are imported inside the functions: the rules (:func:`asha_rungs`,
:func:`replay_asha`) are tested without them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

from ageray.tuning.metric import EPOCH_KEY, MetricSpec
from ageray.tuning.space import SearchSettings, SearchSpace
from ageray.tuning.trial_records import TrialRecord

__all__ = ["asha_rungs", "make_scheduler", "make_searcher", "replay_asha", "tune_param_space"]


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's ``param_space``: grid values as ``grid_search`` under grid search, else every
    discrete parameter as ``choice`` (Optuna cannot take ``grid_search``)."""
    from ray import tune

    algorithm = space.settings.algorithm
    out: dict[str, Any] = {}
    for p in space.params:
        if p.discrete:
            vals = p.tune_values()
            grid = p.kind == "grid" and algorithm == "grid"
            out[p.name] = tune.grid_search(vals) if grid else tune.choice(vals)
        elif p.kind == "loguniform":
            out[p.name] = tune.loguniform(p.low, p.high)
        else:
            out[p.name] = tune.uniform(p.low, p.high)
    return out


def make_searcher(space: SearchSpace, max_concurrent: int) -> Any:
    """Optuna's TPE (Tune wraps it in a ConcurrencyLimiter from ``max_concurrent_trials``)
    or the grid/random generator, which must get the limit itself: Tune ignores
    ``max_concurrent_trials`` for a generator passed in."""
    s = space.settings
    if s.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=s.seed)


def asha_rungs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs at which ASHA compares trials: ``grace * rf**k`` strictly below ``epochs``.

    Why not at the last epoch: a cut there saves nothing, and Tune stops a trial by ending
    its actor, which would kill the trial's driver before it hands over its result (stage 2,
    evaluation, MLflow). So ASHA gets ``max_t = epochs - 1`` and ``stop_last_trials=False``.
    """
    max_t = epochs - 1
    if max_t < grace_period:
        return []
    # Ray's _Bracket: int(log(max_t / grace) / log(rf) + 1) rungs at grace * rf**k.
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [round(grace_period * reduction_factor**k) for k in range(count)]


def replay_asha(scheduler: Any, records: Sequence[TrialRecord], spec: MetricSpec) -> int:
    """Put earlier trials' per-epoch results back into a restored ASHA scheduler's rungs;
    return how many trials were replayed.

    Why: Tune saves the searcher's state with the experiment but not the scheduler's; a
    resumed search would start with empty rungs, and the first trial to reach a rung after
    the resume would pass unopposed. Replaying each finished trial's reports (the rung values
    are the first report at or past each rung, whatever the order) restores the cutoffs.
    Uses ASHA's bracket internals (guarded: other schedulers are left alone).
    """
    brackets = getattr(scheduler, "_brackets", None)
    if not brackets or not hasattr(brackets[0], "on_result"):
        return 0
    sign = -1.0 if spec.mode == "min" else 1.0
    replayed = 0
    for rec in records:
        rows = [(int(r[EPOCH_KEY]), spec.value(r)) for r in rec.history]
        rows = [(e, v) for e, v in rows if v is not None]
        if not rows:
            continue
        stub = types.SimpleNamespace(trial_id=rec.trial_id)
        for epoch, value in rows:
            brackets[0].on_result(stub, epoch, sign * value)
        replayed += 1
    return replayed


def make_scheduler(settings: SearchSettings, epochs: int) -> Any:
    """ASHA over ``tune_epoch`` with ``max_t = epochs - 1`` (see :func:`asha_rungs`)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=EPOCH_KEY,
        max_t=epochs - 1,
        grace_period=settings.scheduler.grace_period,
        reduction_factor=settings.scheduler.reduction_factor,
        stop_last_trials=False,
    )
