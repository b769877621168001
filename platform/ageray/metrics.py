"""Evaluation metrics of the three papers: MAE, CMAE, AAR, epsilon-error, CCS/RCCS, group,
per-age MAE, the Adaptive Routing usage table and the many/medium/few-shot MAE of deep
imbalanced regression.

Why one module with plain-number outputs: the evaluation job, the Tune driver, the report
and the tests all compare the same numbers, so every metric takes array-likes (lists, numpy
arrays, torch tensors on any device, with or without ``requires_grad``), labels first as in
scikit-learn, and returns Python ``float`` / ``int`` / ``dict`` that JSON and MLflow accept
as they are.

Conventions shared by every function:

* **Validation.** Inputs must be 1-D (extra size-1 axes are squeezed, so ``(B, 1)`` is fine),
  non-empty, numeric, finite and of equal length; otherwise a ``ValueError`` names the
  argument and says what was wrong.
* **Binning real-valued labels to ages.** Apparent-age sets (ChaLearn LAP, APPA-REAL, MIVIA)
  have real-valued labels, but CMAE, the per-age MAE and group membership need an integer
  age. A label ``y`` belongs to age ``floor(y + 0.5)`` (round half *up*: 2.5 -> 3, 3.5 -> 4),
  never numpy's/Python's round-half-to-even (which would send 2.5 to 2 but 3.5 to 4 and so
  split ".5" labels between neighbours depending on parity). Integer labels are unchanged.
  Only the labels are binned; errors always use the raw values ``|y - y_hat|``.
* **Groups** are inclusive ranges ``(lo, hi)`` of binned ages; ``hi=None`` (or ``inf``) means
  open-ended ("71+"). A sample whose binned age is in no group counts in no group (it still
  counts in the overall MAE).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DECADE_GROUPS",
    "LAE_GROUPS",
    "SHOTS",
    "TABLE_IX_GROUPS",
    "aar",
    "aar_details",
    "ccs",
    "ccs_curve",
    "cmae",
    "epsilon_error",
    "group_cmae",
    "group_label",
    "group_mae",
    "mae",
    "per_age_mae",
    "rccs",
    "routing_usage",
    "shot_counts",
    "shot_mae",
    "summarize",
]

Group = tuple[float, float | None]

# LAE Table 1 / GTA 2021: 1-10, 11-20, ..., 61-70, 71+. LAE's table writes the last group as
# 71-81 only because MIVIA ends at 81; the contest rule is "71 and above". Age 0 (labels
# below 0.5) is put in the first group: LAE never meets it (MIVIA starts at 1), the first
# group is the "children" group it belongs with, and dropping it would silently exclude
# newborns from sigma on datasets that have them (UTKFace, FG-NET).
LAE_GROUPS: tuple[Group, ...] = (
    (0, 10),
    (11, 20),
    (21, 30),
    (31, 40),
    (41, 50),
    (51, 60),
    (61, 70),
    (71, None),
)
# GLAE eq. 16: "10 years for a group" over ages 0..100. We use 0-9, 10-19, ..., 80-89 and an
# open-ended 90+, so that age 100 does not form a one-age group of its own and nothing above
# 100 is dropped. Ten groups; n in eq. 16 is the number of them that have samples.
DECADE_GROUPS: tuple[Group, ...] = (*((lo, lo + 9) for lo in range(0, 90, 10)), (90, None))
# GLAE Table IX: children and teenagers, adults, the elderly.
TABLE_IX_GROUPS: tuple[Group, ...] = ((0, 17), (18, 65), (66, 100))

_CCS_TOL = 1e-9  # years; see ccs()


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """Any array-like (torch tensor on any device, numpy, list, tuple) as float64 numpy.

    torch is looked up, not imported: a tensor can only exist once torch is loaded, and the
    report tooling can then use the metrics without paying for the torch import.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64).numpy()
    if isinstance(values, str | bytes):
        raise ValueError(f"{name} must be a sequence of numbers, got a string {values!r}")
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name} must be a sequence of numbers (list, numpy array or torch tensor); "
            f"could not convert it: {exc}"
        ) from None


def _as_1d(values: Any, name: str, *, finite: bool = True) -> np.ndarray:
    """Validate one input: 1-D after squeezing size-1 axes, non-empty, (optionally) finite."""
    arr = _to_numpy(values, name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence of per-sample values, got a scalar")
    if arr.ndim > 1:
        squeezed = arr.squeeze()
        if squeezed.ndim > 1:
            raise ValueError(
                f"{name} must be 1-D (one value per sample; size-1 axes are allowed), "
                f"got shape {tuple(arr.shape)}"
            )
        arr = squeezed.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if finite:
        bad = ~np.isfinite(arr)
        if bad.any():
            where = np.flatnonzero(bad)[:5].tolist()
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), first at "
                f"index {where}; drop or fix those samples before computing metrics"
            )
    return arr


def _pair(y_true: Any, y_pred: Any, pred_name: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    """Validated labels and predictions of equal length."""
    t = _as_1d(y_true, "y_true")
    p = _as_1d(y_pred, pred_name)
    if t.shape != p.shape:
        raise ValueError(
            f"y_true has {t.size} values but {pred_name} has {p.size}; "
            "they must hold one value per sample each"
        )
    return t, p


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _threshold(years: Any) -> float:
    """``t`` of CCS(t) validated. The public argument keeps the papers' name ``t``."""
    if isinstance(years, bool) or not isinstance(years, numbers.Real):
        raise ValueError(f"t must be a number of years, got {years!r}")
    if not math.isfinite(float(years)) or years < 0:
        raise ValueError(f"t must be a finite, non-negative number of years, got {years!r}")
    return float(years)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def group_label(group: Group) -> str:
    """``(0, 17)`` -> ``"0-17"``; ``(71, None)`` -> ``"71+"``. Keys of the group dicts."""
    lo, hi = group
    if hi is None or math.isinf(hi):
        return f"{_fmt(lo)}+"
    return f"{_fmt(lo)}-{_fmt(hi)}"


def _groups(groups: str | Sequence[Sequence[float | None]], name: str = "groups") -> list[Group]:
    """Resolve ``"lae"`` / ``"decade"`` / explicit ``(lo, hi)`` pairs, validated."""
    if isinstance(groups, str):
        named = {"lae": LAE_GROUPS, "decade": DECADE_GROUPS}
        if groups not in named:
            raise ValueError(
                f"{name}={groups!r} is not a known grouping; use 'lae', 'decade' or a "
                "sequence of (lo, hi) age ranges"
            )
        return list(named[groups])
    out: list[Group] = []
    try:
        items = list(groups)
    except TypeError:
        raise ValueError(
            f"{name} must be 'lae', 'decade' or (lo, hi) pairs, got {groups!r}"
        ) from None
    if not items:
        raise ValueError(f"{name} is empty: give at least one (lo, hi) age range")
    for g in items:
        try:
            lo, hi = g
        except (TypeError, ValueError):
            raise ValueError(f"{name}: each group must be a (lo, hi) pair, got {g!r}") from None
        if _is_number(hi) and math.isinf(hi):
            hi = None
        if not _is_number(lo) or (hi is not None and not _is_number(hi)):
            raise ValueError(f"{name}: group bounds must be numbers (hi may be None), got {g!r}")
        if not math.isfinite(lo) or (hi is not None and hi < lo):
            raise ValueError(f"{name}: group {g!r} needs a finite lo <= hi")
        out.append((lo, hi))
    return out


def _in_group(ages: np.ndarray, group: Group) -> np.ndarray:
    lo, hi = group
    mask = ages >= lo
    if hi is not None:
        mask &= ages <= hi
    return mask


def _cmae_of(ages: np.ndarray, err: np.ndarray) -> float:
    """Mean over present ages of each age's mean error (GLAE eq. 13)."""
    _, inv = np.unique(ages, return_inverse=True)
    sums = np.bincount(inv, weights=err)
    counts = np.bincount(inv)
    return float(np.mean(sums / counts))


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error, ``mean_i |y_i - y_hat_i|`` (GLAE eq. 12, Xing eq. 1, LAE eq. 5)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def per_age_mae(y_true: Any, y_pred: Any) -> dict[int, float]:
    """``{age: MAE of the samples of that age}``, sorted by age (GLAE Fig. 1).

    Ages are the labels binned with round-half-up (``floor(y + 0.5)``); only ages present in
    ``y_true`` appear. Keys are Python ``int``.
    """
    t, p = _pair(y_true, y_pred)
    ages = np.floor(t + 0.5).astype(np.int64)
    err = np.abs(t - p)
    uniq, inv = np.unique(ages, return_inverse=True)
    means = np.bincount(inv, weights=err) / np.bincount(inv)
    return {int(a): float(m) for a, m in zip(uniq, means)}


def cmae(y_true: Any, y_pred: Any) -> float:
    """Class-wise MAE (GLAE eq. 13): the mean, over the ages present in the test set, of that
    age's MAE, so every age counts once however many samples it has.

    Why: MAE is dominated by the crowded adult ages; CMAE weighs a 3-year-old as much as a
    30-year-old, which is what long-tailed age estimation is judged on. Real-valued labels
    are binned to the nearest integer age with round-half-up (``floor(y + 0.5)``; 2.5 -> 3).
    """
    t, p = _pair(y_true, y_pred)
    return _cmae_of(np.floor(t + 0.5).astype(np.int64), np.abs(t - p))


def aar_details(
    y_true: Any, y_pred: Any, groups: str | Sequence[Sequence[float | None]] = "lae"
) -> dict[str, Any]:
    """AAR with its parts: ``{"aar", "mae", "sigma", "groups": {label: MAE_j}}``.

    ``groups`` only lists the non-empty groups, i.e. the ones that enter sigma. See ``aar``.
    """
    t, p = _pair(y_true, y_pred)
    gs = _groups(groups)
    err = np.abs(t - p)
    overall = float(np.mean(err))
    ages = np.floor(t + 0.5).astype(np.int64)
    group_maes: dict[str, float] = {}
    for g in gs:
        m = _in_group(ages, g)
        if m.any():
            group_maes[group_label(g)] = float(np.mean(err[m]))
    if not group_maes:
        raise ValueError(
            f"AAR: no sample of y_true falls in any of the groups {[group_label(g) for g in gs]}"
        )
    vals = np.fromiter(group_maes.values(), dtype=np.float64)
    sigma = float(np.sqrt(np.mean((vals - overall) ** 2)))
    score = max(0.0, 7.0 - overall) + max(0.0, 3.0 - sigma)
    return {"aar": float(score), "mae": overall, "sigma": sigma, "groups": group_maes}


def aar(y_true: Any, y_pred: Any, groups: str | Sequence[Sequence[float | None]] = "lae") -> float:
    """Age Accuracy and Regularity (LAE eqs. 6-7, GLAE eqs. 15-16; GTA 2021 contest).

    ``AAR = max(0, 7 - MAE) + max(0, 3 - sigma)`` with
    ``sigma = sqrt(mean_j (MAE_j - MAE)^2)``, MAE over the whole test set and MAE_j over the
    samples whose (binned) age is in group j. It rewards a low error that is also even
    across ages, which is why the long-tailed recipes are compared on it.

    ``groups``:

    * ``"lae"`` (default): LAE's eight groups 1-10, 11-20, ..., 61-70, 71+. The last group is
      "71 and above" (the contest rule); LAE Table 1 prints 71-81 only because MIVIA ends at
      81. Age 0 (labels below 0.5) goes in the first group, 0-10.
    * ``"decade"``: GLAE's "10 years for a group" (eq. 16): 0-9, 10-19, ..., 80-89, 90+.
      GLAE does not list its boundaries; starting at 0 matches its 0..100 age range, and the
      open 90+ keeps age 100 from being a group on its own.
    * a sequence of ``(lo, hi)`` inclusive ranges of binned ages (``hi=None``: open-ended).

    A group with no samples is left out, so the mean in sigma runs over the non-empty groups
    (n in GLAE eq. 16; LAE eq. 7's fixed 8 assumes all eight groups are populated, as they
    are on MIVIA). Group membership uses the label binned with round-half-up
    (``floor(y + 0.5)``, as in ``cmae``): 10.4 is in 1-10, 10.5 in 11-20.
    """
    return float(aar_details(y_true, y_pred, groups)["aar"])


def epsilon_error(y_true: Any, y_pred: Any, y_std: Any) -> float:
    """ChaLearn LAP epsilon-error: ``mean_i [1 - exp(-(y_hat_i - mu_i)^2 / (2 sigma_i^2))]``.

    ``y_true`` holds the mean apparent age mu_i and ``y_std`` the annotators' standard
    deviation sigma_i. GLAE eq. 14 prints ``1 - sum_i exp(...)`` without 1/N, which would be
    hugely negative for any real test set; the ChaLearn LAP 2015 definition (which GLAE cites
    and whose numbers it reports, between 0 and 1) is the mean over samples, used here.

    Every sigma_i must be a finite positive number: a zero or missing std has no meaningful
    Gaussian, and silently skipping samples would make results incomparable.
    """
    t, p = _pair(y_true, y_pred)
    s = _as_1d(y_std, "y_std", finite=False)
    if s.shape != t.shape:
        raise ValueError(
            f"y_true has {t.size} values but y_std has {s.size}; give one std per sample"
        )
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        where = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"y_std has {int(bad.sum())} value(s) that are not finite positive numbers "
            f"(NaN, inf, 0 or negative), first at index {where}; epsilon-error needs the "
            "annotated std of every sample (apparent-age sets such as ChaLearn LAP 2015)"
        )
    return float(np.mean(1.0 - np.exp(-((p - t) ** 2) / (2.0 * s**2))))


def ccs(y_true: Any, y_pred: Any, t: float) -> int:
    """Cumulative Correct Score (Xing et al. eqs. 2-3): how many samples have
    ``|y - y_hat| <= t``.

    Why a count: unlike MAE it shows where two models differ (the hard samples) at each
    error threshold. Errors within 1e-9 years above ``t`` count as ``<= t`` so that float
    representation noise (``|3.0 - 2.9| = 0.10000000000000009``) does not flip a count.
    """
    tt = _threshold(t)
    y, p = _pair(y_true, y_pred)
    return int(np.count_nonzero(np.abs(y - p) <= tt + _CCS_TOL))


def rccs(y_true: Any, y_pred_a: Any, y_pred_b: Any, t: float) -> int:
    """Relative CCS (Xing et al. eq. 4): ``RCCS_b^a(t) = CCS_a(t) - CCS_b(t)``; positive
    when method a gets more samples within ``t`` years than method b."""
    tt = _threshold(t)
    y, a = _pair(y_true, y_pred_a, "y_pred_a")
    _, b = _pair(y, y_pred_b, "y_pred_b")
    return int(np.count_nonzero(np.abs(y - a) <= tt + _CCS_TOL)) - int(
        np.count_nonzero(np.abs(y - b) <= tt + _CCS_TOL)
    )


def ccs_curve(y_true: Any, y_pred: Any, t_max: int = 10) -> list[int]:
    """``[CCS(0), CCS(1), ..., CCS(t_max)]`` (integer thresholds, ``t_max + 1`` values), the
    curve Xing et al. plot."""
    if isinstance(t_max, bool) or not isinstance(t_max, int | np.integer) or t_max < 0:
        raise ValueError(f"t_max must be a non-negative integer, got {t_max!r}")
    y, p = _pair(y_true, y_pred)
    err = np.abs(y - p)
    return [int(np.count_nonzero(err <= t + _CCS_TOL)) for t in range(int(t_max) + 1)]


def group_mae(
    y_true: Any,
    y_pred: Any,
    groups: str | Sequence[Sequence[float | None]] = TABLE_IX_GROUPS,
) -> dict[str, float]:
    """MAE per age group, ``{"0-17": ..., "18-65": ..., "66-100": ...}`` (GLAE Table IX groups
    by default: children and teenagers, adults, the elderly).

    A group without samples keeps its key with value ``float("nan")`` so that tables built
    from several runs keep the same columns (note: ``json.dumps`` writes it as ``NaN``).
    ``groups`` also accepts ``"lae"``, ``"decade"`` or any ``(lo, hi)`` pairs; membership uses
    the round-half-up binned label.
    """
    t, p = _pair(y_true, y_pred)
    ages = np.floor(t + 0.5).astype(np.int64)
    err = np.abs(t - p)
    out: dict[str, float] = {}
    for g in _groups(groups):
        m = _in_group(ages, g)
        out[group_label(g)] = float(np.mean(err[m])) if m.any() else float("nan")
    return out


def group_cmae(
    y_true: Any,
    y_pred: Any,
    groups: str | Sequence[Sequence[float | None]] = TABLE_IX_GROUPS,
) -> dict[str, float]:
    """CMAE per age group: within each group, the mean over its present ages of each age's
    MAE. This is what GLAE Table IX reports ("all results are compared on CMAE"). Empty
    groups are ``float("nan")`` as in ``group_mae``."""
    t, p = _pair(y_true, y_pred)
    ages = np.floor(t + 0.5).astype(np.int64)
    err = np.abs(t - p)
    out: dict[str, float] = {}
    for g in _groups(groups):
        m = _in_group(ages, g)
        out[group_label(g)] = _cmae_of(ages[m], err[m]) if m.any() else float("nan")
    return out


def routing_usage(
    y_true: Any,
    choice: Any,
    groups: str | Sequence[Sequence[float | None]] = TABLE_IX_GROUPS,
) -> dict[str, dict[str, float | int]]:
    """How often Adaptive Routing picked each head per age group (GLAE Fig. 4).

    ``choice`` is per sample: 0 = vanilla, 1 = balanced (``ageray.model.adaptive_route``).
    Returns ``{"0-17": {"n": int, "vanilla": fraction, "balanced": fraction}, ...}``; an
    empty group has ``n=0`` and NaN fractions.
    """
    t, c = _pair(y_true, choice, "choice")
    if not np.isin(c, (0.0, 1.0)).all():
        bad = sorted({float(v) for v in c[~np.isin(c, (0.0, 1.0))]})[:5]
        raise ValueError(f"choice must hold 0 (vanilla) or 1 (balanced) per sample, got {bad}")
    ages = np.floor(t + 0.5).astype(np.int64)
    out: dict[str, dict[str, float | int]] = {}
    for g in _groups(groups):
        m = _in_group(ages, g)
        n = int(m.sum())
        bal = float(np.mean(c[m])) if n else float("nan")
        out[group_label(g)] = {"n": n, "vanilla": 1.0 - bal if n else float("nan"), "balanced": bal}
    return out


# Deep imbalanced regression's shots (Yang et al. 2021, AgeDB-DIR / IMDB-WIKI-DIR): an age is
# many-shot with more than 100 training images, few-shot with fewer than 20, else medium.
SHOTS = ("many", "medium", "few")


def _shot_of(ages: np.ndarray, train_counts: Any, many_above: int, few_below: int) -> np.ndarray:
    counts = {int(float(k)): int(v) for k, v in dict(train_counts).items()}
    n = np.array([counts.get(int(a), 0) for a in ages], dtype=np.int64)
    return np.where(n > many_above, 0, np.where(n < few_below, 2, 1))


def shot_mae(
    y_true: Any,
    y_pred: Any,
    train_counts: Any,
    *,
    many_above: int = 100,
    few_below: int = 20,
) -> dict[str, float]:
    """MAE by how many TRAINING images a sample's age has: ``{"many", "medium", "few"}``.

    The protocol of deep imbalanced regression (Yang et al. 2021; AgeDB-DIR, IMDB-WIKI-DIR),
    reported beside CMAE because the two answer different questions: CMAE weighs every
    *test* age equally, the shots ask how the model does on ages it *saw rarely in
    training*. ``train_counts`` maps age -> training images (the training split's manifest
    ``age_hist``; keys may be strings). Many-shot: more than ``many_above`` (100) images;
    few-shot: fewer than ``few_below`` (20), including ages absent from training; medium:
    the rest (20-100). Labels are binned round-half-up like every metric here; a shot with
    no test samples is ``float("nan")``.
    """
    t, p = _pair(y_true, y_pred)
    shot = _shot_of(np.floor(t + 0.5).astype(np.int64), train_counts, many_above, few_below)
    err = np.abs(t - p)
    return {
        name: float(np.mean(err[shot == i])) if (shot == i).any() else float("nan")
        for i, name in enumerate(SHOTS)
    }


def shot_counts(
    y_true: Any, train_counts: Any, *, many_above: int = 100, few_below: int = 20
) -> dict[str, int]:
    """How many samples of ``y_true`` fall in each shot of :func:`shot_mae`."""
    t = _as_1d(y_true, "y_true")
    shot = _shot_of(np.floor(t + 0.5).astype(np.int64), train_counts, many_above, few_below)
    return {name: int(np.count_nonzero(shot == i)) for i, name in enumerate(SHOTS)}


def summarize(
    y_true: Any,
    y_pred: Any,
    y_std: Any = None,
    aar_groups: str | Sequence[Sequence[float | None]] = "lae",
    ccs_max: int = 10,
) -> dict[str, Any]:
    """Every headline metric of one prediction set, as one ``report.json`` row.

    Keys: ``n``, ``mae``, ``cmae``, ``aar``, ``aar_sigma``, ``group_mae`` and ``group_cmae``
    (Table IX groups), ``ccs`` (``ccs_curve`` up to ``ccs_max``) and ``epsilon_error`` -- the
    last only when ``y_std`` is given and every std is finite and positive (sets without an
    annotated std per sample have no epsilon-error; a partial one would not be comparable).
    """
    t, p = _pair(y_true, y_pred)
    details = aar_details(t, p, aar_groups)
    out: dict[str, Any] = {
        "n": int(t.size),
        "mae": details["mae"],
        "cmae": cmae(t, p),
        "aar": details["aar"],
        "aar_sigma": details["sigma"],
        "group_mae": group_mae(t, p),
        "group_cmae": group_cmae(t, p),
        "ccs": ccs_curve(t, p, ccs_max),
    }
    if y_std is not None:
        s = _as_1d(y_std, "y_std", finite=False)
        if s.shape != t.shape:
            raise ValueError(
                f"y_true has {t.size} values but y_std has {s.size}; give one std per sample"
            )
        if bool(np.all(np.isfinite(s) & (s > 0))):
            out["epsilon_error"] = epsilon_error(t, p, s)
    return out
