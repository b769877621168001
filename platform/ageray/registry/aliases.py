"""The model registry's aliases: where one points, moving it, and the record of why.

Why apart from :mod:`ageray.tracking`: tracking logs runs and registers models; promotion
(``jobs.promote``) and Serve's alias following only ask where an alias points and move it.
``champion`` moves only through :func:`move_alias`, which keeps ``previous-<alias>`` on the
old version so that a rollback is one alias move.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ageray.tracking import Tracker

__all__ = ["alias_version", "log_comparison", "move_alias", "parse_model_uri"]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>@<alias>`` -> (name, None, alias); ``models:/<name>/<version>`` ->
    (name, version, None); ``models:/<name>`` -> (name, None, None)."""
    if not uri.startswith("models:/"):
        raise ValueError(
            f"{uri!r} is not a registry URI: use models:/<name>/<version> or models:/<name>@<alias>"
        )
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, None, alias
    name, _, version = ref.partition("/")
    return name, version or None, None


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` of registered model ``name`` points to, or None when the
    alias (or the model) does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(
    client: Any, name: str, alias: str, version: str, *, previous_alias: str | None = None
) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed to before (None if
    new). ``previous_alias`` (e.g. ``previous-champion``) is moved to that old version, so
    a rollback is one alias move away."""
    before = alias_version(client, name, alias)
    client.set_registered_model_alias(name, alias, str(version))
    if previous_alias and before is not None and before != str(version):
        client.set_registered_model_alias(name, previous_alias, before)
    return before


def log_comparison(
    tracker: Tracker,
    run_id: str | None,
    *,
    table_md: str,
    decision: Mapping[str, Any],
    plot: str | Path | None = None,
    reports: Mapping[str, str | Path] | None = None,
) -> None:
    """A promotion's record in one MLflow run: the comparison table (``comparison.md``),
    the decision (``decision.json``, and ``promoted`` / the compared values as metrics),
    the per-age plot and each side's evaluation folder (``reports/<side>/``)."""
    if not (tracker.enabled and run_id):
        return
    tracker.client.log_text(run_id, table_md, "comparison.md")
    tracker.log_dict(run_id, dict(decision), "decision.json")
    numbers = {
        "promoted": 1.0 if decision.get("promote") else 0.0,
        "candidate_score": decision.get("candidate"),
        "champion_score": decision.get("champion"),
        "improvement": decision.get("improvement"),
    }
    tracker.log_metrics(
        run_id, {k: float(v) for k, v in numbers.items() if isinstance(v, int | float)}
    )
    if plot is not None:
        tracker.log_artifact(run_id, plot)
    for side, folder in (reports or {}).items():
        tracker.log_artifact(run_id, folder, f"reports/{side}")
