"""Predictions over a stream of decoded batches -> the predictions of every head and routing
rule, and the metrics of those predictions.

Why one module: training's validation and the evaluation of a saved model must predict the
same way (GLAE's protocol: the image and its flip through both heads in one pass, Adaptive
Routing per image), or the validation MAE that picks a checkpoint would not be the MAE the
evaluation reports. Both call :func:`collect_predictions`; it sits below training and
evaluation and knows nothing of ranks or Ray (training gathers each rank's part and joins
them with :func:`merge_predictions`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ageray import metrics as M

__all__ = [
    "collect_predictions",
    "merge_predictions",
    "predict_split",
    "prediction_metrics",
]


@torch.no_grad()
def collect_predictions(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    flip: bool = True,
    amp: str = "auto",
) -> dict[str, Any]:
    """Predict every batch of ``loader`` (batches with ``image``, ``age``, ``age_std``,
    ``key``) with ``model`` (unwrapped, not DDP) in eval mode; its mode is restored after.

    The forward is the one every serving path runs (:class:`~.backends.TorchBackend`, i.e.
    :class:`~.predictor.RoutedGraph`: image + flip, both heads, the model's rule), so
    the validation MAE that picks a checkpoint and the evaluation's numbers are the answers
    Serve, the pyfunc model and ``jobs.predict`` give for the same decoded images.

    Returns numpy arrays: ``age``, ``age_std`` and per head ``<head>_age``, ``<head>_kl``;
    ``routed_age`` and ``routed_choice``: the answer of the model's own routing rule (what
    it serves: ``model.routing_rule``, GLAE's smaller KL unless a fitted rule was made the
    default; its name is ``_routing_rule``). With two routed heads also ``route_features``
    (N, 9) and, for every rule the model can apply plus the ``oracle`` bound,
    ``rule_<name>_age`` and ``rule_<name>_weight`` (the balanced head's weight), computed
    from the same forward pass by the same rule modules, so the numbers are the ones
    ``AgeModel._predict(x, rule=name)`` gives; ``bigger_age`` / ``bigger_choice`` repeat Table
    IX's mirror rule under their older names. ``gender`` / ``race``: the labels (-1 absent);
    multi-task models add ``gender_probs`` / ``race_probs`` (and the hybrid net
    ``group_probs``, with its groups' (gender, race) pairs in ``_groups``). ``_keys`` holds
    the sample keys in order and ``_skipped`` the loader's skip counts.
    """
    from .backends import TorchBackend

    was_training = model.training
    backend = TorchBackend(model, flip=flip, device=device, amp=amp)
    rules = _scored_rules(model)
    parts: dict[str, list[np.ndarray]] = {}
    keys: list[str] = []
    try:
        for batch in loader:
            out = backend.tensors(batch["image"])
            _add(parts, "age", batch["age"])
            _add(parts, "age_std", batch["age_std"])
            keys.extend(batch["key"])
            _add_answers(parts, model, batch, out)
            if out.get("features") is not None:
                _add_rules(parts, rules, batch, out)
    finally:
        model.train(was_training)
    out_arrays: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
    out_arrays["_routing_rule"] = getattr(model, "routing_rule", None)
    groups = getattr(model.heads["vanilla"], "groups", None)  # type: ignore[index]
    if groups:  # the hybrid net's (gender, race) pair of each group
        out_arrays["_groups"] = [list(pair) for pair in groups]
    out_arrays["_keys"] = np.array(keys, dtype=object)
    out_arrays["_skipped"] = dict(getattr(loader, "skipped", {}) or {})
    return out_arrays


def _add(parts: dict[str, list[np.ndarray]], name: str, value: torch.Tensor | np.ndarray) -> None:
    """Append one batch's ``value`` to column ``name`` (float64 numpy, on the CPU)."""
    arr = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value
    parts.setdefault(name, []).append(np.asarray(arr, dtype=np.float64))


def _add_answers(
    parts: dict[str, list[np.ndarray]],
    model: nn.Module,
    batch: Mapping[str, Any],
    out: Mapping[str, torch.Tensor],
) -> None:
    """One batch's per-head ages and KLs, the routed answer, the trait labels and the
    multi-task probabilities."""
    for head in model.heads:  # type: ignore[union-attr]
        _add(parts, f"{head}_age", out[f"age_{head}"])
        if f"kl_{head}" in out:
            _add(parts, f"{head}_kl", out[f"kl_{head}"])
    _add(parts, "routed_age", out["age"])
    _add(parts, "routed_choice", out["head"])
    for trait in ("gender", "race"):  # labels (-1: absent), for the fairness table
        if trait in batch:
            _add(parts, trait, batch[trait])
    for name in ("gender", "race", "group"):  # multi-task probabilities
        if name in out:
            _add(parts, f"{name}_probs", out[name])


def _add_rules(
    parts: dict[str, list[np.ndarray]],
    rules: Mapping[str, Any],
    batch: Mapping[str, Any],
    out: Mapping[str, torch.Tensor],
) -> None:
    """One batch's route features and every scored rule's answer and weight, from the
    same forward pass; ``bigger_*`` repeat Table IX's mirror rule under the older names."""
    from ageray.model.routing import mix_ages

    features = out["features"]
    _add(parts, "route_features", features)
    labels = torch.as_tensor(batch["age"], dtype=torch.float32).to(features.device)
    v, b = out["age_vanilla"], out["age_balanced"]
    with torch.inference_mode():
        for name, rule in rules.items():
            weight = rule(features, labels)
            _add(parts, f"rule_{name}_age", mix_ages(v, b, weight))
            _add(parts, f"rule_{name}_weight", weight)
    _add(parts, "bigger_age", parts["rule_bigger_age"][-1])
    _add(parts, "bigger_choice", (parts["rule_bigger_weight"][-1] >= 0.5).astype(np.float64))


def predict_split(
    model: nn.Module, data: Any, split: str, *, flip: bool = True, amp: str = "auto"
) -> dict[str, Any]:
    """:func:`collect_predictions` over every sample of ``split`` of ``data.shards`` (a
    ``DataConfig``: size, normalisation, batch size, workers) on the model's device, in one
    process (evaluation, fitting a router on the validation split)."""
    from ageray.data.loader import eval_loader

    device = next(model.parameters()).device
    # On GPU the stream hands uint8 images to the device and normalises them there.
    loader = eval_loader(
        data, split, rank=0, world_size=1, device=device if device.type == "cuda" else None
    )
    return collect_predictions(model, loader, device=device, flip=flip, amp=amp)


def _scored_rules(model: nn.Module) -> dict[str, Any]:
    """Every rule a report scores for ``model``: the parameter-free ones, the fitted rules
    the model carries, and the oracle bound (it reads the labels; evaluation only)."""
    from ageray.model.routing import ROUTING_RULES, make_rule

    fitted = dict(getattr(model, "routers", {}) or {})
    rules: dict[str, Any] = {}
    for name, cls in ROUTING_RULES.items():
        if name in fitted:
            rules[name] = fitted[name]
        elif not cls.needs_fit:
            rules[name] = make_rule(name)
    return rules


def merge_predictions(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Join :func:`collect_predictions` results of several ranks (each predicted its share
    of the split) into one, in rank order: arrays and keys concatenated, skips added up."""
    merged: dict[str, Any] = {}
    names = sorted({k for p in parts for k in p if not k.startswith("_")})
    for k in names:
        merged[k] = np.concatenate([p[k] for p in parts if k in p])
    merged["_keys"] = np.array([k for p in parts for k in p.get("_keys", ())], dtype=object)
    skipped: Counter[str] = Counter()
    for p in parts:
        skipped.update({k: int(v) for k, v in (p.get("_skipped") or {}).items()})
    merged["_skipped"] = dict(skipped)
    groups = [p["_groups"] for p in parts if p.get("_groups")]
    if groups:
        merged["_groups"] = groups[0]
    rules = {p.get("_routing_rule") for p in parts if p.get("_routing_rule")}
    merged["_routing_rule"] = rules.pop() if len(rules) == 1 else None
    return merged


def prediction_metrics(
    preds: Mapping[str, Any], *, aar_groups: str = "lae", prefix: str = "val"
) -> dict[str, float]:
    """MAE, CMAE, AAR for every row present: ``<prefix>_*`` for the vanilla head,
    ``<prefix>_balanced_*`` and ``<prefix>_routed_*`` when the model has a balanced head;
    ``<prefix>_samples`` counts the samples."""
    y = preds["age"]
    out: dict[str, float] = {}
    if len(y) == 0:
        return out
    rows = [("vanilla", "vanilla_age"), ("balanced", "balanced_age"), ("routed", "routed_age")]
    for row, key in rows:
        if key not in preds:
            continue
        if row == "routed" and "balanced_age" not in preds:
            continue
        yh = preds[key]
        tag = f"{prefix}_{row}" if row != "vanilla" else prefix
        out[f"{tag}_mae"] = M.mae(y, yh)
        out[f"{tag}_cmae"] = M.cmae(y, yh)
        out[f"{tag}_aar"] = M.aar(y, yh, groups=aar_groups)
    out[f"{prefix}_samples"] = float(len(y))
    return out
