"""Evaluation tables and plots: the Table IX-style table, per-age MAE over the sample
histogram (GLAE Fig. 1), routing usage per age group (GLAE Fig. 4) and CCS curves (Xing et
al.). Plots are PNGs that the jobs log to MLflow; people would rather look at these than at
numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = [
    "markdown_table",
    "plot_ccs",
    "plot_per_age",
    "plot_routing_usage",
    "plot_rules_per_age",
    "write_plots",
]

ROW_LABELS = {
    "l_base": "l_base",
    "vanilla": "Vanilla",
    "balanced": "Balanced",
    "routed_bigger": "Bigger Υ",
    "routed": "Smaller Υ (AR)",
    "routed_threshold": "Threshold τ",
    "routed_learned": "Learned router",
    "oracle": "Oracle (bound)",
}
ROW_COLORS = {
    "l_base": "tab:gray",
    "vanilla": "tab:blue",
    "balanced": "tab:red",
    "routed_bigger": "tab:orange",
    "routed": "tab:green",
    "routed_threshold": "tab:olive",
    "routed_learned": "tab:purple",
    "oracle": "black",
}
# The rows that are routing rules (report row -> rule name in ageray.model.routing).
RULE_OF_ROW = {
    "routed_bigger": "bigger",
    "routed": "smaller",
    "routed_threshold": "threshold",
    "routed_learned": "learned",
    "oracle": "oracle",
}


def _label(report: dict[str, Any], name: str) -> str:
    """The row's label; the rule the model serves is marked."""
    label = ROW_LABELS.get(name, name)
    if RULE_OF_ROW.get(name) == report.get("served_rule") and name != "oracle":
        label += " [served]"
    return label


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def markdown_table(report: dict[str, Any]) -> str:
    """Table IX-style: per row, MAE and CMAE overall and per group, AAR, epsilon-error."""
    rows = report["rows"]
    groups = report.get("groups") or []
    has_eps = any(r.get("epsilon_error") is not None for r in rows.values())
    head = ["row", "MAE", "CMAE"]
    head += [f"MAE {g}" for g in groups] + [f"CMAE {g}" for g in groups] + ["AAR"]
    head += ["ε-error"] if has_eps else []
    lines = [
        f"Split `{report['split']}` of `{report['shards']}`: {report['num_samples']} samples.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name in report.get("row_order", list(rows)):
        r = rows[name]
        cells = [_label(report, name), _fmt(r["mae"]), _fmt(r["cmae"])]
        cells += [_fmt(r["group_mae"].get(g)) for g in groups]
        cells += [_fmt(r["group_cmae"].get(g)) for g in groups]
        cells += [_fmt(r["aar"])]
        if has_eps:
            cells.append(_fmt(r.get("epsilon_error")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _rules_table(report)
    usage = report.get("routing_usage")
    if usage:
        lines += ["", "Routing usage (smaller Υ): share of images answered by each head.", ""]
        lines += ["| group | n | vanilla | balanced |", "|---|---|---|---|"]
        for g, u in usage.items():
            lines.append(
                f"| {g} | {u['n']} | {_fmt(u.get('vanilla'))} | {_fmt(u.get('balanced'))} |"
            )
    ccs = {k: r.get("ccs") for k, r in rows.items() if r.get("ccs")}
    if ccs:
        t_max = len(next(iter(ccs.values()))) - 1
        lines += ["", f"CCS(t): samples with |error| <= t years, t = 0..{t_max}.", ""]
        lines += ["| row | " + " | ".join(str(t) for t in range(t_max + 1)) + " |"]
        lines += ["|---|" + "|".join("---" for _ in range(t_max + 1)) + "|"]
        for k, c in ccs.items():
            lines.append(f"| {_label(report, k)} | " + " | ".join(str(v) for v in c) + " |")
    return "\n".join(lines) + "\n"


def _share(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * v:.0f}%"


def _rules_table(report: dict[str, Any]) -> list[str]:
    """Each row against the routing bound: the share of the gap between GLAE's rule
    (smaller Υ) and the oracle it closes, and the many/medium/few-shot MAE beside CMAE."""
    rows, gap = report["rows"], report.get("gap_closed") or {}
    counts = report.get("shot_counts")
    if not gap and not counts:
        return []
    head = ["row", "MAE", "CMAE"]
    if gap:
        head += ["closes MAE gap", "closes CMAE gap"]
    if counts:
        head += [f"MAE {s}-shot (n={counts.get(s, 0)})" for s in ("many", "medium", "few")]
    out = [
        "",
        "Routing rules against the oracle bound (the head closer to the true age; it reads the "
        "label, so it is a bound, never served). 'closes ... gap' = (smaller Υ - row) / "
        "(smaller Υ - oracle). Shots by training images per age: many > 100, medium 20-100, "
        "few < 20.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for name in report.get("row_order", list(rows)):
        r = rows[name]
        cells = [_label(report, name), _fmt(r["mae"]), _fmt(r["cmae"])]
        if gap:
            g = gap.get(name, {})
            bound = name == "oracle"
            cells += ["bound"] * 2 if bound else [_share(g.get("mae")), _share(g.get("cmae"))]
        if counts:
            shots = r.get("shot_mae") or {}
            cells += [_fmt(shots.get(s)) for s in ("many", "medium", "few")]
        out.append("| " + " | ".join(cells) + " |")
    return out


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend: plots are written on headless
    Ray workers and CI machines, where an interactive backend would fail or hang."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write (PNG at 110 dpi, parent folders made) and close ``fig``. Closing matters:
    pyplot keeps every open figure alive, and a search or evaluation draws many."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out


def plot_per_age(report: dict[str, Any], path: str | Path) -> Path:
    """Per-age sample counts (bars) and per-age MAE of each row (lines), CMAE dashed (Fig. 1)."""
    plt = pyplot()
    hist = {int(k): v for k, v in report["age_hist"].items()}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ages = sorted(hist)
    ax.bar(ages, [hist[a] for a in ages], color="lightsteelblue", label="samples per age")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("test samples")
    ax2 = ax.twinx()
    for name in report.get("row_order", list(report["rows"])):
        per_age = {int(k): v for k, v in report["per_age_mae"][name].items()}
        xs = sorted(per_age)
        color = ROW_COLORS.get(name)
        ax2.plot(xs, [per_age[a] for a in xs], color=color, lw=1.4, label=_label(report, name))
        ax2.axhline(report["rows"][name]["cmae"], color=color, ls="--", lw=0.9)
    ax2.set_ylabel("MAE per age (years); dashed: CMAE")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax2.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_title("Per-age MAE over the per-age sample histogram")
    return save_figure(fig, path)


def plot_routing_usage(report: dict[str, Any], path: str | Path) -> Path | None:
    """Share of images answered by the vanilla and the balanced head per age group (Fig. 4)."""
    usage = report.get("routing_usage")
    if not usage:
        return None
    plt = pyplot()
    groups = list(usage)
    van = [usage[g].get("vanilla") or 0.0 for g in groups]
    bal = [usage[g].get("balanced") or 0.0 for g in groups]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(groups, van, color="tab:blue", label="vanilla")
    ax.bar(groups, bal, bottom=van, color="tab:red", label="balanced")
    for i, g in enumerate(groups):
        ax.text(i, 1.01, f"n={usage[g]['n']}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("usage ratio")
    ax.set_xlabel("age group")
    ax.set_title("Adaptive Routing: which head answers, per age group")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_ccs(report: dict[str, Any], path: str | Path) -> Path:
    """CCS(t) curves (Xing et al. eq. 2) as a fraction of the test set."""
    plt = pyplot()
    n = max(1, report["num_samples"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in report.get("row_order", list(report["rows"])):
        c = report["rows"][name].get("ccs") or []
        ax.plot(
            range(len(c)),
            [v / n for v in c],
            marker="o",
            ms=3,
            color=ROW_COLORS.get(name),
            label=_label(report, name),
        )
    ax.set_xlabel("error threshold t (years)")
    ax.set_ylabel("CCS(t) / N")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Cumulative correct score")
    return save_figure(fig, path)


def plot_rules_per_age(report: dict[str, Any], path: str | Path) -> Path | None:
    """Per-age MAE of each routing rule (and the two heads, thin), the oracle dotted: where
    along the age axis each rule gains or loses against GLAE's eq. 11."""
    names = [n for n in report.get("row_order", list(report["rows"])) if n in RULE_OF_ROW]
    if len(names) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name in [n for n in ("vanilla", "balanced") if n in report["rows"]] + names:
        per_age = {int(k): v for k, v in report["per_age_mae"][name].items()}
        xs = sorted(per_age)
        thin = name in ("vanilla", "balanced")
        ax.plot(
            xs,
            [per_age[a] for a in xs],
            color=ROW_COLORS.get(name),
            lw=0.8 if thin else 1.5,
            alpha=0.5 if thin else 1.0,
            ls=":" if name == "oracle" else "-",
            label=f"{_label(report, name)} (CMAE {report['rows'][name]['cmae']:.2f})",
        )
    ax.set_xlabel("age (years)")
    ax.set_ylabel("MAE per age (years)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.set_title("Per-age MAE of each routing rule")
    return save_figure(fig, path)


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_per_age(report, out / "per_age_mae.png"), plot_ccs(report, out / "ccs.png")]
    rules = plot_rules_per_age(report, out / "per_age_mae_rules.png")
    if rules:
        paths.append(rules)
    usage = plot_routing_usage(report, out / "routing_usage.png")
    if usage:
        paths.append(usage)
    return paths
