"""Evaluation of a trained model on a split: every metric for every Table IX row the model
has (``l_base`` when a baseline is given, ``vanilla``, ``balanced``, ``routed`` = smaller KL,
``routed_bigger`` = bigger KL), routing usage per age group, per-age MAE and CCS.

Every sample of the split is predicted exactly once (the eval stream guarantees it), with the
GLAE test protocol: the image and its flip through both heads in one pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ageray import metrics as M
from ageray.config import Config

__all__ = [
    "ROW_ORDER",
    "build_report",
    "evaluate_for_config",
    "evaluate_model",
    "evaluate_to_dir",
    "format_table",
]

ROW_ORDER = ("l_base", "vanilla", "balanced", "routed_bigger", "routed")
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
) -> dict[str, Any]:
    """Predictions of every row for every sample of ``split`` (arrays keyed by name)."""
    import torch

    from ageray.data.loader import eval_loader
    from ageray.inference import collect_predictions
    from ageray.model import load_model

    model, info = load_model(model_dir)
    cfg = eval_config(info, shards, split, batch_size)
    cfg.data.num_workers = num_workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    # On GPU the stream hands uint8 images to the device and normalises them there.
    loader = eval_loader(
        cfg.data, split, rank=0, world_size=1, device=device if device.type == "cuda" else None
    )
    preds = collect_predictions(model, loader, device=device, flip=flip, amp=cfg.train.amp)
    preds["_info"] = info
    return preds


def _row_predictions(preds: dict[str, Any]) -> dict[str, np.ndarray]:
    rows: dict[str, np.ndarray] = {}
    if "vanilla_age" in preds:
        rows["vanilla"] = preds["vanilla_age"]
    if "balanced_age" in preds:
        rows["balanced"] = preds["balanced_age"]
        rows["routed"] = preds["routed_age"]
        if "bigger_age" in preds:
            rows["routed_bigger"] = preds["bigger_age"]
    return rows


def build_report(
    preds: dict[str, Any],
    *,
    shards: str,
    split: str,
    aar_groups: str = "lae",
    ccs_max: int = 10,
    baseline: dict[str, Any] | None = None,
    model_ref: str = "",
) -> dict[str, Any]:
    """The report dict written as report.json (``rows.<row>.{mae,cmae,aar,group_mae,...}``)."""
    y = np.asarray(preds["age"], dtype=np.float64)
    if len(y) == 0:
        raise ValueError(f"split {split!r} of {shards} has no samples to evaluate")
    std = preds.get("age_std")
    y_std = np.asarray(std, dtype=np.float64) if std is not None else None
    if y_std is not None and not np.all(np.isfinite(y_std) & (y_std > 0)):
        y_std = None  # epsilon-error needs an annotated std for every sample
    rows = _row_predictions(preds)
    if baseline is not None:
        # Align the baseline's predictions to this model's sample order by key.
        order = {k: i for i, k in enumerate(baseline["_keys"])}
        idx = np.array([order[k] for k in preds["_keys"]])
        rows = {"l_base": np.asarray(baseline["vanilla_age"])[idx], **rows}
    groups = [f"{lo}-{hi}" for lo, hi in TABLE_IX_GROUPS]
    out_rows: dict[str, Any] = {}
    for name, yhat in rows.items():
        summary = M.summarize(y, yhat, y_std=y_std, aar_groups=aar_groups, ccs_max=ccs_max)
        summary["group_mae"] = M.group_mae(y, yhat, groups=TABLE_IX_GROUPS)
        summary["group_cmae"] = M.group_cmae(y, yhat, groups=TABLE_IX_GROUPS)
        out_rows[name] = summary
    report: dict[str, Any] = {
        "model": model_ref,
        "shards": shards,
        "split": split,
        "num_samples": len(y),
        "groups": groups,
        "row_order": [r for r in ROW_ORDER if r in out_rows],
        "rows": out_rows,
        "per_age_mae": {name: M.per_age_mae(y, yhat) for name, yhat in rows.items()},
        "age_hist": _age_hist(y),
        "skipped": dict(preds.get("_skipped") or {}),
    }
    if "routed_choice" in preds and "balanced" in rows:
        report["routing_usage"] = M.routing_usage(y, preds["routed_choice"], groups=TABLE_IX_GROUPS)
        if "bigger_choice" in preds:
            report["routing_usage_bigger"] = M.routing_usage(
                y, preds["bigger_choice"], groups=TABLE_IX_GROUPS
            )
    report["flat_metrics"] = flat_metrics(report)
    return report


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
) -> dict[str, Any]:
    """Evaluate, then write ``report.json``, ``report.md`` and the PNG plots to ``out_dir``."""
    from ageray.report import markdown_table, write_plots
    from ageray.tracking import resolve_model_dir

    model_dir = resolve_model_dir(str(model_ref))
    preds = evaluate_model(model_dir, shards, split, flip=flip, num_workers=num_workers)
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
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(_nan_to_none(report), indent=2, default=_json_default, allow_nan=False)
    )
    (out / "report.md").write_text(markdown_table(report))
    report["plots"] = [str(p) for p in write_plots(report, out)]
    return report


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


def format_table(report: dict[str, Any]) -> str:
    from ageray.report import markdown_table

    return markdown_table(report)
