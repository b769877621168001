"""The search's two plots: each trial's best metric against its searched values, and the
metric per epoch per trial (where ASHA cut trials is visible). Written as PNG beside the
table and logged to the search's MLflow run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ageray.tuning.metric import EPOCH_KEY, MetricSpec
from ageray.tuning.space import ParamSpec, SearchSpace
from ageray.tuning.trial_records import TrialRecord

__all__ = ["plot_curves", "plot_metric_vs_params"]


def plot_metric_vs_params(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    epochs: int,
    path: str | os.PathLike[str],
) -> Path:
    """One panel per searched parameter: each trial's best metric against its value
    (categorical axis for discrete values, log axis for log-uniform ones); early-stopped
    trials are drawn hollow, so a reader sees what ASHA cut."""
    from ageray.evaluation.tables import pyplot, save_figure

    plt = pyplot()

    params = space.params or [ParamSpec("(none)", ("(none)",), "choice", ("-",))]
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs, ys, hollow = [], [], []
        ticks = p.tune_values() if p.discrete else None
        for rec in records:
            v = rec.best_value(spec)
            if v is None or p.name not in rec.config:
                continue
            x = rec.config[p.name]
            xs.append(ticks.index(x) if ticks is not None and x in ticks else float(x))
            ys.append(v)
            hollow.append(rec.status(epochs) != "completed")
        for h, style in ((False, {"color": "C0"}), (True, {"facecolors": "none", "color": "C3"})):
            pts = [(x, y) for x, y, hh in zip(xs, ys, hollow) if hh == h]
            if pts:
                label = "stopped early" if h else "completed"
                ax.scatter([a for a, _ in pts], [b for _, b in pts], label=label, **style)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels([str(t) for t in ticks], rotation=30 if len(ticks) > 4 else 0)
        elif p.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(p.name.replace(",", ",\n"))
        ax.set_ylabel(f"val {spec.label} ({spec.mode})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{spec.label} at each trial's best epoch")
    return save_figure(fig, path)


def plot_curves(
    records: Sequence[TrialRecord],
    space: SearchSpace,
    spec: MetricSpec,
    path: str | os.PathLike[str],
) -> Path:
    """The metric per epoch, one line per trial: where ASHA cut trials is visible."""
    from ageray.evaluation.tables import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for rec in records:
        pts = [(int(r[EPOCH_KEY]), spec.value(r)) for r in rec.history]
        pts = [(e, v) for e, v in pts if v is not None]
        if not pts:
            continue
        ax.plot(*zip(*sorted(pts)), marker="o", label=space.label(rec.config) or rec.trial_id)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {spec.label}")
    ax.grid(alpha=0.3)
    if len(records) <= 12:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
