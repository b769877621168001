"""The age model: one timm trunk, a vanilla head, optionally a balanced head, and routing.

``build_model(cfg)`` is the one factory (timm style): it checks every shape at construction
(FR factor vs backbone channels, the projection's input size, multi-task stage maps) so a bad
recipe fails before any data is read. ``AgeModel.forward`` runs the backbone once and every
requested head on the same features; ``_predict`` implements GLAE's test protocol (image and
flip in one batch, both heads, Adaptive Routing) for the one inference path. Heads are built
by name from ``head_registry``.

Two-stage training (LAE 2.4 / GLAE III-D): ``add_balanced_head`` deep-copies the vanilla head
and freezes everything else; the frozen backbone stays in eval mode even under
``model.train()``, so stage 2's class-balanced batches cannot move its BatchNorm statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ageray.config import Config, DataConfig, ModelConfig

from .backbone import Backbone, LoadReport, create_backbone
from .formulation import Formulation
from .head_registry import head_builder, make_head
from .heads import AgeHead
from .routing import (
    ROUTING_RULES,
    RoutingRule,
    check_servable,
    head_stats,
    make_rule,
    mix_ages,
    mix_heads,
    route_features,
)

__all__ = ["AgeModel", "Prediction", "build_model"]

HEAD_NAMES = ("vanilla", "balanced")
Trainable = Literal["head", "classifier"]


@dataclass
class Prediction:
    """``_predict``'s answer (GLAE's test protocol); tensors on the model's device.

    ``age`` (B,) the routed answer; ``probs`` (B, K) its flip-averaged distribution (None for
    mse/mae/ordinal); ``head`` (B,) 0 = vanilla, 1 = balanced; ``heads[name]`` = {"age",
    "probs", "kl", "std", "entropy"} per head (kl = KL(p || p_flip), None without flip or a
    distribution); ``gender`` / ``race`` (B, G) / (B, R) flip-averaged probabilities of the
    vanilla head for multi-task models, else None; ``group`` (B, N) the hybrid net's race-gender
    group probabilities (flip-averaged). When two distribution heads were routed:
    ``rule`` (its name), ``weight`` (B,) the balanced head's weight (0 or 1 for a hard rule)
    and ``features`` (B, 9) the routing features (``ageray.model.routing.FEATURES``), from
    which evaluation scores every other rule without another forward pass.
    """

    age: torch.Tensor
    probs: torch.Tensor | None
    head: torch.Tensor
    heads: dict[str, dict[str, torch.Tensor | None]] = field(default_factory=dict)
    gender: torch.Tensor | None = None
    race: torch.Tensor | None = None
    group: torch.Tensor | None = None
    rule: str | None = None
    weight: torch.Tensor | None = None
    features: torch.Tensor | None = None


class AgeModel(nn.Module):
    """Backbone + ``heads`` (``nn.ModuleDict``: "vanilla", and "balanced" after stage 2).

    ``forward(images, heads=None, return_local=None)`` returns ``{"features": F, "<head>": dict}``
    for the requested heads (default: all present); see docs/design.md for the head dict.
    ``return_local`` (default: ``self.training``) adds the GLAE head's ``local_logits``.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: AgeHead,
        cfg: ModelConfig,
        *,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({"vanilla": head})
        self.cfg = cfg
        self.image_size = image_size
        self.channels_last = bool(cfg.channels_last)
        self.stage2_trainable: Trainable | None = None
        self._frozen: list[str] = []  # submodules kept in eval mode (frozen for stage 2)
        # Fitted routing rules (threshold, learned): buffers saved with the weights. The
        # parameter-free rules (smaller, bigger) are built on demand and never stored.
        self.routers = nn.ModuleDict()
        self.routing_rule = "smaller"  # what _predict applies by default (GLAE eq. 11)

    # ------------------------------------------------------------------ properties

    @property
    def formulation(self) -> Formulation:
        return self.heads["vanilla"].formulation

    @property
    def num_classes(self) -> int:
        return self.formulation.num_classes

    @property
    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    # ------------------------------------------------------------------ forward

    def _resolve(self, heads: str | Sequence[str] | None) -> list[str]:
        if heads is None:
            return list(self.heads.keys())
        names = [heads] if isinstance(heads, str) else list(heads)
        unknown = [n for n in names if n not in self.heads]
        if unknown:
            raise KeyError(
                f"AgeModel has no head(s) {unknown}; present: {list(self.heads.keys())}"
                + ("; call add_balanced_head() for stage 2" if "balanced" in unknown else "")
            )
        return names

    def forward(
        self,
        images: torch.Tensor,
        heads: str | Sequence[str] | None = None,
        return_local: bool | None = None,
    ) -> dict[str, Any]:
        names = self._resolve(heads)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        indices = sorted({i for n in names for i in self.heads[n].stage_indices})
        features, stages = self.backbone(images, indices)
        local = self.training if return_local is None else return_local
        out: dict[str, Any] = {"features": features}
        for name in names:
            out[name] = self.heads[name](features, stages, local)
        return out

    # ------------------------------------------------------------------ stage 2

    def add_balanced_head(self, trainable: Trainable = "head", *, freeze: bool = True) -> AgeHead:
        """Deep-copy the vanilla head into ``heads["balanced"]`` (stage 2's starting point).

        With ``freeze`` (default) also calls ``freeze_for_stage2(trainable)``; ``load_model``
        passes ``freeze=False`` to rebuild a saved two-head model as it was.
        """
        if "balanced" in self.heads:
            raise ValueError("AgeModel already has a balanced head; stage 2 adds it once")
        self.heads["balanced"] = copy.deepcopy(self.heads["vanilla"])
        if freeze:
            self.freeze_for_stage2(trainable)
        return self.heads["balanced"]

    def freeze_for_stage2(self, trainable: Trainable = "head") -> None:
        """Freeze all but the balanced head (``"head"``, GLAE) or its final classifier layer
        (``"classifier"``, LAE: "freeze the model except for the FC").

        Frozen parts get ``requires_grad=False`` and stay in eval mode under ``train()``
        (BatchNorm statistics and dropout of the backbone, the vanilla head, and in
        ``"classifier"`` mode the rest of the balanced head).
        """
        if trainable not in ("head", "classifier"):
            raise ValueError(f"trainable={trainable!r} must be 'head' or 'classifier'")
        if "balanced" not in self.heads:
            raise ValueError("freeze_for_stage2 needs the balanced head; call add_balanced_head()")
        for p in self.parameters():
            p.requires_grad_(False)
        balanced = self.heads["balanced"]
        trainable_modules = (
            [balanced] if trainable == "head" else list(balanced.classifier_layers())
        )
        for module in trainable_modules:
            for p in module.parameters():
                p.requires_grad_(True)
        self._frozen = ["backbone", "heads.vanilla"]
        if trainable == "classifier":
            self._frozen.append("heads.balanced")
        self.stage2_trainable = trainable
        self.train(self.training)

    def stage2_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (after ``freeze_for_stage2``: the balanced head's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> AgeModel:
        """``nn.Module.train`` that keeps the frozen parts in eval mode."""
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        if self.stage2_trainable == "classifier" and mode:
            for module in self.heads["balanced"].classifier_layers():
                module.train(True)
        return self

    # ------------------------------------------------------------------ backbone weights

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's weights with timm's own key names (loadable into a timm model)."""
        return self.backbone.model.state_dict()

    def load_backbone(self, source: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load trunk weights (identity pretraining, LAE 2.3) from a file, folder or dict."""
        return self.backbone.load_pretrained(source)

    # ------------------------------------------------------------------ routing

    def set_router(self, rule: RoutingRule, *, serve: bool = True) -> None:
        """Attach a fitted rule (stored with the weights); ``serve`` makes it the default
        rule of the inference path (and so of Serve, the pyfunc model and exports)."""
        if not isinstance(rule, RoutingRule):
            raise TypeError(f"set_router expects a RoutingRule, got {type(rule).__name__}")
        check_servable(rule.name, "AgeModel.set_router")
        if not rule.is_fitted:
            raise ValueError(f"routing rule {rule.name!r} is not fitted; call rule.fit() first")
        device = next(self.parameters()).device
        self.routers[rule.name] = rule.to(device)
        if serve:
            self.routing_rule = rule.name

    def use_rule(self, name: str) -> None:
        """Make ``name`` the default rule (a fitted one must be attached already)."""
        check_servable(name, "AgeModel.use_rule")
        self.routing_module(name)
        self.routing_rule = name

    def routing_info(self) -> dict[str, Any]:
        """``model.json``'s ``routing`` entry: the default rule and, per attached fitted rule,
        the settings that rebuild it (its tensors are in the safetensors file) and its fit
        report."""
        rules = {
            name: {"settings": rule.settings(), "fit": rule.fit_report or {}}
            for name, rule in self.routers.items()
        }
        return {"rule": self.routing_rule, "rules": rules}

    def restore_routing(self, info: Mapping[str, Any] | None) -> None:
        """Rebuild the attached rules from ``routing_info()`` (before ``load_state_dict``
        fills their buffers) and the default rule. ``None``: a model saved before routing
        rules existed, which routes by GLAE's eq. 11."""
        info = info or {}
        for name, spec in (info.get("rules") or {}).items():
            rule = make_rule(name, **(spec.get("settings") or {}))
            rule.fit_report = dict(spec.get("fit") or {})
            self.routers[name] = rule
        default = info.get("rule", "smaller")
        check_servable(default, "model.json routing.rule")
        if ROUTING_RULES[default].needs_fit and default not in self.routers:
            raise ValueError(
                f"model.json: routing.rule={default!r} but no fitted {default!r} rule is saved"
            )
        self.routing_rule = default

    def routing_module(self, rule: str | RoutingRule | None = None) -> RoutingRule:
        """The rule module for a name (default: ``routing_rule``): the attached fitted one,
        or a fresh parameter-free one; a rule that needs fitting and is not attached fails."""
        if isinstance(rule, RoutingRule):
            return rule
        name = self.routing_rule if rule is None else rule
        if name in self.routers:
            return self.routers[name]  # type: ignore[return-value]
        module = make_rule(name)
        if ROUTING_RULES[name].needs_fit:
            raise ValueError(
                f"this model has no fitted {name!r} routing rule (fitted: "
                f"{sorted(self.routers.keys()) or 'none'}); fit it on a validation split and "
                "attach it with model.set_router(rule), or use 'smaller' / 'bigger'"
            )
        return module

    # ------------------------------------------------------------------ inference

    def _predict(
        self,
        images: torch.Tensor,
        names: list[str],
        *,
        flip: bool,
        rule: RoutingRule,
        labels: torch.Tensor | None = None,
    ) -> Prediction:
        """GLAE's test protocol: the images and their horizontal flips in ONE forward pass,
        every head in ``names``. The caller sets eval mode and ``torch.inference_mode`` (the
        one path, ``ageray.inference.ImagePredictor``, does; tests use
        ``tests/model_predict.py``). Traceable: Python branches only on the model's
        structure (heads, formulation, flip), never on data values.

        Per head (distribution formulations): probs = 0.5 * (p + p_flip), age = the
        expectation of probs, kl = KL(p || p_flip). With a balanced head the answer is
        routed by ``rule`` (``routing_module(name)`` gives it; "smaller" = GLAE eq. 11, see
        ``ageray.model.routing``); with one head it is the vanilla head (head 0). ``labels``
        are only for the evaluation-only ``oracle`` bound. Without flip there is no KL, so
        the vanilla head answers. Regression / ordinal formulations: age = mean of the
        image and flip ages, head 0.
        """
        b = images.shape[0]
        batch = torch.cat([images, images.flip(-1)]) if flip else images
        out = self.forward(batch, heads=names, return_local=False)
        heads = {name: self._head_answer(out[name], b=b, flip=flip) for name in names}
        van = heads["vanilla"]
        age: torch.Tensor = van["age"]  # type: ignore[assignment]
        probs = van["probs"]
        choice = torch.zeros(b, dtype=torch.long, device=images.device)
        routed: dict[str, Any] = {}
        bal = heads.get("balanced")
        if flip and van["kl"] is not None and bal is not None and bal["kl"] is not None:
            features = route_features(van, bal)
            weight = rule(features, labels)
            probs = mix_heads(van["probs"], bal["probs"], weight)  # type: ignore[arg-type]
            age = mix_ages(van["age"], bal["age"], weight)  # type: ignore[arg-type]
            choice = (weight >= 0.5).long()
            routed = {"rule": rule.name, "weight": weight, "features": features}
        gender = race = group = None
        van_out = out["vanilla"]
        if "gender_logits" in van_out:
            gender = _avg(torch.softmax(van_out["gender_logits"].float(), -1), b, flip)
            race = _avg(torch.softmax(van_out["race_logits"].float(), -1), b, flip)
        if "group_logits" in van_out:
            group = _avg(torch.softmax(van_out["group_logits"].float(), -1), b, flip)
        return Prediction(
            age=age,
            probs=probs,
            head=choice,
            heads=heads,
            gender=gender,
            race=race,
            group=group,
            **routed,
        )

    def _head_answer(
        self, d: dict[str, Any], *, b: int, flip: bool
    ) -> dict[str, torch.Tensor | None]:
        """One head's flip-averaged answer: its distribution statistics (``head_stats``)
        and age as the formulation answers (the argmax for one-hot as the paper reads it;
        the hybrid net's is eq. 13 on its group estimators' answers, per pass); ordinal:
        the K-1 probabilities averaged, then counted (or summed); regression: the mean age."""
        form = self.formulation
        if "logits" in d:
            logits = d["logits"]
            answer = head_stats(*((logits[:b], logits[b:]) if flip else (logits, None)))
            if "group_ages" in d:
                answer["age"] = _avg(d["age"].float(), b, flip)
            elif form.argmax:
                answer["age"] = form.age_of_probs(answer["probs"])  # type: ignore[arg-type]
            return answer
        if "ordinal_logits" in d and "group_ages" not in d:
            q = _avg(torch.sigmoid(d["ordinal_logits"].float()), b, flip)
            return {"age": form.age_of_ordinal(q), "probs": None, "kl": None}
        return {"age": _avg(d["age"].float(), b, flip), "probs": None, "kl": None}


def _avg(both: torch.Tensor, b: int, flip: bool) -> torch.Tensor:
    """The mean of the image and flip halves of ``both`` (the images alone without flip)."""
    return 0.5 * (both[:b] + both[b:]) if flip else both


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig | Config, image_size: int | None = None) -> AgeModel:
    """The model a recipe describes; every shape is checked here, before weights load.

    ``cfg`` is ``cfg.model`` or a whole ``Config`` (then ``image_size`` defaults to
    ``cfg.data.image_size``). The GLAE head's projection is sized for one input resolution:
    pass ``image_size`` (pixels, square) -- when neither gives one, ``DataConfig``'s default
    (112) is used and a forward at another size fails with a message saying so. Pretrained
    trunk weights (``model.pretrained``) load last, from a local file only.
    """
    mc = cfg.model if isinstance(cfg, Config) else cfg
    if image_size is None and isinstance(cfg, Config):
        image_size = cfg.data.image_size
    if image_size is None:
        image_size = DataConfig().image_size
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be positive")
    head_builder(mc.head)  # an unknown head fails here, before any weights are built
    form = Formulation(
        mc.formulation, num_classes=mc.num_classes, age_min=mc.age_min, answer=mc.answer
    )
    if mc.proj_depth < 0:
        raise ValueError(f"model.proj_depth={mc.proj_depth} must be >= 0")
    if not 0.0 <= mc.drop_rate < 1.0:
        raise ValueError(f"model.drop_rate={mc.drop_rate} must be in [0, 1)")
    backbone = create_backbone(mc.backbone)
    head = make_head(mc, backbone, image_size=image_size, form=form)
    model = AgeModel(backbone, head, mc, image_size=image_size)
    if mc.pretrained:
        model.load_backbone(mc.pretrained)
    if mc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
