"""Gender and race as answers: accuracy and confusion matrices of a multi-task model (Xing et
al. 3.3; the hybrid net's race-gender group as well), for validation, the evaluation report
and its plots.

Why a module of its own: the age rows of a report are about one number per image; these are
classifications with their own metrics (accuracy over the images that carry the label, a
confusion matrix with the true class in rows), their own names (``ageray.data.labels``:
UTKFace's codes) and their own figures. Predictions come from
:func:`ageray.inference.collect_predictions`: labels ``gender`` / ``race`` (-1 absent),
flip-averaged probabilities ``gender_probs`` / ``race_probs`` and, for the hybrid net,
``group_probs`` with the (gender, race) pair of each group in ``_groups``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ageray.data.labels import GENDERS, RACES

__all__ = [
    "TRAITS",
    "group_name",
    "markdown_traits",
    "plot_confusions",
    "trait_metrics",
    "trait_report",
    "true_groups",
]

TRAITS = ("gender", "race", "group")


def group_name(gender: int, race: int) -> str:
    """A race-gender group's short name, Xing's style: race initial + gender initial (BF =
    black female, WM = white male; UTKFace adds A, I, O for asian, indian, other)."""
    return f"{RACES[race][0].upper()}{GENDERS[gender][0].upper()}"


def true_groups(
    gender: np.ndarray, race: np.ndarray, groups: Sequence[Sequence[int]]
) -> np.ndarray:
    """Each sample's group index in ``groups`` ((gender, race) pairs); -1 when a label is
    absent or the pair is in no group (Morph's four groups on a UTKFace face of another
    race)."""
    index = {(int(g), int(r)): k for k, (g, r) in enumerate(groups)}
    g = np.asarray(gender).astype(int)
    r = np.asarray(race).astype(int)
    return np.array([index.get((a, b), -1) for a, b in zip(g, r)], dtype=int)


def _names(trait: str, preds: Mapping[str, Any], width: int) -> list[str]:
    if trait == "gender":
        base: Sequence[str] = GENDERS
    elif trait == "race":
        base = RACES
    else:
        base = [group_name(g, r) for g, r in preds.get("_groups") or ()]
    return [base[i] if i < len(base) else str(i) for i in range(width)]


def _labels_and_probs(preds: Mapping[str, Any], trait: str) -> tuple[np.ndarray, np.ndarray] | None:
    probs = preds.get(f"{trait}_probs")
    if probs is None:
        return None
    probs = np.asarray(probs, dtype=np.float64)
    if trait == "group":
        if "gender" not in preds or not preds.get("_groups"):
            return None
        labels = true_groups(preds["gender"], preds["race"], preds["_groups"])
    else:
        if trait not in preds:
            return None
        labels = np.asarray(preds[trait]).astype(int)
    return labels, probs


def _section(labels: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy over the samples with a label in range, the confusion matrix (rows: true,
    columns: predicted) and per-class recall and counts."""
    width = probs.shape[1]
    known = (labels >= 0) & (labels < width)
    y, pred = labels[known], probs[known].argmax(1)
    confusion = np.zeros((width, width), dtype=int)
    np.add.at(confusion, (y, pred), 1)
    counts = confusion.sum(1)
    recall = [float(confusion[i, i] / c) if c else math.nan for i, c in enumerate(counts)]
    present = [r for r in recall if not math.isnan(r)]
    return {
        "labels": names,
        "count": int(known.sum()),
        "accuracy": float((y == pred).mean()) if len(y) else math.nan,
        # the mean of per-class recall: a majority-class guess scores 1/classes, not the share
        "balanced_accuracy": float(np.mean(present)) if present else math.nan,
        "recall": dict(zip(names, recall)),
        "support": dict(zip(names, (int(c) for c in counts))),
        "confusion": confusion.tolist(),
    }


def trait_report(preds: Mapping[str, Any]) -> dict[str, Any]:
    """``{"gender": section, "race": section[, "group": section]}`` for the traits the model
    predicts and the split labels (empty for a model without gender/race heads)."""
    out: dict[str, Any] = {}
    for trait in TRAITS:
        pair = _labels_and_probs(preds, trait)
        if pair is None:
            continue
        labels, probs = pair
        if not ((labels >= 0) & (labels < probs.shape[1])).any():
            continue
        out[trait] = _section(labels, probs, _names(trait, preds, probs.shape[1]))
    return out


def trait_metrics(preds: Mapping[str, Any], *, prefix: str = "val") -> dict[str, float]:
    """``<prefix>_gender_acc``, ``<prefix>_race_acc``, ``<prefix>_group_acc`` (and the
    balanced accuracies) for validation and MLflow; finite values only."""
    out: dict[str, float] = {}
    for trait, sec in trait_report(preds).items():
        for key, name in (("accuracy", "acc"), ("balanced_accuracy", "balanced_acc")):
            v = sec[key]
            if isinstance(v, float) and math.isfinite(v):
                out[f"{prefix}_{trait}_{name}"] = v
    return out


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def markdown_traits(traits: Mapping[str, Any]) -> list[str]:
    """The report.md section: accuracy per trait, then each confusion matrix."""
    if not traits:
        return []
    lines = [
        "",
        "## Gender and race",
        "",
        "Accuracy over the test images that carry the label; balanced accuracy is the mean "
        "recall over classes (a guess of the commonest class scores 1/classes).",
        "",
        "| trait | images | accuracy | balanced accuracy |",
        "|---|---|---|---|",
    ]
    for trait, sec in traits.items():
        lines.append(
            f"| {trait} | {sec['count']} | {_pct(sec['accuracy'])} | "
            f"{_pct(sec['balanced_accuracy'])} |"
        )
    for trait, sec in traits.items():
        names = sec["labels"]
        lines += ["", f"Confusion matrix, {trait} (rows: true, columns: predicted).", ""]
        lines += ["| true \\ predicted | " + " | ".join(names) + " |"]
        lines += ["|---|" + "|".join("---" for _ in names) + "|"]
        for name, row in zip(names, sec["confusion"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def plot_confusions(traits: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``confusion_<trait>.png``: each confusion matrix, normalised per true class (counts
    written in the cells), so a rare class's errors are as visible as a common one's."""
    from ageray.evaluation.tables import pyplot, save_figure

    paths = []
    for trait, sec in traits.items():
        plt = pyplot()
        m = np.asarray(sec["confusion"], dtype=float)
        rows = m.sum(1, keepdims=True)
        share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        n = len(sec["labels"])
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(n):
            for j in range(n):
                color = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(n), sec["labels"], rotation=45 if n > 4 else 0, fontsize=8)
        ax.set_yticks(range(n), sec["labels"], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{trait}: accuracy {_pct(sec['accuracy'])} (n={sec['count']})", fontsize=9)
        paths.append(save_figure(fig, Path(out_dir) / f"confusion_{trait}.png"))
    return paths
