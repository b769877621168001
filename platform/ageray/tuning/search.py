"""A search from start to finish: its options (what ``python -m tuning.search`` takes), its
plan (space, metric, base config, storage) and the run: Tune's ``Tuner`` over
:func:`~ageray.tuning.trial.trial_driver`, a resume from Tune's saved state, the results
written and the MLflow runs settled.

Ray is imported inside the functions that run the search, so ``ageray.tuning`` (and a dry
run's planning rules) import without it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ageray.config import Config, ConfigError, config_from_dict, load_config, to_dict
from ageray.tuning.algorithms import (
    asha_rungs,
    make_scheduler,
    make_searcher,
    replay_asha,
    tune_param_space,
)
from ageray.tuning.metric import MetricSpec, TuningError
from ageray.tuning.resources import (
    max_concurrent_trials,
    release_orphaned_placement_groups,
    trial_resources,
)
from ageray.tuning.results import SearchOutcome, write_results
from ageray.tuning.runs import close_search_run, open_search_run, settle_trial_runs
from ageray.tuning.space import (
    SearchSettings,
    SearchSpace,
    check_settings,
    check_space_values,
    grid_size,
    load_space,
)
from ageray.tuning.trial import TrialContext, trial_driver
from ageray.tuning.trial_records import collect_records

__all__ = ["SearchOptions", "run_search"]


@dataclass
class SearchOptions:
    """Everything ``python -m tuning.search`` takes (None: the space file's value)."""

    space: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str | None = None
    resume: bool = False
    retry_errored: bool = False
    num_samples: int | None = None
    metric: str | None = None
    metric_weight: float | None = None
    algorithm: str | None = None
    epochs: int | None = None
    stage2: bool | None = None
    evaluate: bool | None = None
    scheduler: str | None = None
    grace_period: int | None = None
    reduction_factor: float | None = None
    max_concurrent: int | None = None
    driver_cpus: float | None = None
    tracking: bool = True
    dry_run: bool = False


def _apply_cli(space: SearchSpace, o: SearchOptions) -> SearchSpace:
    s = copy.deepcopy(space.settings)
    for attr, value in (
        ("num_samples", o.num_samples),
        ("metric", o.metric),
        ("metric_weight", o.metric_weight),
        ("algorithm", o.algorithm),
        ("epochs", o.epochs),
        ("stage2", o.stage2),
        ("evaluate", o.evaluate),
        ("max_concurrent", o.max_concurrent),
        ("driver_cpus", o.driver_cpus),
    ):
        if value is not None:
            setattr(s, attr, value)
    if o.scheduler is not None:
        s.scheduler.name = o.scheduler
    if o.grace_period is not None:
        s.scheduler.grace_period = o.grace_period
    if o.reduction_factor is not None:
        s.scheduler.reduction_factor = o.reduction_factor
    check_settings(s, "command line")
    return dataclasses.replace(space, settings=s)


def _base_config(o: SearchOptions, space: SearchSpace) -> Config:
    """Recipe, then the space's ``fixed`` values and ``epochs``, then ``--set`` (the
    command line has the last word, as in every job)."""
    for item in o.overrides:
        key = item.split("=", 1)[0].strip()
        if key in space.searched_keys:
            raise TuningError(
                f"--set {item}: '{key}' is searched by {space.source}; remove it from the "
                "space (params) or from the command line"
            )
    early = [f"{k}={json.dumps(v)}" for k, v in space.fixed.items()]
    if space.settings.epochs is not None:
        early.append(f"train.stage1.epochs={space.settings.epochs}")
    try:
        return load_config(o.config, [*early, *o.overrides])
    except ConfigError as exc:
        raise TuningError(f"config: {exc}") from exc


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _definition(base: Mapping[str, Any], space: SearchSpace, spec: MetricSpec) -> dict[str, Any]:
    """What makes a search itself (compared on --resume): not how wide it runs."""
    settings = dataclasses.asdict(space.settings)
    for key in ("max_concurrent", "driver_cpus"):
        settings.pop(key)
    return {
        "format": "ageray-search/1",
        "config": json.loads(json.dumps(base, default=str)),
        "space": {k: v for k, v in space.raw.items() if k != "search"},
        "settings": json.loads(json.dumps(settings, default=str)),
        "metric": {"name": spec.name, "weight": spec.weight},
    }


def _in_todays_terms(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A search definition written by an earlier version, its config loaded and written back
    by today's code: keys added since take their defaults and retired keys drop out, so a
    resume is refused only for a real difference, not for a release in between."""
    out = dict(saved)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # retired keys: said once when the search started
            cfg = config_from_dict(copy.deepcopy(saved["config"]))
    except (ConfigError, KeyError, TypeError):  # not loadable any more: compare as written
        return out
    out["config"] = json.loads(json.dumps(to_dict(cfg), default=str))
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix]


@dataclass
class _Plan:
    """A search resolved from its options: what runs, where, and with which base config."""

    space: SearchSpace
    spec: MetricSpec
    name: str
    epochs: int
    total: int
    rungs: list[int]
    user_base: dict[str, Any]  # recipe + fixed + --set, paths as written: the best recipe's base
    runtime_cfg: Config  # the same with absolute paths: what trials start from
    search_cfg: Config  # runtime_cfg named after the search: its MLflow parent run
    search_root: str
    experiment_path: str
    results_dir: Path

    @property
    def settings(self) -> SearchSettings:
        return self.space.settings

    @property
    def use_asha(self) -> bool:
        return self.settings.scheduler.name == "asha" and bool(self.rungs)

    @property
    def runtime_base(self) -> dict[str, Any]:
        return to_dict(self.runtime_cfg)


def _plan(o: SearchOptions) -> _Plan:
    from ageray.training.driver import absolutize_paths, local_run_dir

    space = _apply_cli(load_space(o.space), o)
    cfg = _base_config(o, space)
    name = o.name or f"{cfg.run.name}-{Path(o.space).stem}"
    if not _NAME.match(name):
        raise TuningError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    runtime_cfg = absolutize_paths(cfg)
    check_space_values(space, to_dict(runtime_cfg))
    search_root = f"{runtime_cfg.run.storage_path.rstrip('/')}/{name}"
    named = dataclasses.replace(runtime_cfg, run=dataclasses.replace(runtime_cfg.run, name=name))
    sch = space.settings.scheduler
    epochs = cfg.train.stage1.epochs
    return _Plan(
        space=space,
        spec=space.settings.metric_spec(),
        name=name,
        epochs=epochs,
        total=grid_size(space),
        rungs=asha_rungs(epochs, sch.grace_period, sch.reduction_factor),
        user_base=to_dict(cfg),
        runtime_cfg=runtime_cfg,
        search_cfg=named,
        search_root=search_root,
        experiment_path=f"{search_root}/tune",
        results_dir=local_run_dir(named) / "results",
    )


def _print_plan(p: _Plan, need: Mapping[str, float], why: str) -> None:
    s = p.settings
    _say(
        f"search {p.name!r}: {p.total} trial(s), {s.algorithm} search over "
        f"{len(p.space.params)} parameter(s) from {p.space.source}"
    )
    for param in p.space.params:
        _say(f"  {param.name}: {param.describe()}")
    _say(
        f"  metric: {p.spec.key} ({p.spec.label}, {p.spec.mode}) on the validation split, "
        f"per stage-1 epoch; {p.epochs} epoch(s) per trial"
        + (", then stage 2" if s.stage2 else "")
        + (", then test evaluation" if s.evaluate else "")
    )
    if p.use_asha:
        _say(
            f"  scheduler: ASHA, cuts at epoch(s) {p.rungs}, reduction factor "
            f"{s.scheduler.reduction_factor:g}"
        )
    else:
        _say("  scheduler: FIFO (no early stopping)")
    _say(f"  concurrency: {why}; each trial: {dict(need)}")
    _say(f"  storage: {p.search_root}")


def _check_resume(p: _Plan, o: SearchOptions, tune_path: str, fs: Any) -> bool:
    """Whether the search exists (and may be resumed); records its definition."""
    from ray import tune

    from ageray.data import storage

    exists = tune.Tuner.can_restore(tune_path, storage_filesystem=fs)
    if exists and not o.resume:
        raise TuningError(
            f"search {p.name!r} already exists at {p.experiment_path}: pass --resume to "
            "continue it (finished trials are kept) or --name for a new search"
        )
    definition = _definition(p.user_base, p.space, p.spec)
    definition_path = storage.join(p.search_root, "search.json")
    if exists and storage.exists(definition_path):
        changed = _diff(_in_todays_terms(storage.read_json(definition_path)), definition)
        if changed:
            raise TuningError(
                f"--resume {p.name!r}: the recipe, --set values or space differ from the ones "
                f"the search started with ({', '.join(changed[:8])}); resume with the same "
                "arguments, or start a new search with --name"
            )
    if o.resume and not exists:
        _say(f"no earlier search {p.name!r} at {p.experiment_path}: starting a new one")
    storage.write_json(definition_path, definition)
    return exists


def _make_tuner(
    p: _Plan,
    o: SearchOptions,
    trainable: Any,
    callbacks: list[Any],
    monitor: Any,
    concurrency: int,
    resume: bool,
    tune_path: str,
    fs: Any,
) -> Any:
    """A new Tuner, or the saved one restored with this process's callbacks and ASHA's
    rungs refilled."""
    from ray import tune

    if not resume:
        return tune.Tuner(
            trainable,
            param_space=tune_param_space(p.space),
            tune_config=tune.TuneConfig(
                metric=p.spec.key,
                mode=p.spec.mode,
                search_alg=make_searcher(p.space, concurrency),
                scheduler=make_scheduler(p.settings, p.epochs) if p.use_asha else None,
                num_samples=p.settings.num_samples,
                max_concurrent_trials=concurrency if p.settings.algorithm == "optuna" else None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=tune_path.rsplit("/", 1)[0],
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=1),
                callbacks=callbacks,
                verbose=1,
            ),
        )
    _say(
        f"resuming search {p.name!r}: finished trials are kept, unfinished ones restart "
        "from their last Train checkpoint" + ("; errored trials restart" if o.retry_errored else "")
    )
    tuner = tune.Tuner.restore(
        tune_path,
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=o.retry_errored,
        storage_filesystem=fs,
    )
    # The pickled RunConfig brings the first run's callbacks; progress and the janitor must
    # be this process's own. The pickled scheduler has empty rungs: refill them.
    previous = collect_records(_saved_analysis(tune_path, fs), p.space, p.runtime_base)
    monitor.seed(previous)
    internal = getattr(tuner, "_local_tuner", None)
    if internal is not None and hasattr(internal, "get_run_config"):
        internal.get_run_config().callbacks = callbacks
    tune_cfg = getattr(internal, "_tune_config", None)
    if p.use_asha and replay_asha(getattr(tune_cfg, "scheduler", None), previous, p.spec):
        _say(f"ASHA rungs refilled from {len(previous)} earlier trial(s)")
    return tuner


def run_search(o: SearchOptions, extra_callbacks: Sequence[Any] | None = None) -> SearchOutcome:
    """Run (or resume) a search and write its results; see ``python -m tuning.search``.

    ``extra_callbacks`` are Tune callbacks added to the search's own (progress, janitor).
    """
    from ageray.training.driver import storage_args
    from ageray.tuning.callbacks import SearchMonitor

    t0 = time.time()
    p = _plan(o)
    n_conc, why = _concurrency(p, o)
    if o.dry_run:
        return SearchOutcome(
            p.name, p.experiment_path, p.results_dir, [], None, p.spec, p.epochs, concurrency=why
        )

    fs_args = storage_args(p.search_root)
    fs = fs_args.get("storage_filesystem")
    tune_path = f"{fs_args['storage_path']}/tune" if fs else p.experiment_path
    exists = _check_resume(p, o, tune_path, fs)
    tracker, parent = open_search_run(
        p.search_cfg,
        enabled=o.tracking,
        resume=exists,
        settings=p.settings,
        space=p.space,
        spec=p.spec,
        concurrency=n_conc,
    )
    if parent:
        _say(f"  MLflow: {tracker.run_url(parent)}")
    trainable = _trainable(p, tracker=tracker, parent=parent)
    monitor = SearchMonitor(p.space.raw, p.spec.name, p.spec.weight, p.epochs, p.total)
    callbacks = [monitor, *(extra_callbacks or [])]
    release_orphaned_placement_groups()  # leftovers of an interrupted search in this job
    tuner = _make_tuner(p, o, trainable, callbacks, monitor, n_conc, exists, tune_path, fs)
    # fit's ResultGrid holds in-memory statuses (there an interrupted trial reads
    # TERMINATED, like one ASHA stopped); the saved experiment state tells them apart.
    tuner.fit()
    release_orphaned_placement_groups()
    outcome = _outcome(p, tune_path, fs, resumed=exists, why=why, tracker=tracker, parent=parent)
    settle_trial_runs(tracker, p.name, outcome.records, p.epochs)
    write_results(outcome, p.space, p.user_base, p.runtime_base)
    outcome.elapsed_s = time.time() - t0
    close_search_run(tracker, parent, outcome)
    return outcome


def _concurrency(p: _Plan, o: SearchOptions) -> tuple[int, str]:
    """Start (or join) Ray, make sure one trial fits the cluster (or that it grows to fit it)
    and print the plan; how many trials run at once, and why that many."""
    import ray

    from ageray.training.capacity import ResourceError, ensure_resources
    from ageray.training.driver import init_ray

    init_ray(p.runtime_cfg)
    try:  # one trial must fit the cluster (or the cluster grow to fit it) before any starts
        autoscaling = ensure_resources(
            p.runtime_cfg, driver_cpus=p.settings.driver_cpus, wait=not o.dry_run, log=_say
        )
    except ResourceError as exc:
        raise TuningError(str(exc)) from exc
    need = trial_resources(p.runtime_cfg.ray, p.settings.driver_cpus)
    n_conc, why = max_concurrent_trials(
        ray.cluster_resources(), need, override=p.settings.max_concurrent, autoscaling=autoscaling
    )
    _print_plan(p, need, why)
    return n_conc, why


def _outcome(
    p: _Plan,
    tune_path: str,
    fs: Any,
    *,
    resumed: bool,
    why: str,
    tracker: Any,
    parent: str | None,
) -> SearchOutcome:
    """The search's trials as Tune saved them (not fit's in-memory statuses)."""
    records = collect_records(_saved_analysis(tune_path, fs), p.space, p.runtime_base)
    # Interrupted: a trial did not end, or the searcher had not yet made every trial.
    unfinished = any(r.status(p.epochs) == "unfinished" for r in records)
    return SearchOutcome(
        name=p.name,
        experiment_path=p.experiment_path,
        results_dir=p.results_dir,
        records=records,
        table=None,
        metric=p.spec,
        epochs=p.epochs,
        interrupted=unfinished or len(records) < p.total,
        resumed=resumed,
        concurrency=why,
        parent_run_id=parent,
        tracking_uri=tracker.uri if tracker.enabled else None,
    )


def _trainable(p: _Plan, *, tracker: Any, parent: str | None) -> Any:
    """Tune's trainable: :func:`trial_driver` bound to the search's ``TrialContext``, with
    the driver's CPUs reserved."""
    from ray import tune

    ctx = TrialContext(
        search=p.name,
        base=p.runtime_base,
        space=p.space.raw,
        metric=p.spec.name,
        metric_weight=p.spec.weight,
        tracking_uri=tracker.uri if tracker.enabled else None,
        parent_run_id=parent,
        stage2=p.settings.stage2,
        evaluate=p.settings.evaluate,
    )
    return tune.with_resources(
        tune.with_parameters(trial_driver, ctx=ctx.to_dict()), {"cpu": p.settings.driver_cpus}
    )


def _say(text: str) -> None:
    print(f"[tune] {text}", flush=True)


def _trial_dirname(trial: Any) -> str:
    """A trial's folder is its id (the Train run inside it is ``<search>/<trial id>``).
    Tune pickles this function into its saved state by module path: keep its name, and
    ``ageray.tuning._trial_dirname`` (the path before the package split) resolvable."""
    return str(trial.trial_id)


def _saved_analysis(path: str, fs: Any) -> Any:
    """The experiment as Tune saved it (statuses included: RUNNING for a trial an
    interruption cut off, which a resume restarts)."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(path, storage_filesystem=fs)
