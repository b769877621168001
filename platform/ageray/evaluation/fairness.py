"""Is the age error the same for everyone? The fairness table of an evaluation: MAE and CMAE
of every report row (each head and routing rule) per gender, per race and per race x gender
group, with the images per group and the worst/best ratio.

Why it is part of every evaluation whose split carries gender or race (UTKFace does): a model
that is good on average can be much worse for one group of people, and neither MAE nor
CMAE over the whole split would show it. The ratio is taken over the groups with at least
``min_count`` images, because a group of five faces has an MAE that says more about those
five than about the group; smaller groups stay in the table with their counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ageray import metrics as M
from ageray.data.labels import GENDERS, RACES

__all__ = [
    "FAIRNESS_BY",
    "MIN_COUNT",
    "fairness_metrics",
    "fairness_table",
    "markdown_fairness",
    "plot_fairness",
]

#: The groupings of the table, in order.
FAIRNESS_BY = ("gender", "race", "race_gender")
#: Groups with fewer test images are listed but left out of the worst/best ratio.
MIN_COUNT = 20


def _group_names(by: str, gender: np.ndarray, race: np.ndarray) -> np.ndarray:
    """Per sample, its group's name under ``by`` ("" when a needed label is absent)."""
    from ageray.evaluation.traits import group_name

    out = np.full(len(gender), "", dtype=object)
    for i, (g, r) in enumerate(zip(gender.astype(int), race.astype(int))):
        g_ok, r_ok = 0 <= g < len(GENDERS), 0 <= r < len(RACES)
        if by == "gender" and g_ok:
            out[i] = GENDERS[g]
        elif by == "race" and r_ok:
            out[i] = RACES[r]
        elif by == "race_gender" and g_ok and r_ok:
            out[i] = group_name(g, r)
    return out


def _order(by: str, names: set[str]) -> list[str]:
    from ageray.evaluation.traits import group_name

    if by == "gender":
        known = list(GENDERS)
    elif by == "race":
        known = list(RACES)
    else:
        known = [group_name(g, r) for r in range(len(RACES)) for g in range(len(GENDERS))]
    return [n for n in known if n in names]


def _ratio(values: Mapping[str, float], counts: Mapping[str, int], min_count: int) -> dict:
    """Worst/best over the groups with enough images (NaN with fewer than two)."""
    big = {g: v for g, v in values.items() if counts[g] >= min_count and math.isfinite(v)}
    if len(big) < 2:
        return {"ratio": math.nan, "worst": None, "best": None}
    worst, best = max(big, key=big.get), min(big, key=big.get)  # type: ignore[arg-type]
    ratio = big[worst] / big[best] if big[best] > 0 else math.inf
    return {"ratio": float(ratio), "worst": worst, "best": best}


def fairness_table(
    y: Any,
    rows: Mapping[str, Any],
    gender: Any,
    race: Any,
    *,
    order: Sequence[str] | None = None,
    min_count: int = MIN_COUNT,
) -> dict[str, Any] | None:
    """The table for ``rows`` (report row name -> predicted ages, aligned with ``y``) given
    each sample's ``gender`` and ``race`` codes (-1 = absent); None when the split carries
    neither label.

    ``by.<grouping>``: ``groups`` {name: images}, ``rows.<row>.<group>`` {mae, cmae},
    ``ratio.<row>`` {mae: {ratio, worst, best}, cmae: {...}}.
    """
    y = np.asarray(y, dtype=np.float64)
    g = np.asarray(gender if gender is not None else np.full(len(y), -1), dtype=np.float64)
    r = np.asarray(race if race is not None else np.full(len(y), -1), dtype=np.float64)
    out: dict[str, Any] = {"min_count": min_count, "by": {}}
    names = list(order) if order is not None else list(rows)
    for by in FAIRNESS_BY:
        member = _group_names(by, g, r)
        present = _order(by, {m for m in member if m})
        if not present:
            continue
        counts = {name: int((member == name).sum()) for name in present}
        table: dict[str, Any] = {}
        ratios: dict[str, Any] = {}
        for row in names:
            yhat = np.asarray(rows[row], dtype=np.float64)
            cells = {}
            for name in present:
                sel = member == name
                cells[name] = {"mae": M.mae(y[sel], yhat[sel]), "cmae": M.cmae(y[sel], yhat[sel])}
            table[row] = cells
            ratios[row] = {
                k: _ratio({n: c[k] for n, c in cells.items()}, counts, min_count)
                for k in ("mae", "cmae")
            }
        out["by"][by] = {"groups": counts, "rows": table, "ratio": ratios}
    return out if out["by"] else None


def fairness_metrics(fairness: Mapping[str, Any] | None, prefix: str = "test") -> dict:
    """``<prefix>_<row>_<mae|cmae>_ratio_<grouping>`` (worst/best) and
    ``<prefix>_<row>_mae_<group>`` per group, for MLflow; finite values only."""
    out: dict[str, float] = {}
    for by, sec in ((fairness or {}).get("by") or {}).items():
        for row, ratios in sec["ratio"].items():
            for k, v in ratios.items():
                if isinstance(v["ratio"], float) and math.isfinite(v["ratio"]):
                    out[f"{prefix}_{row}_{k}_ratio_{by}"] = v["ratio"]
            for group, cell in sec["rows"][row].items():
                for k in ("mae", "cmae"):
                    if math.isfinite(cell[k]):
                        out[f"{prefix}_{row}_{k}_{by}_{group}"] = float(cell[k])
    return out


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def markdown_fairness(fairness: Mapping[str, Any] | None, labels: Mapping[str, str]) -> list:
    """The report.md section: per grouping, MAE then CMAE of every row per group (images per
    group in the header), and each row's worst/best ratio. ``labels``: row -> display name."""
    if not fairness:
        return []
    lines = [
        "",
        "## Fairness: age error per gender, race and race x gender",
        "",
        f"Worst/best = the largest group MAE (CMAE) over the smallest, over the groups with at "
        f"least {fairness['min_count']} test images (smaller groups are listed with their "
        "counts but left out of the ratio).",
    ]
    for by, sec in fairness["by"].items():
        groups = list(sec["groups"])
        for k in ("mae", "cmae"):
            head = ["row"] + [f"{g} (n={sec['groups'][g]})" for g in groups] + ["worst/best"]
            lines += ["", f"{k.upper()} by {by.replace('_', ' x ')}", ""]
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            for row, cells in sec["rows"].items():
                ratio = sec["ratio"][row][k]
                note = (
                    f"{_fmt(ratio['ratio'])} ({ratio['worst']} / {ratio['best']})"
                    if ratio["worst"]
                    else "–"
                )
                vals = [_fmt(cells[g][k]) for g in groups]
                lines.append(f"| {labels.get(row, row)} | " + " | ".join(vals) + f" | {note} |")
    return lines


def plot_fairness(
    fairness: Mapping[str, Any] | None,
    path: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path | None:
    """``fairness.png``: per grouping, MAE per group for every row (bars) and each group's
    image count above; the CMAE of the first row as black ticks."""
    if not fairness:
        return None
    from ageray.evaluation.tables import pyplot, save_figure

    plt = pyplot()
    sections = list(fairness["by"].items())
    widths = [max(2, len(sec["groups"])) for _, sec in sections]
    fig, axes = plt.subplots(
        1,
        len(sections),
        figsize=(2.2 + 0.9 * sum(widths), 4.2),
        gridspec_kw={"width_ratios": widths},
    )
    axes = np.atleast_1d(axes)
    for ax, (by, sec) in zip(axes, sections):
        groups = list(sec["groups"])
        rows = list(sec["rows"])
        step = 0.8 / max(1, len(rows))
        for i, row in enumerate(rows):
            xs = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * step
            vals = [sec["rows"][row][g]["mae"] for g in groups]
            name = (labels or {}).get(row, row)
            ax.bar(xs, vals, width=step, label=name, color=(colors or {}).get(row))
        first = rows[0]
        ax.scatter(
            range(len(groups)),
            [sec["rows"][first][g]["cmae"] for g in groups],
            marker="_",
            s=300,
            color="black",
            label=f"CMAE ({(labels or {}).get(first, first)})",
            zorder=3,
        )
        top = ax.get_ylim()[1]
        for j, g in enumerate(groups):
            ax.text(j, top * 1.01, f"n={sec['groups'][g]}", ha="center", fontsize=7)
        ax.set_ylim(0, top * 1.1)
        ax.set_xticks(range(len(groups)), groups, rotation=45 if len(groups) > 5 else 0)
        ax.set_title(by.replace("_", " x "))
        ax.set_ylabel("MAE (years)")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Age error per group of people")
    return save_figure(fig, path)
