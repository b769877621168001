"""Heads by name, in timm's registry style: ``@register_head("glae")`` adds an age head
(``model.head``), ``@register_multitask("deep")`` an arrangement of the age head with gender
and race (``model.multitask``); ``make_head(mc, backbone, ...)`` builds what a recipe names.

Why a registry and not an if-chain: each entry is one small builder that can be read and
tested on its own, a new head is one decorated function (nothing else to edit), and an
unknown name fails the same way everywhere, listing the registered ones (as the routing
rules' ``make_rule`` does, ``ageray.model.routing.registry``).

An age-head builder gets ``(mc, backbone, image_size=, form=)``; an arrangement builder gets
``(mc, backbone, age_head, form=)`` where ``age_head()`` builds the recipe's age head on
demand (the hybrid net has its own per-group estimators and never calls it).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Protocol

from ageray.config import ModelConfig

from .backbone import Backbone
from .formulation import Formulation
from .heads import AgeHead, GLAEHead, LinearHead
from .multitask import DeepMultiTask, HybridMultiTask, ParallelMultiTask, hybrid_groups

__all__ = [
    "HEADS",
    "MULTITASK",
    "head_builder",
    "make_head",
    "multitask_builder",
    "register_head",
    "register_multitask",
]


class HeadBuilder(Protocol):
    def __call__(
        self, mc: ModelConfig, backbone: Backbone, *, image_size: int, form: Formulation
    ) -> AgeHead: ...


class MultitaskBuilder(Protocol):
    def __call__(
        self,
        mc: ModelConfig,
        backbone: Backbone,
        age_head: Callable[[], AgeHead],
        *,
        form: Formulation,
    ) -> AgeHead: ...


HEADS: dict[str, HeadBuilder] = {}
MULTITASK: dict[str, MultitaskBuilder] = {}


def _register(table: dict, what: str, name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        if name in table and table[name] is not fn:
            raise ValueError(f"{what} {name!r} is already registered")
        table[name] = fn
        return fn

    return add


def _lookup(table: dict, key: str, name: str) -> Callable:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{key}={name!r} is not registered{hint} (registered: {sorted(table)})")


def register_head(name: str) -> Callable[[HeadBuilder], HeadBuilder]:
    """Decorator: register an age-head builder as ``model.head=<name>``."""
    return _register(HEADS, "head", name)


def register_multitask(name: str) -> Callable[[MultitaskBuilder], MultitaskBuilder]:
    """Decorator: register a multi-task arrangement as ``model.multitask=<name>``."""
    return _register(MULTITASK, "multitask arrangement", name)


def head_builder(name: str) -> HeadBuilder:
    """The registered age-head builder ``name``; unknown names fail with the known ones."""
    return _lookup(HEADS, "model.head", name)  # type: ignore[return-value]


def multitask_builder(name: str) -> MultitaskBuilder:
    """The registered arrangement ``name``; unknown names fail with the known ones."""
    return _lookup(MULTITASK, "model.multitask", name)  # type: ignore[return-value]


def make_head(
    mc: ModelConfig, backbone: Backbone, *, image_size: int, form: Formulation
) -> AgeHead:
    """The head ``mc`` names: its arrangement (``mc.multitask``) around its age head
    (``mc.head``), shapes checked against ``backbone`` at ``image_size`` pixels."""
    arrange = multitask_builder(mc.multitask)
    build = head_builder(mc.head)

    def age_head() -> AgeHead:
        return build(mc, backbone, image_size=image_size, form=form)

    return arrange(mc, backbone, age_head, form=form)


# ------------------------------------------------------------------------ age heads


@register_head("linear")
def _linear(mc: ModelConfig, backbone: Backbone, *, image_size: int, form: Formulation) -> AgeHead:
    """GAP + Linear on the final features (the standard baseline)."""
    return LinearHead(backbone.out_channels, form, drop_rate=mc.drop_rate)


@register_head("glae")
def _glae(mc: ModelConfig, backbone: Backbone, *, image_size: int, form: Formulation) -> AgeHead:
    """GLAE's FR + PA head, sized for the backbone's feature map at ``image_size``."""
    channels = backbone.out_channels
    height, width = backbone.feature_size(image_size)
    try:
        return GLAEHead(
            channels,
            (height, width),
            form,
            r=mc.fr_r,
            kernel_size=mc.fr_kernel,
            stride=mc.fr_stride,
            proj_depth=mc.proj_depth,
            drop_rate=mc.drop_rate,
        )
    except ValueError as exc:
        raise ValueError(
            f"model.backbone={mc.backbone} gives a {channels}x{height}x{width} feature map at "
            f"{image_size} px; with model.fr_r={mc.fr_r}, fr_kernel={mc.fr_kernel}, "
            f"fr_stride={mc.fr_stride}: {exc}"
        ) from exc


# ------------------------------------------------------------------------ arrangements


def _check_groups(mc: ModelConfig) -> dict[str, int]:
    if mc.num_genders < 1 or mc.num_races < 1:
        raise ValueError(
            f"model.multitask={mc.multitask} needs num_genders and num_races >= 1, got "
            f"{mc.num_genders} and {mc.num_races}"
        )
    return {"num_genders": mc.num_genders, "num_races": mc.num_races}


@register_multitask("none")
def _single(
    mc: ModelConfig, backbone: Backbone, age_head: Callable[[], AgeHead], *, form: Formulation
) -> AgeHead:
    """Age only: the age head itself."""
    return age_head()


@register_multitask("parallel")
def _parallel(
    mc: ModelConfig, backbone: Backbone, age_head: Callable[[], AgeHead], *, form: Formulation
) -> AgeHead:
    """Xing 3.3.1: gender and race heads beside the age head on the final features."""
    groups = _check_groups(mc)
    return ParallelMultiTask(age_head(), backbone.out_channels, **groups, drop_rate=mc.drop_rate)


@register_multitask("deep")
def _deep(
    mc: ModelConfig, backbone: Backbone, age_head: Callable[[], AgeHead], *, form: Formulation
) -> AgeHead:
    """Xing 3.3.2: race on the third-last feature level, gender on the second-last."""
    groups = _check_groups(mc)
    levels = len(backbone.feature_info)
    if levels < 3:
        raise ValueError(
            f"model.multitask=deep needs 3 feature levels; {mc.backbone} exposes {levels}"
        )
    race_index, gender_index = levels - 3, levels - 2
    return DeepMultiTask(
        age_head(),
        race_index=race_index,
        race_channels=backbone.stage_channels(race_index),
        gender_index=gender_index,
        gender_channels=backbone.stage_channels(gender_index),
        **groups,
        drop_rate=mc.drop_rate,
    )


@register_multitask("hybrid")
def _hybrid(
    mc: ModelConfig, backbone: Backbone, age_head: Callable[[], AgeHead], *, form: Formulation
) -> AgeHead:
    """Xing 3.3.3: a race-gender group classifier and one age estimator per group."""
    groups = _check_groups(mc)
    if mc.head != "linear":
        raise ValueError(
            f"model.multitask=hybrid with model.head={mc.head}: the hybrid net has one age "
            f"estimator per race-gender group ({mc.num_genders * mc.num_races} here) on GAP "
            "features (Xing 3.3.3); use model.head=linear"
        )
    pairs = hybrid_groups(mc.hybrid_groups, **groups)
    return HybridMultiTask(
        backbone.out_channels, form, groups=pairs, **groups, drop_rate=mc.drop_rate
    )
