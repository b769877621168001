"""A search's results: the GLAE Table III / IV style table (Markdown and CSV) of its trial
records, the best configuration as a recipe, and the files and closing summary a search
leaves behind.

Plain Python over plain data, so every rule here is tested without Ray.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ageray.config import Config, config_from_dict, dump_yaml, get_dotted, set_dotted
from ageray.redaction import redact
from ageray.tuning.metric import EPOCH_KEY, MetricSpec, finite_number
from ageray.tuning.plots import plot_curves, plot_metric_vs_params
from ageray.tuning.space import BINDINGS, SearchSpace
from ageray.tuning.trial_records import TrialRecord, best_record

__all__ = [
    "Column",
    "SearchOutcome",
    "Table",
    "best_recipe",
    "build_table",
    "format_summary",
    "write_best_recipe",
    "write_csv",
    "write_results",
]


@dataclass
class Column:
    """One column of a :class:`Table`: the row key, its header, and how values are shown."""

    key: str
    header: str
    kind: str = "text"  # text | metric | params | int


@dataclass
class Table:
    """Rows of plain values; ``columns`` say how to show them."""

    columns: list[Column]
    rows: list[dict[str, Any]]
    best_trial: str | None = None
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """A GitHub-flavoured Markdown table; the best value of each metric column in bold
        (as GLAE's tables)."""
        best: dict[str, float] = {}
        for c in self.columns:
            if c.kind != "metric":
                continue
            vals = [r[c.key] for r in self.rows if finite_number(r.get(c.key)) is not None]
            if vals:
                best[c.key] = max(vals) if c.key.endswith("aar") else min(vals)
        lines = []
        if self.title:
            lines += [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(c.header for c in self.columns) + " |")
        lines.append(
            "| " + " | ".join("---:" if c.kind != "text" else "---" for c in self.columns) + " |"
        )
        for r in self.rows:
            cells = []
            for c in self.columns:
                text = _fmt(r.get(c.key), c.kind)
                if c.key in best and finite_number(r.get(c.key)) == best[c.key]:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if kind == "metric" and finite_number(value) is not None:
        return f"{float(value):.3f}"
    if kind == "params" and finite_number(value) is not None:
        return f"{float(value) / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_table(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    epochs: int,
    bindings: Mapping[str, Any] | None = None,
) -> Table:
    """GLAE Table III / IV style: the searched values -> MAE, CMAE (at each trial's best
    epoch by the search metric), parameter count, epochs run, status.

    Paired parameters written as expressions get a label column (``(r, r/2)``) beside the
    concrete values, and the bindings they used (``r``) a column of their own, as Table III
    shows r, kernel size and stride.
    """
    cols, used_bindings = _param_columns(space)
    cols += [Column("val_mae", "MAE", "metric"), Column("val_cmae", "CMAE", "metric")]
    if spec.name == "aar":
        cols.append(Column("val_aar", "AAR", "metric"))
    if spec.derived:
        cols.append(Column(spec.key, spec.label, "metric"))
    extra_keys = _final_keys(records)
    cols += [Column(k, k, "metric") for k in extra_keys]
    cols += [
        Column("num_params", "params", "params"),
        Column("epochs_run", f"epochs (of {epochs})", "int"),
        Column("status", "status"),
    ]
    best = best_record(records, spec)
    rows = []
    for rec in records:
        row: dict[str, Any] = {"trial": rec.trial_id, "trial_id": rec.trial_id}
        for p in space.params:
            if p.name in rec.config:
                row[f"label:{p.name}"] = "(" + str(rec.config[p.name]).replace(",", ", ") + ")"
        for n in used_bindings:
            row[f"bind:{n}"] = (bindings or {}).get(n)
        row.update(rec.overrides)
        row.update(_result_cells(rec, spec, epochs, extra_keys))
        if best is not None and rec.trial_id == best.trial_id:
            row["trial"] = f"{rec.trial_id} (best)"
        rows.append(row)
    return Table(cols, rows, best.trial_id if best else None)


def _param_columns(space: SearchSpace) -> tuple[list[Column], list[str]]:
    """The trial column, the bindings' columns, then each searched key's (with a label
    column before a paired parameter written as expressions); and the bindings used."""
    cols: list[Column] = []
    used_bindings: list[str] = []
    for p in space.params:
        has_expr = p.discrete and any(
            isinstance(x, str) for v in p.values for x in (v if p.paired else (v,))
        )
        if p.paired and has_expr:
            short = ", ".join(k.rsplit(".", 1)[-1] for k in p.keys)
            cols.append(Column(f"label:{p.name}", f"({short})"))
        if has_expr:
            for name in BINDINGS:
                if name not in used_bindings:
                    used_bindings.append(name)
        for k in p.keys:
            cols.append(Column(k, k.rsplit(".", 1)[-1], "text"))
    bind_cols = [Column(f"bind:{n}", n) for n in used_bindings]
    return [Column("trial", "trial"), *bind_cols, *cols], used_bindings


def _final_keys(records: Sequence[TrialRecord]) -> list[str]:
    """Stage 2 and the test evaluation (when the search ran them): the routed answer, as
    GLAE reports it; the CSV and summary.json carry the same columns. (A model without a
    balanced head has no routed answer: then its vanilla one.)"""
    finals = [rec.final for rec in records if rec.final]
    extra_keys = []
    for prefix in ("stage2_val", "test"):
        for row in ("routed", "vanilla"):
            keys = [f"{prefix}_{row}_mae", f"{prefix}_{row}_cmae"]
            if any(keys[0] in f for f in finals):
                extra_keys += keys
                break
    return extra_keys


def _result_cells(
    rec: TrialRecord, spec: MetricSpec, epochs: int, extra_keys: Sequence[str]
) -> dict[str, Any]:
    """A trial's row cells after its values: the metrics at its best epoch, the final ones,
    its size, progress, status and MLflow run."""
    row: dict[str, Any] = {}
    b = rec.best_row(spec)
    if b is not None:
        for k in ("val_mae", "val_cmae", "val_aar"):
            row[k] = finite_number(b.get(k))
        row[spec.key] = spec.value(b)
        row["best_epoch"] = int(b[EPOCH_KEY]) if finite_number(b.get(EPOCH_KEY)) else None
    if rec.final:
        for k in extra_keys:
            row[k] = finite_number(rec.final.get(k))
    row["num_params"] = rec.num_params
    row["epochs_run"] = rec.epochs_run
    row["status"] = rec.status(epochs)
    row["failures"] = rec.failures
    row["error"] = rec.error
    row["run_id"] = rec.run_id
    return row


def write_csv(path: str | os.PathLike[str], table: Table) -> Path:
    """Every column of ``table`` plus raw extras (best epoch, failures, error, MLflow run)."""
    keys = [c.key for c in table.columns if c.key != "trial"]
    keys = ["trial_id", *keys, "best_epoch", "failures", "error", "run_id"]
    seen: list[str] = []
    for k in keys:
        if k not in seen:
            seen.append(k)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([k.replace("label:", "label_").replace("bind:", "") for k in seen])
        for r in table.rows:
            w.writerow(["" if r.get(k) is None else r.get(k) for k in seen])
    return out


def best_recipe(base: Mapping[str, Any], overrides: Mapping[str, Any], name: str) -> Config:
    """The search's base config (recipe + space ``fixed`` + ``--set``, paths as the user
    wrote them) with the best trial's values, named ``name``: what ``jobs.train`` should
    train next."""
    data = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_dotted(data, key, value)
    set_dotted(data, "run.name", name)
    return config_from_dict(data)


def write_best_recipe(path: str | os.PathLike[str], cfg: Config, header: Sequence[str]) -> Path:
    """``dump_yaml`` of ``cfg`` below ``# header`` lines; ``load_config`` reads it back."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header) + dump_yaml(cfg)
    out.write_text(text)
    return out


# ------------------------------------------------------------------ a search's outcome


@dataclass
class SearchOutcome:
    """What a search leaves: its trials' records, the table, the best trial and recipe, the
    files written, and whether it was interrupted (then ``--resume`` continues it)."""

    name: str
    experiment_path: str
    results_dir: Path
    records: list[TrialRecord]
    table: Table | None
    metric: MetricSpec
    epochs: int
    best: TrialRecord | None = None
    best_recipe: Path | None = None
    interrupted: bool = False
    resumed: bool = False
    elapsed_s: float = 0.0
    concurrency: str = ""
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {"completed": 0, "stopped": 0, "failed": 0, "unfinished": 0}
        for r in self.records:
            out[r.status(self.epochs)] += 1
        out["retried"] = sum(1 for r in self.records if r.failures > 0)
        return out


def write_results(
    outcome: SearchOutcome,
    space: SearchSpace,
    user_base: Mapping[str, Any],
    runtime_base: Mapping[str, Any],
) -> None:
    """Table (Markdown, CSV), plots, the best recipe and ``summary.json`` in
    ``results_dir``; fills ``outcome.table``, ``best``, ``best_recipe`` and ``files``."""
    spec, epochs, out = outcome.metric, outcome.epochs, outcome.results_dir
    out.mkdir(parents=True, exist_ok=True)
    bindings = {n: get_dotted(runtime_base, k) for n, k in BINDINGS.items()}
    table = build_table(outcome.records, space, spec, epochs, bindings)
    c = outcome.counts()
    table.title = (
        f"Search {outcome.name}: {spec.label} on the validation split at each trial's best "
        f"epoch ({spec.mode}); {len(outcome.records)} trials"
    )
    table.notes = [
        f"{c['completed']} completed, {c['stopped']} stopped early by ASHA, {c['failed']} "
        f"failed, {c['unfinished']} unfinished; {c['retried']} retried after a failure. "
        "params: parameter count of the stage-1 model."
    ]
    files = {
        "table_md": out / "table.md",
        "table_csv": out / "table.csv",
        "plot": out / "metric_vs_params.png",
        "curves": out / "curves.png",
        "summary": out / "summary.json",
        "space": out / "space.yaml",
    }
    files["table_md"].write_text(table.markdown())
    write_csv(files["table_csv"], table)
    plot_metric_vs_params(outcome.records, space, spec, epochs, files["plot"])
    plot_curves(outcome.records, space, spec, files["curves"])
    files["space"].write_text(yaml.safe_dump(space.raw, sort_keys=False))
    best = best_record(outcome.records, spec)
    if best is not None:
        files["best_recipe"] = _write_best(outcome, best, user_base, out / "best_recipe.yaml")
    summary = {
        "name": outcome.name,
        "metric": {"key": spec.key, "mode": spec.mode, "label": spec.label},
        "epochs": epochs,
        "counts": c,
        "best_trial": best.trial_id if best else None,
        "interrupted": outcome.interrupted,
        "trials": [
            {k: v for k, v in row.items() if not k.startswith(("label:", "bind:"))}
            for row in table.rows
        ],
    }
    files["summary"].write_text(json.dumps(summary, indent=2, default=str))
    outcome.table, outcome.best, outcome.files = table, best, files
    outcome.best_recipe = files.get("best_recipe")


def _write_best(
    outcome: SearchOutcome, best: TrialRecord, user_base: Mapping[str, Any], path: Path
) -> Path:
    """The best trial's recipe, headed by what the search found and how to train it."""
    spec, epochs = outcome.metric, outcome.epochs
    recipe = best_recipe(user_base, best.overrides, f"{outcome.name}-best")
    value = best.best_value(spec)
    return write_best_recipe(
        path,
        recipe,
        [
            f"Best configuration of search '{outcome.name}' (trial {best.trial_id}):",
            "  " + ", ".join(f"{k}={v}" for k, v in best.overrides.items()),
            f"  {spec.key} {value:.4f} at epoch "
            f"{(best.best_row(spec) or {}).get(EPOCH_KEY, '?')} of {epochs}",
            "Train it: python -m jobs.train --config <this file>",
        ],
    )


def format_summary(o: SearchOutcome, command: str = "python -m tuning.search") -> str:
    """The closing lines of a search."""
    c = o.counts()
    m, s = divmod(int(o.elapsed_s), 60)
    lines = []
    if o.table is not None:
        lines += ["", o.table.markdown()]
    head = "interrupted" if o.interrupted else "finished"
    lines.append(
        f"[tune] search {o.name!r} {head} in {m}m{s:02d}s: {len(o.records)} trials "
        f"({c['completed']} completed, {c['stopped']} stopped early by ASHA, {c['failed']} "
        f"failed, {c['unfinished']} unfinished; {c['retried']} retried)"
    )
    lines.append(f"  metric:  {o.metric.key} = {o.metric.label} ({o.metric.mode})")
    if o.best is not None:
        row = o.best.best_row(o.metric) or {}
        values = ", ".join(f"{k}={v}" for k, v in o.best.overrides.items())
        lines.append(
            f"  best:    trial {o.best.trial_id}: {values} -> {o.metric.key} "
            f"{o.best.best_value(o.metric):.4f} (epoch {row.get(EPOCH_KEY, '?')}/{o.epochs})"
        )
    for rec in o.records:
        if rec.status(o.epochs) == "failed":
            lines.append(
                f"  FAILED:  trial {rec.trial_id} ({rec.failures} attempts): {rec.error or '?'}"
            )
    if o.files:
        lines.append(f"  table:   {o.files['table_md']} (+ table.csv)")
        lines.append(f"  plots:   {o.files['plot']}, {o.files['curves'].name}")
    if o.best_recipe:
        lines.append(f"  recipe:  {o.best_recipe}")
        lines.append(f"           python -m jobs.train --config {o.best_recipe}")
    if o.parent_run_id:
        lines.append(f"  MLflow:  parent run {o.parent_run_id} ({redact(o.tracking_uri or '')})")
    lines.append(f"  Tune:    {o.experiment_path}")
    if o.interrupted:
        lines.append(f"  resume:  {command} ... --name {o.name} --resume")
    return "\n".join(lines)
