"""Hyperparameter search with Ray Tune: search spaces, the metric a search optimises, how
many trials fit the cluster, the trial driver, and the search's results (a GLAE Table III /
IV style table, plots and the best configuration as a recipe).

One module per concern:

* :mod:`~ageray.tuning.metric`     the metric (mae, cmae, aar, mae+cmae) and report enrichment
* :mod:`~ageray.tuning.space`      space files, distributions, expressions over ``r``
* :mod:`~ageray.tuning.resources`  what a trial holds, how many run at once, the PG janitor
* :mod:`~ageray.tuning.algorithms` Tune's param space, searcher, ASHA and its rungs
* :mod:`~ageray.tuning.trial_records`    one record per trial (read from Tune's saved state)
* :mod:`~ageray.tuning.results`    the table, CSV, best recipe, files and summary
* :mod:`~ageray.tuning.plots`      metric vs parameters, curves per epoch
* :mod:`~ageray.tuning.runs`       the search's MLflow parent and child runs (the policy)
* :mod:`~ageray.tuning.trial`      one trial: :func:`trial_driver`
* :mod:`~ageray.tuning.callbacks`  the Ray callbacks (imports Ray)
* :mod:`~ageray.tuning.search`     options, plan and run of a whole search

Importing this package does not import Ray: the rules are plain Python, unit-tested without
a cluster, and a machine that only edits space files needs no Ray. Only
:mod:`~ageray.tuning.callbacks` imports Ray at the top; the search and the trial driver
import it when they run.
"""

from __future__ import annotations

import importlib
from typing import Any

from ageray.tuning.algorithms import asha_rungs, replay_asha, tune_param_space
from ageray.tuning.metric import (
    DERIVED_KEY,
    EPOCH_KEY,
    FINAL_KEY,
    METRICS,
    MetricSpec,
    TuningError,
    enrich_report,
    parse_metric,
)
from ageray.tuning.plots import plot_curves, plot_metric_vs_params
from ageray.tuning.resources import (
    max_concurrent_trials,
    release_orphaned_placement_groups,
    trial_resources,
)
from ageray.tuning.results import (
    SearchOutcome,
    Table,
    best_recipe,
    build_table,
    format_summary,
    write_best_recipe,
    write_csv,
    write_results,
)
from ageray.tuning.search import SearchOptions, run_search
from ageray.tuning.space import (
    ALGORITHMS,
    BINDINGS,
    SECTIONS,
    ParamSpec,
    SchedulerSettings,
    SearchSettings,
    SearchSpace,
    check_space_values,
    eval_expression,
    grid_size,
    load_space,
    parse_space,
    resolve_sample,
    trial_config,
)
from ageray.tuning.trial import TrialContext, trial_driver
from ageray.tuning.trial_records import TrialRecord, best_record, collect_records

__all__ = [
    "ALGORITHMS",
    "BINDINGS",
    "DERIVED_KEY",
    "EPOCH_KEY",
    "FINAL_KEY",
    "METRICS",
    "SECTIONS",
    "MetricSpec",
    "ParamSpec",
    "SchedulerSettings",
    "SearchOptions",
    "SearchOutcome",
    "SearchSettings",
    "SearchSpace",
    "Table",
    "TrialContext",
    "TrialRecord",
    "TuningError",
    "asha_rungs",
    "best_recipe",
    "best_record",
    "build_table",
    "check_space_values",
    "collect_records",
    "enrich_report",
    "eval_expression",
    "format_summary",
    "grid_size",
    "load_space",
    "max_concurrent_trials",
    "parse_metric",
    "parse_space",
    "plot_curves",
    "plot_metric_vs_params",
    "release_orphaned_placement_groups",
    "replay_asha",
    "resolve_sample",
    "run_search",
    "trial_config",
    "trial_driver",
    "trial_resources",
    "tune_param_space",
    "write_best_recipe",
    "write_csv",
    "write_results",
]

#: Names that Tune states saved before the package split hold by module path
#: (``ageray.tuning.<name>``: the monitor in the pickled RunConfig, the trial folder namer in
#: the pickled TuneConfig, the report callback handed to Train) -> the module that holds them
#: now. Resolved on first access, so importing the package still does not import Ray.
MOVED = {
    "SearchMonitor": "ageray.tuning.callbacks",
    "TrialReportCallback": "ageray.tuning.callbacks",
    "_trial_dirname": "ageray.tuning.search",
}


def __getattr__(name: str) -> Any:
    """Resolve the pre-split path of a moved name (PEP 562): an old pickle still loads."""
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
