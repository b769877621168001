"""The promotion rule (ageray.registry.promotion) on report dicts built by the real report code
(ageray.evaluation.build_report) from known predictions: who wins, by what margin, on which
row, and what the comparison leaves behind. No Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ageray.evaluation import build_report
from ageray.registry.promotion import (
    Decision,
    PromotionError,
    comparison_table,
    decide,
    plot_comparison,
    score,
    served_row,
)

AGES = np.array([2, 5, 9, 15, 22, 30, 30, 31, 35, 40, 48, 55, 63, 70, 81], dtype=float)


def report(
    offset: float,
    *,
    balanced_offset: float | None = None,
    rule: str = "smaller",
    ages: np.ndarray = AGES,
    split: str = "val",
) -> dict:
    """A report whose routed answer is off by ``offset`` years on every image (the balanced
    head by ``balanced_offset``; AR picks the head with the smaller flip KL)."""
    n = len(ages)
    bal = offset if balanced_offset is None else balanced_offset
    preds = {
        "age": ages,
        "_keys": [f"k{i}" for i in range(n)],
        "vanilla_age": ages + offset,
        "balanced_age": ages + bal,
        "rule_smaller_age": ages + offset,
        "rule_bigger_age": ages + bal,
        "rule_oracle_age": ages,
        "rule_smaller_weight": np.zeros(n),
        "rule_bigger_weight": np.ones(n),
        "_routing_rule": rule,
    }
    try:
        return build_report(preds, shards="mem://shards", split=split, model_ref=f"off{offset}")
    except KeyError as exc:  # the report code changed its prediction keys
        pytest.fail(f"build_report wants another prediction layout: {exc}")


def test_candidate_that_wins_by_the_margin_is_promoted() -> None:
    d = decide(report(2.0), report(5.0), metric="cmae", margin=1.0)
    assert d.promote and d.candidate == pytest.approx(2.0) and d.champion == pytest.approx(5.0)
    assert d.improvement == pytest.approx(3.0)
    assert "candidate wins" in d.reason


def test_a_win_smaller_than_the_margin_keeps_the_champion() -> None:
    d = decide(report(4.5), report(5.0), metric="mae", margin=1.0)
    assert not d.promote and "< margin" in d.reason


def test_a_loss_and_a_tie_keep_the_champion() -> None:
    assert not decide(report(6.0), report(5.0)).promote
    tie = decide(report(5.0), report(5.0), margin=0.0)
    assert not tie.promote and tie.improvement == 0.0


def test_no_champion_yet_promotes_the_first_candidate() -> None:
    d = decide(report(9.0), None)
    assert d.promote and d.champion is None and "no champion" in d.reason


def test_mae_plus_cmae_is_their_mean() -> None:
    r = report(3.0)
    row = r["rows"][served_row(r)]
    assert score(r, "mae+cmae") == pytest.approx(0.5 * row["mae"] + 0.5 * row["cmae"])


def test_metrics_differ_when_errors_sit_in_the_tails() -> None:
    """CMAE weighs each age equally: an error on the one 81-year-old costs more in CMAE
    than in MAE, so the two metrics can rank the same pair differently."""
    ages = np.array([30.0] * 12 + [81.0])
    base = report(0.0, ages=ages)
    for name in ("mae", "cmae"):
        assert score(base, name) == 0.0
    # rebuild with a 13-year miss on the single old face only
    preds_off = ages.copy()
    preds_off[-1] += 13.0
    n = len(ages)
    tail_bad = build_report(
        {
            "age": ages,
            "_keys": [f"k{i}" for i in range(n)],
            "vanilla_age": preds_off,
            "balanced_age": preds_off,
            "rule_smaller_age": preds_off,
            "rule_bigger_age": preds_off,
            "rule_oracle_age": ages,
            "rule_smaller_weight": np.zeros(n),
            "rule_bigger_weight": np.ones(n),
            "_routing_rule": "smaller",
        },
        shards="mem://shards",
        split="val",
    )
    assert score(tail_bad, "mae") == pytest.approx(1.0)
    assert score(tail_bad, "cmae") == pytest.approx(6.5)


def test_the_served_row_follows_the_models_rule() -> None:
    """A model that serves the bigger-KL rule is judged on that row, not on eq. 11's."""
    r = report(1.0, balanced_offset=4.0, rule="bigger")
    assert served_row(r) == "routed_bigger"
    assert score(r, "mae") == pytest.approx(4.0)
    assert served_row(report(1.0)) == "routed"


def test_incomparable_reports_and_bad_arguments_are_refused() -> None:
    with pytest.raises(PromotionError, match="split"):
        decide(report(1.0), report(2.0, split="test"))
    with pytest.raises(PromotionError, match="num_samples"):
        decide(report(1.0), report(2.0, ages=AGES[:5]))
    with pytest.raises(PromotionError, match="margin"):
        decide(report(1.0), report(2.0), margin=-1)
    with pytest.raises(PromotionError, match="metric"):
        decide(report(1.0), report(2.0), metric="aar")


def test_comparison_table_and_plot(tmp_path: Path) -> None:
    cand, champ = report(2.0), report(5.0)
    d = decide(cand, champ, metric="cmae", margin=0.5)
    table = comparison_table(cand, champ, d)
    assert "| CMAE | 5.00 | 2.00 | 3.00 |" in table
    assert "| MAE 0-17 |" in table and "PROMOTED" in table
    kept = decide(report(6.0), champ)
    assert "KEPT CHAMPION" in comparison_table(report(6.0), champ, kept)
    png = plot_comparison(cand, champ, d, tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    first = decide(cand, None)
    assert "| MAE | – | 2.00 | – |" in comparison_table(cand, None, first)
    assert plot_comparison(cand, None, first, tmp_path / "first.png").is_file()


def test_decision_is_plain_data() -> None:
    d = decide(report(2.0), report(5.0))
    data = d.to_dict()
    assert data["promote"] is True and data["candidate_row"] == "routed"
    assert Decision(**data) == d
