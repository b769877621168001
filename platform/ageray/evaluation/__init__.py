"""Evaluation: what a trained model gets right and wrong, and how that is shown.

* ``reports``   every Table IX row and routing rule of a model on a split (``build_report``,
                ``evaluate_model``, ``evaluate_to_dir``), the gap each rule closes
* ``tables``    the report's tables and plots (Table IX markdown, per-age MAE, routing
                usage, CCS), PNGs the jobs log to MLflow
* ``fairness``  the age error per gender, race and race x gender group
* ``traits``    gender and race as answers: accuracy and confusion matrices
* ``crossval``  the folds of a protocol summarised: mean, spread, pooled

Why one package: these sit on one floor of the house (above the inference path and the
metrics, below training, tuning and serving), and a newcomer looking for "how is a model
judged" finds all of it here. The metric definitions themselves stay in ``ageray.metrics``
(the stable names other code and checks rely on, ARCHITECTURE.md).
"""

from .reports import (
    ROW_ORDER,
    RULE_ROWS,
    build_report,
    eval_config,
    evaluate_for_config,
    evaluate_model,
    evaluate_to_dir,
    format_table,
    gap_closed,
)

__all__ = [
    "ROW_ORDER",
    "RULE_ROWS",
    "build_report",
    "eval_config",
    "evaluate_for_config",
    "evaluate_model",
    "evaluate_to_dir",
    "format_table",
    "gap_closed",
]
