"""When a candidate model replaces the champion: the rule, and the comparison it leaves.

``jobs.promote`` evaluates the candidate and the current champion with the same report code
(:func:`ageray.evaluation.evaluate_to_dir`) on the same split, then asks :func:`decide`.
Both reports are compared on the row each model *serves* (its own routing rule, as Serve
answers), so the decision is about the answers users would get.

The rule (lower is better for every metric here):

* ``cmae`` (default): every age counts equally; what the papers are about (the tails).
* ``mae``: every image counts equally.
* ``mae+cmae``: their mean (Tune's ``mae+cmae`` at weight 0.5).

The candidate is promoted when it is better by at least ``margin`` years and strictly
better (a tie keeps the champion: no churn for nothing). No champion yet: the candidate
becomes the first. Reports of different splits or sample counts are refused, because their
numbers are not comparable.

Why the validation split by default: choosing the served model is a model-selection step,
and the test split must not drive a choice (its numbers are what is *reported*). The
routing rules were fitted on val too, but both models had the same chance to overfit it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ageray.evaluation import RULE_ROWS

__all__ = [
    "PROMOTION_METRICS",
    "Decision",
    "PromotionError",
    "comparison_table",
    "decide",
    "plot_comparison",
    "score",
    "served_row",
]

PROMOTION_METRICS = ("cmae", "mae", "mae+cmae")


class PromotionError(ValueError):
    """The comparison cannot be made; the message says why and what to do."""


def served_row(report: dict[str, Any]) -> str:
    """The report row that matches what Serve answers with this model: the row of its own
    routing rule, else GLAE's AR row, else the single head."""
    rows = report["rows"]
    rule = report.get("served_rule")
    row = RULE_ROWS.get(str(rule)) if rule != "oracle" else None
    for name in (row, "routed", "vanilla"):
        if name and name in rows:
            return name
    raise PromotionError(f"report of {report.get('model')!r} has no servable row: {list(rows)}")


def score(report: dict[str, Any], metric: str, row: str | None = None) -> float:
    """The promotion metric of one report row (default: the served row)."""
    if metric not in PROMOTION_METRICS:
        raise PromotionError(f"metric {metric!r} is not one of {list(PROMOTION_METRICS)}")
    r = report["rows"][row or served_row(report)]
    if metric == "mae+cmae":
        value = 0.5 * float(r["mae"]) + 0.5 * float(r["cmae"])
    else:
        value = float(r[metric])
    if not math.isfinite(value):
        raise PromotionError(f"{metric} of {report.get('model')!r} is not finite ({value})")
    return value


@dataclass
class Decision:
    """The outcome, as logged to MLflow (``decision.json``) and printed by the job."""

    promote: bool
    reason: str
    metric: str
    margin: float
    candidate: float
    champion: float | None
    candidate_row: str
    champion_row: str | None
    improvement: float | None  # champion - candidate (years; > 0: the candidate is better)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_comparable(candidate: dict[str, Any], champion: dict[str, Any]) -> None:
    for key in ("split", "num_samples"):
        if candidate.get(key) != champion.get(key):
            raise PromotionError(
                f"the two reports differ in {key} ({candidate.get(key)!r} vs "
                f"{champion.get(key)!r}): evaluate both on the same shards and split"
            )


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    *,
    metric: str = "cmae",
    margin: float = 0.0,
) -> Decision:
    """Promote the candidate or keep the champion (see the module docstring)."""
    if not margin >= 0:
        raise PromotionError(f"margin={margin} must be >= 0 years")
    c_row = served_row(candidate)
    c_score = score(candidate, metric, c_row)
    if champion is None:
        return Decision(
            promote=True,
            reason=f"no champion yet: the candidate becomes the first ({metric} {c_score:.3f})",
            metric=metric,
            margin=margin,
            candidate=c_score,
            champion=None,
            candidate_row=c_row,
            champion_row=None,
            improvement=None,
        )
    _check_comparable(candidate, champion)
    h_row = served_row(champion)
    h_score = score(champion, metric, h_row)
    improvement = h_score - c_score
    promote = improvement > 0 and improvement >= margin
    if promote:
        reason = (
            f"candidate wins: {metric} {c_score:.3f} vs champion {h_score:.3f} "
            f"(better by {improvement:.3f} >= margin {margin:g})"
        )
    elif improvement > 0:
        reason = (
            f"candidate better by only {improvement:.3f} < margin {margin:g} "
            f"({metric} {c_score:.3f} vs {h_score:.3f}): champion kept"
        )
    else:
        reason = (
            f"candidate not better: {metric} {c_score:.3f} vs champion {h_score:.3f}: champion kept"
        )
    return Decision(
        promote=promote,
        reason=reason,
        metric=metric,
        margin=margin,
        candidate=c_score,
        champion=h_score,
        candidate_row=c_row,
        champion_row=h_row,
        improvement=improvement,
    )


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.2f}"


def comparison_table(
    candidate: dict[str, Any], champion: dict[str, Any] | None, decision: Decision
) -> str:
    """Markdown: champion vs candidate on their served rows, overall and per Table IX group,
    then the decision."""
    c = candidate["rows"][decision.candidate_row]
    h = champion["rows"][decision.champion_row] if champion and decision.champion_row else None
    groups = candidate.get("groups") or []
    lines = [
        f"Split `{candidate['split']}` of `{candidate['shards']}`: "
        f"{candidate['num_samples']} samples.",
        "",
        "| metric | champion | candidate | champion - candidate |",
        "|---|---|---|---|",
    ]
    items: list[tuple[str, Any, Any]] = [
        ("MAE", h and h["mae"], c["mae"]),
        ("CMAE", h and h["cmae"], c["cmae"]),
    ]
    items += [(f"MAE {g}", h and h["group_mae"].get(g), c["group_mae"].get(g)) for g in groups]
    items += [(f"CMAE {g}", h and h["group_cmae"].get(g), c["group_cmae"].get(g)) for g in groups]
    items += [("AAR (higher is better)", h and h["aar"], c["aar"])]
    for label, hv, cv in items:
        diff = None
        if isinstance(hv, int | float) and isinstance(cv, int | float):
            diff = float(hv) - float(cv)
        lines.append(f"| {label} | {_fmt(hv)} | {_fmt(cv)} | {_fmt(diff)} |")
    verdict = "PROMOTED" if decision.promote else "KEPT CHAMPION"
    lines += ["", f"**{verdict}** — {decision.reason}"]
    return "\n".join(lines) + "\n"


def plot_comparison(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    decision: Decision,
    path: str | Path,
) -> Path:
    """Per-age MAE of the champion's and the candidate's served rows over the per-age
    sample histogram; dashed lines are each one's CMAE."""
    from ageray.evaluation.tables import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    hist = {int(k): v for k, v in candidate["age_hist"].items()}
    ages = sorted(hist)
    ax.bar(ages, [hist[a] for a in ages], color="lightsteelblue", label="samples per age")
    ax.set_xlabel("age (years)")
    ax.set_ylabel("samples")
    ax2 = ax.twinx()
    series = [("candidate", candidate, decision.candidate_row, "tab:green")]
    if champion is not None and decision.champion_row:
        series.insert(0, ("champion", champion, decision.champion_row, "tab:gray"))
    for label, report, row, color in series:
        per_age = {int(k): v for k, v in report["per_age_mae"][row].items()}
        xs = sorted(per_age)
        ax2.plot(xs, [per_age[a] for a in xs], color=color, lw=1.4, label=f"{label} ({row})")
        ax2.axhline(report["rows"][row]["cmae"], color=color, ls="--", lw=0.9)
    ax2.set_ylabel("MAE per age (years); dashed: CMAE")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    verdict = "promoted" if decision.promote else "champion kept"
    ax.set_title(f"Champion vs candidate, per-age MAE ({decision.metric}: {verdict})")
    return save_figure(fig, path)
