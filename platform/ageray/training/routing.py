"""The pipeline's routing step: after stage 2, fit the configured routing rules on the
validation split and save the routed model (stage 2's weights + the fitted rules + the rule
to serve) as the model the evaluation and the registry get.

Why a step of its own: a fitted rule is part of the model people deploy (Serve, the pyfunc
model and exports apply it), so it is fitted once, on a held-out split, and travels in the
model folder (``model.json`` + safetensors) instead of being refitted wherever the model is
evaluated. ``config`` refuses ``routing.fit_split`` equal to the test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ageray.config import Config

__all__ = ["NothingToRoute", "fit_routing"]


class NothingToRoute(ValueError):
    """The model has no pair of distribution heads to route between (one head, or a
    regression / ordinal formulation); the pipeline keeps the stage-2 model as it is."""


def fit_routing(
    model_dir: str | Path, cfg: Config, out_dir: str | Path
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Load the stage-2 model, predict ``cfg.routing.fit_split``, fit the configured rules,
    save the routed model to ``out_dir``; returns ``(out_dir, {rule: fit report})``.
    Raises :class:`NothingToRoute` when the model has nothing to route."""
    import torch

    from ageray.inference import predict_split
    from ageray.model import load_model, save_model
    from ageray.model.routing.fitting import fit_rules

    model, info = load_model(model_dir)
    if "balanced" not in model.head_names or not model.formulation.is_distribution:
        raise NothingToRoute(
            f"{model_dir}: heads {model.head_names}, formulation {model.formulation.name}: "
            "routing needs a vanilla and a balanced distribution head (ldl, onehot)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    split = cfg.routing.fit_split
    preds = predict_split(model, cfg.data, split, flip=True, amp=cfg.train.amp)
    n = len(preds.get("age", ()))
    if "route_features" not in preds and n:
        raise NothingToRoute(f"{model_dir}: the model's predictions carry no routing features")
    if n < 2:
        raise ValueError(
            f"routing.fit_split={split!r} of {cfg.data.shards} has {n} images; fitting a "
            "router needs a held-out split with images (write it with jobs.make_shards)"
        )
    reports = fit_rules(model, preds["route_features"], preds["age"], cfg.routing, split=split)
    meta = dict(info.get("meta") or {})
    meta["routing_fit"] = {"split": split, "samples": n}
    saved = save_model(model.to("cpu"), out_dir, cfg, meta=meta)
    return saved, reports
