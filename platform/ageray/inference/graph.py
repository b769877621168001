"""The routed model as one module with named tensor outputs: what every backend runs.

Why a module of its own: Serve, batch prediction, the pyfunc model, evaluation and training's
validation all need the same numbers from a batch of images (GLAE's protocol: the images and
their flips in one pass, both heads, the model's routing rule with its fitted parameters), and
the ONNX / TorchScript exports must compute exactly those numbers without Python. So the
forward of :class:`RoutedGraph` *is* the graph that is exported, and its outputs have fixed
names; a backend (torch here, ONNX Runtime in :mod:`.backends`) returns them as a dict, and
everything after (answers, intervals, rows) is computed from that dict by the same code.

Outputs (``output_names``; tensors of batch size B):

=================  =========  ==========================================================
name               shape      what
=================  =========  ==========================================================
``age``            (B,)       the routed answer (years)
``head``           (B,)       int64: 0 = vanilla answered, 1 = balanced (weight >= 0.5)
``weight``         (B,)       the balanced head's weight (0/1 for hard rules; 0 unrouted)
``probs``          (B, K)     the routed, flip-averaged age distribution (distributions)
``age_<head>``     (B,)       each head's flip-averaged answer
``kl_<head>``      (B,)       each head's KL(p || p_flip) (with flip, distributions)
``features``       (B, 9)     routing features (two routed heads): evaluation scores every
                              other rule from them without another forward pass
``gender``         (B, G)     flip-averaged gender probabilities (multi-task models)
``race``           (B, R)     flip-averaged race probabilities (multi-task models)
``group``          (B, N)     flip-averaged race-gender group probabilities (hybrid net)
=================  =========  ==========================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["RoutedGraph"]


class RoutedGraph(nn.Module):
    """``forward(images) -> tuple`` of tensors in ``output_names`` order (a tuple, not a dict,
    so ``torch.onnx.export`` / ``torch.jit.trace`` name them one to one).

    ``rule``: a routing rule name or module (default: the model's own ``routing_rule``, a
    fitted one included); the module is held here, so its fitted parameters are part of an
    exported graph. The wrapped model is put in eval mode (inference only).
    """

    def __init__(self, model: nn.Module, *, rule: Any = None, flip: bool = True) -> None:
        super().__init__()
        self.model = model
        self.flip = bool(flip)
        self.rule = model.routing_module(rule)  # type: ignore[operator]
        self.rule_name = self.rule.name
        self.head_names = list(model.heads.keys())  # type: ignore[union-attr]
        self.output_names = self._names()
        self.eval()

    def _names(self) -> list[str]:
        form = self.model.formulation  # type: ignore[union-attr]
        dist = bool(form.is_distribution)
        routed = self.flip and dist and "balanced" in self.head_names
        names = ["age", "head", "weight"]
        if dist:
            names.append("probs")
        for h in self.head_names:
            names.append(f"age_{h}")
            if self.flip and dist:
                names.append(f"kl_{h}")
        if routed:
            names.append("features")
        if getattr(self.model.cfg, "multitask", "none") != "none":  # type: ignore[union-attr]
            names += ["gender", "race"]
        if getattr(self.model.cfg, "multitask", "none") == "hybrid":  # type: ignore[union-attr]
            names.append("group")
        return names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pred = self.model._predict(  # type: ignore[operator]
            images, self.head_names, flip=self.flip, rule=self.rule
        )
        b = images.shape[0]
        weight = pred.weight
        if weight is None:
            weight = pred.head.to(torch.float32)
        out: dict[str, torch.Tensor | None] = {
            "age": pred.age,
            "head": pred.head,
            "weight": weight,
            "probs": pred.probs,
            "features": pred.features,
            "gender": pred.gender,
            "race": pred.race,
            "group": pred.group,
        }
        for h, res in pred.heads.items():
            out[f"age_{h}"] = res["age"]
            out[f"kl_{h}"] = res.get("kl")
        missing = [n for n in self.output_names if out.get(n) is None]
        if missing:
            raise RuntimeError(f"RoutedGraph: outputs {missing} missing for batch of {b}")
        return tuple(out[n] for n in self.output_names)  # type: ignore[misc]

    def named(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``forward`` as a dict keyed by ``output_names``."""
        return dict(zip(self.output_names, self.forward(images)))
