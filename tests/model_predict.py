"""GLAE's test protocol on an ``AgeModel``, for tests: what ``AgeModel.predict`` was.

The library answers through one path (``ageray.inference``: ``ImagePredictor`` calls
``AgeModel._predict`` under its own eval / inference mode); tests that check the model's
answers directly (routing, saved models, heads) call this instead of a public method that
nothing else used.
"""

from __future__ import annotations

import torch

from ageray.model import AgeModel, Prediction, RoutingRule


def predict(
    model: AgeModel,
    images: torch.Tensor,
    *,
    flip: bool = True,
    rule: str | RoutingRule | None = None,
    labels: torch.Tensor | None = None,
) -> Prediction:
    """``model._predict`` on every head in eval mode under ``torch.inference_mode``, the
    previous mode restored; ``rule`` defaults to the model's ``routing_rule`` (a name is
    resolved by ``model.routing_module``), ``labels`` only for the ``oracle`` bound."""
    was_training = model.training
    names = list(model.heads.keys())
    module = model.routing_module(rule)
    try:
        model.eval()
        with torch.inference_mode():
            return model._predict(images, names, flip=flip, rule=module, labels=labels)
    finally:
        model.train(was_training)
