"""Evaluation of a trained model on a split: every metric for every Table IX row the model
has (``l_base`` when a baseline is given, ``vanilla``, ``balanced``, and one row per routing
rule: ``routed_bigger`` = bigger KL, ``routed`` = smaller KL (GLAE's AR), ``routed_threshold``
and ``routed_learned`` when the model carries those fitted rules, and ``oracle``, the head
closer to the true age, marked as a bound), the share of the smaller -> oracle gap each row
closes, the many/medium/few-shot MAE of deep imbalanced regression (by training images per
age), routing usage per age group, per-age MAE and CCS.

Every sample of the split is predicted exactly once (the eval stream guarantees it), with the
GLAE test protocol: the image and its flip through both heads in one pass; every rule is
scored from that one pass (``ageray.inference.collect_predictions``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ageray import metrics as M
from ageray.config import Config, RoutingConfig
from ageray.evaluation.fairness import (
    fairness_metrics,
    fairness_table,
    markdown_fairness,
    plot_fairness,
)
from ageray.evaluation.traits import markdown_traits, plot_confusions, trait_report

__all__ = [
    "ROW_ORDER",
    "build_report",
    "evaluate_for_config",
    "evaluate_model",
    "evaluate_to_dir",
    "format_table",
    "gap_closed",
]

ROW_ORDER = (
    "l_base",
    "vanilla",
    "balanced",
    "routed_bigger",
    "routed",
    "routed_threshold",
    "routed_learned",
    "oracle",
)
#: report row of each routing rule (``ageray.model.routing``); "routed" keeps its Table IX name.
RULE_ROWS = {
    "bigger": "routed_bigger",
    "smaller": "routed",
    "threshold": "routed_threshold",
    "learned": "routed_learned",
    "oracle": "oracle",
}
BOUND_ROWS = ("oracle",)  # rows that read the label: upper bounds, not models
TABLE_IX_GROUPS = M.TABLE_IX_GROUPS


def eval_config(
    model_info: dict[str, Any], shards: str, split: str, batch_size: int = 64
) -> Config:
    """A Config whose data section matches how the model was trained (size, normalisation)."""
    cfg = Config()
    data = model_info.get("data") or {}
    cfg.data = dataclasses.replace(
        cfg.data,
        shards=shards,
        test_split=split,
        image_size=int(data.get("image_size", cfg.data.image_size)),
        # model.json written without a config records normalize: null -> the default
        normalize=data.get("normalize") or cfg.data.normalize,
        eval_batch_size=batch_size,
    )
    return cfg


def evaluate_model(
    model_dir: str | Path,
    shards: str,
    split: str,
    *,
    flip: bool = True,
    batch_size: int = 64,
    num_workers: int = 1,
    routing: RoutingConfig | None = None,
) -> dict[str, Any]:
    """Predictions of every row for every sample of ``split`` (arrays keyed by name).

    ``routing`` (a ``RoutingConfig`` whose ``fit`` names rules the model does not carry):
    fit those on ``routing.fit_split`` first, in memory only -- for models saved before
    routing rules existed, or to compare settings; a trained pipeline's model carries its
    fitted rules already.
    """
    import torch

    from ageray.inference import predict_split
    from ageray.model import load_model

    model, info = load_model(model_dir)
    cfg = eval_config(info, shards, split, batch_size)
    cfg.data.num_workers = num_workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    fitted: dict[str, Any] = {}
    if routing is not None and "balanced" in model.head_names:
        missing = [n for n in routing.fit if n not in model.routers]
        if missing:
            import dataclasses as dc

            from ageray.model.routing.fitting import fit_rules

            if routing.fit_split == split:
                raise ValueError(
                    f"fitting routing rules on {split!r}, the split being evaluated, would "
                    "score them on their own training data; fit on a held-out split (val)"
                )
            keep = model.routing_rule  # fitting adds rules; it does not change what is served
            fit_cfg = dc.replace(routing, fit=missing, rule="smaller")
            val = predict_split(model, cfg.data, routing.fit_split)
            if "route_features" in val:
                fitted = fit_rules(
                    model, val["route_features"], val["age"], fit_cfg, split=routing.fit_split
                )
            model.use_rule(keep)
    preds = predict_split(model, cfg.data, split, flip=flip, amp=cfg.train.amp)
    preds["_info"] = info
    preds["_fitted_here"] = fitted
    return preds


def _row_predictions(preds: dict[str, Any]) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {}
    if "vanilla_age" in preds:
        rows["vanilla"] = preds["vanilla_age"]
    if "balanced_age" in preds:
        rows["balanced"] = preds["balanced_age"]
        for rule, row in RULE_ROWS.items():
            if f"rule_{rule}_age" in preds:
                rows[row] = preds[f"rule_{rule}_age"]
        if "routed" not in rows and "routed_age" in preds:  # no flip: nothing was routed
            rows["routed"] = preds["routed_age"]
    return rows


def gap_closed(rows: dict[str, Any], *, start: str = "routed", bound: str = "oracle") -> dict:
    """Per row, the share of the gap between ``start`` (GLAE's rule) and ``bound`` (the
    oracle) that the row closes, for MAE and CMAE: 0 = no better than eq. 11, 1 = as good as
    choosing the closer head with the label in hand, negative = worse than eq. 11."""
    if start not in rows or bound not in rows:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, r in rows.items():
        if name == bound:
            continue
        shares = {}
        for k in ("mae", "cmae"):
            gap = rows[start][k] - rows[bound][k]
            shares[k] = (rows[start][k] - r[k]) / gap if gap > 1e-12 else float("nan")
        out[name] = shares
    return out


def build_report(
    preds: dict[str, Any],
    *,
    shards: str,
    split: str,
    aar_groups: str = "lae",
    ccs_max: int = 10,
    baseline: dict[str, Any] | None = None,
    model_ref: str = "",
    train_counts: dict[Any, int] | None = None,
) -> dict[str, Any]:
    """The report dict written as report.json (``rows.<row>.{mae,cmae,aar,group_mae,...}``).

    ``train_counts`` (the training split's per-age histogram) adds each row's
    many/medium/few-shot MAE (``rows.<row>.shot_mae``) and ``shot_counts``."""
    y, y_std = _labels(preds, shards=shards, split=split)
    rows = _row_predictions(preds)
    if baseline is not None:
        # Align the baseline's predictions to this model's sample order by key.
        order = {k: i for i, k in enumerate(baseline["_keys"])}
        idx = np.array([order[k] for k in preds["_keys"]])
        rows = {"l_base": np.asarray(baseline["vanilla_age"])[idx], **rows}
    out_rows = {
        name: _row_summary(
            y, yhat, y_std=y_std, aar_groups=aar_groups, ccs_max=ccs_max, train_counts=train_counts
        )
        for name, yhat in rows.items()
    }
    report: dict[str, Any] = {
        "model": model_ref,
        "shards": shards,
        "split": split,
        "num_samples": len(y),
        "groups": [f"{lo}-{hi}" for lo, hi in TABLE_IX_GROUPS],
        "row_order": [r for r in ROW_ORDER if r in out_rows],
        "rows": out_rows,
        "per_age_mae": {name: M.per_age_mae(y, yhat) for name, yhat in rows.items()},
        "age_hist": _age_hist(y),
        "skipped": dict(preds.get("_skipped") or {}),
        "bounds": [r for r in BOUND_ROWS if r in out_rows],
        "served_rule": preds.get("_routing_rule"),
        "gap_closed": gap_closed(out_rows),
    }
    if train_counts:
        report["shot_counts"] = M.shot_counts(y, train_counts)
    if preds.get("_fitted_here"):
        report["routing_fitted_at_evaluation"] = preds["_fitted_here"]
    if "balanced" in rows:
        _add_routing_usage(report, preds, y)
    # who gets which error per gender / race; multi-task answers (fairness, traits)
    fairness = fairness_table(
        y, rows, preds.get("gender"), preds.get("race"), order=report["row_order"]
    )
    if fairness:
        report["fairness"] = fairness
    traits = trait_report(preds)
    if traits:
        report["traits"] = traits
    report["flat_metrics"] = flat_metrics(report)
    return report


def _labels(preds: dict[str, Any], *, shards: str, split: str) -> tuple[np.ndarray, Any]:
    """The true ages, and their annotated stds when every sample has one (else None: the
    epsilon-error needs a std for every sample)."""
    y = np.asarray(preds["age"], dtype=np.float64)
    if len(y) == 0:
        raise ValueError(f"split {split!r} of {shards} has no samples to evaluate")
    std = preds.get("age_std")
    y_std = np.asarray(std, dtype=np.float64) if std is not None else None
    if y_std is not None and not np.all(np.isfinite(y_std) & (y_std > 0)):
        y_std = None
    return y, y_std


def _row_summary(
    y: np.ndarray,
    yhat: np.ndarray,
    *,
    y_std: np.ndarray | None,
    aar_groups: str,
    ccs_max: int,
    train_counts: dict[Any, int] | None,
) -> dict[str, Any]:
    """One row's metrics: the summary, Table IX's per-group MAE / CMAE, the shot MAE."""
    summary = M.summarize(y, yhat, y_std=y_std, aar_groups=aar_groups, ccs_max=ccs_max)
    summary["group_mae"] = M.group_mae(y, yhat, groups=TABLE_IX_GROUPS)
    summary["group_cmae"] = M.group_cmae(y, yhat, groups=TABLE_IX_GROUPS)
    if train_counts:
        summary["shot_mae"] = M.shot_mae(y, yhat, train_counts)
    return summary


def _add_routing_usage(report: dict[str, Any], preds: dict[str, Any], y: np.ndarray) -> None:
    """Which head each rule picks per age group (GLAE Fig. 4: the smaller rule's)."""
    usage = {
        row: M.routing_usage(
            y, (preds[f"rule_{rule}_weight"] >= 0.5).astype(float), groups=TABLE_IX_GROUPS
        )
        for rule, row in RULE_ROWS.items()
        if f"rule_{rule}_weight" in preds
    }
    if usage:
        report["routing_usage_rules"] = usage
        report["routing_usage"] = usage.get("routed")  # GLAE Fig. 4: the smaller rule
        if "routed_bigger" in usage:
            report["routing_usage_bigger"] = usage["routed_bigger"]


def _age_hist(y: np.ndarray) -> dict[int, int]:
    ages, counts = np.unique(np.floor(y + 0.5).astype(int), return_counts=True)
    return {int(a): int(c) for a, c in zip(ages, counts)}


def flat_metrics(report: dict[str, Any], prefix: str = "test") -> dict[str, float]:
    """``test_<row>_<metric>`` numbers for MLflow and the registry tags."""
    out: dict[str, float] = {}
    for name, r in report["rows"].items():
        for k in ("mae", "cmae", "aar", "epsilon_error"):
            v = r.get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"{prefix}_{name}_{k}"] = float(v)
        for g, v in r["group_mae"].items():
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"{prefix}_{name}_mae_{g}"] = float(v)
        for g, v in r["group_cmae"].items():
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"{prefix}_{name}_cmae_{g}"] = float(v)
        for g, v in (r.get("shot_mae") or {}).items():
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"{prefix}_{name}_mae_{g}_shot"] = float(v)
    out.update(fairness_metrics(report.get("fairness"), prefix))
    for trait, sec in (report.get("traits") or {}).items():
        if isinstance(sec["accuracy"], float) and math.isfinite(sec["accuracy"]):
            out[f"{prefix}_{trait}_acc"] = sec["accuracy"]
    for name, shares in (report.get("gap_closed") or {}).items():
        for k, v in shares.items():
            if isinstance(v, int | float) and math.isfinite(v):
                out[f"{prefix}_{name}_gap_closed_{k}"] = float(v)
    return out


def evaluate_to_dir(
    model_ref: str | Path,
    shards: str,
    split: str,
    out_dir: str | Path,
    *,
    flip: bool = True,
    aar_groups: str = "lae",
    ccs_max: int = 10,
    baseline_ref: str | Path | None = None,
    num_workers: int = 1,
    routing: RoutingConfig | None = None,
    train_split: str = "train",
) -> dict[str, Any]:
    """Evaluate, then write ``report.json``, ``report.md`` and the PNG plots to ``out_dir``.

    ``routing``: fit the rules it lists that the model lacks, on its ``fit_split``, first
    (see :func:`evaluate_model`). ``train_split``: the split whose manifest histogram
    defines the many/medium/few shots (skipped when the manifest has no such split)."""
    from ageray.evaluation.tables import write_plots
    from ageray.inference import resolve_model_dir

    model_dir = resolve_model_dir(str(model_ref))
    preds = evaluate_model(
        model_dir, shards, split, flip=flip, num_workers=num_workers, routing=routing
    )
    baseline = None
    if baseline_ref is not None:
        baseline = evaluate_model(
            resolve_model_dir(str(baseline_ref)), shards, split, flip=flip, num_workers=num_workers
        )
    report = build_report(
        preds,
        shards=shards,
        split=split,
        aar_groups=aar_groups,
        ccs_max=ccs_max,
        baseline=baseline,
        model_ref=str(model_ref),
        train_counts=_train_counts(shards, train_split),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(_nan_to_none(report), indent=2, default=_json_default, allow_nan=False)
    )
    (out / "report.md").write_text(report_markdown(report))
    plots = write_plots(report, out) + plot_confusions(report.get("traits") or {}, out)
    fair = plot_fairness(report.get("fairness"), out / "fairness.png", **_row_style(report))
    report["plots"] = [str(p) for p in plots + ([fair] if fair else [])]
    return report


def _train_counts(shards: str, train_split: str) -> dict[Any, int] | None:
    """The training split's per-age histogram from the shards' manifest, or None."""
    from ageray.data.manifest import read_manifest

    try:
        split = (read_manifest(shards).get("splits") or {}).get(train_split) or {}
    except (FileNotFoundError, ValueError):
        return None
    return split.get("age_hist") or None


def evaluate_for_config(model_ref: str | Path, cfg: Config, out_dir: str | Path) -> dict[str, Any]:
    """:func:`evaluate_to_dir` on the run's own shards and ``eval`` settings: the evaluation
    that ends a training run (``jobs.train``, a Tune trial with ``evaluate``)."""
    return evaluate_to_dir(
        model_ref,
        cfg.data.shards,
        cfg.eval.split,
        out_dir,
        flip=cfg.eval.flip_tta,
        aar_groups=cfg.eval.aar_groups,
        ccs_max=cfg.eval.ccs_max,
        train_split=cfg.data.train_split,
    )


def _nan_to_none(o: Any) -> Any:
    """JSON has no NaN: empty groups (NaN MAE) become null in report.json."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, np.floating) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_nan_to_none(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _row_style(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    from ageray.evaluation.tables import ROW_COLORS, ROW_LABELS

    return {
        "labels": {name: ROW_LABELS.get(name, name) for name in report["rows"]},
        "colors": dict(ROW_COLORS),
    }


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the Table IX-style table, then the gender/race and fairness sections."""
    from ageray.evaluation.tables import markdown_table

    extra = markdown_traits(report.get("traits") or {})
    extra += markdown_fairness(report.get("fairness"), _row_style(report)["labels"])
    return markdown_table(report) + ("\n".join(extra) + "\n" if extra else "")


def format_table(report: dict[str, Any]) -> str:
    from ageray.evaluation.tables import markdown_table

    return markdown_table(report)
