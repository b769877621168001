"""The network: timm backbone, Feature Rearrangement, PA heads, the balanced head, routing,
Xing et al.'s formulations and multi-task nets, and the saved-model format.

Entry points: ``build_model(cfg)`` -> ``AgeModel`` (``forward``, stage 2; its answers go
through ``ageray.inference``), heads by name (``head_registry``: ``@register_head``),
``save_model`` / ``load_model``, and two names other code relies on (their shapes are in
docs/design.md)::

    FeatureRearrangement(in_channels, r, kernel_size, stride, num_classes=101)
    adaptive_route(p_van, p_van_flip, p_bal, p_bal_flip, rule="smaller")
        -> (probs, choice, kl_van, kl_bal)

Routing rules by name (``smaller``, ``bigger``, ``threshold``, ``learned``, ``oracle``):
``make_rule(name, **settings)``, ``ROUTING_RULES``; ``model.routing_module(name)``.
"""

from .age_model import AgeModel, Prediction, build_model
from .backbone import Backbone, LoadReport, create_backbone, find_weights_file, read_state_dict
from .counting import count_parameters, parameter_breakdown
from .formulation import FORMULATIONS, Formulation, age_from_probs
from .fr import FeatureRearrangement, fr_output_size, fr_padding, table_iii_pairs
from .heads import AgeHead, GLAEHead, LinearHead, Projection
from .io import load_model, read_model_info, save_model
from .multitask import DeepMultiTask, HybridMultiTask, ParallelMultiTask
from .routing import (
    FEATURES,
    ROUTING_RULES,
    LearnedRouter,
    RoutingRule,
    adaptive_route,
    check_servable,
    kl_rows,
    make_rule,
    servable_rules,
)

__all__ = [
    "FEATURES",
    "FORMULATIONS",
    "ROUTING_RULES",
    "AgeHead",
    "AgeModel",
    "Backbone",
    "DeepMultiTask",
    "FeatureRearrangement",
    "Formulation",
    "GLAEHead",
    "HybridMultiTask",
    "LearnedRouter",
    "LinearHead",
    "LoadReport",
    "ParallelMultiTask",
    "Prediction",
    "Projection",
    "RoutingRule",
    "adaptive_route",
    "age_from_probs",
    "build_model",
    "check_servable",
    "count_parameters",
    "create_backbone",
    "find_weights_file",
    "fr_output_size",
    "fr_padding",
    "kl_rows",
    "load_model",
    "make_rule",
    "parameter_breakdown",
    "read_model_info",
    "read_state_dict",
    "save_model",
    "servable_rules",
    "table_iii_pairs",
]
