"""Routing between the two heads (GLAE III-D): which head answers each image, by named rule.

Every rule maps one row of per-image routing features (:mod:`.features`: each head's answer,
spread, entropy and flip KL, and the gap between the answers) to the balanced head's weight
``w`` in [0, 1]; the routed distribution is ``(1 - w) * p_van + w * p_bal`` (both
flip-averaged), so a hard rule (``w`` in {0, 1}) picks a head and a soft rule mixes them.

==========  =================================================================  ==========
rule        balanced weight                                                    fitted
==========  =================================================================  ==========
smaller     0 iff KL_van < KL_bal, else 1 (GLAE eq. 11, AR; the default)       --
bigger      0 iff KL_van > KL_bal, else 1 (Table IX's "Bigger Upsilon" row)    --
threshold   0 iff KL_van < tau * KL_bal, else 1                                tau
learned     a small network on the features (:mod:`.learned`)                  weights
oracle      0 iff the vanilla answer is closer to the true age                 -- (a bound)
==========  =================================================================  ==========

``oracle`` is the upper bound of evaluation tables; it reads the true age, so it never answers
a request: :func:`check_servable` is what serving paths call before accepting a rule.
Fitted rules are fitted on a held-out split (validation), never on the test split.

Modules: ``functional`` (``adaptive_route`` / ``kl_rows``, eq. 11 on probabilities, the
stable public form), ``features``, ``registry`` (base class, lookup, objective), ``rules``
(the four simple rules), ``learned`` (the learned router), ``fitting`` (fit a model's rules
on a held-out split). Importing this package registers every built-in rule.
"""

from . import learned, rules  # noqa: F401  (register the built-in rules)
from .features import (
    AGE_BAL,
    AGE_VAN,
    ENT_BAL,
    ENT_VAN,
    FEATURES,
    GAP,
    KL_BAL,
    KL_VAN,
    STD_BAL,
    STD_VAN,
    head_stats,
    mix_ages,
    mix_heads,
    route_features,
)
from .fitting import fit_rules, routing_fit_metrics
from .functional import adaptive_route, kl_rows
from .learned import LearnedRouter
from .registry import (
    ROUTING_RULES,
    RoutingRule,
    Weighting,
    check_servable,
    make_rule,
    register_rule,
    routed_error,
    rules_to_fit,
    sample_weights,
    servable_rules,
)
from .rules import BiggerRule, OracleRule, SmallerRule, ThresholdRule

__all__ = [
    "AGE_BAL",
    "AGE_VAN",
    "ENT_BAL",
    "ENT_VAN",
    "FEATURES",
    "GAP",
    "KL_BAL",
    "KL_VAN",
    "ROUTING_RULES",
    "STD_BAL",
    "STD_VAN",
    "BiggerRule",
    "LearnedRouter",
    "OracleRule",
    "RoutingRule",
    "SmallerRule",
    "ThresholdRule",
    "Weighting",
    "adaptive_route",
    "check_servable",
    "fit_rules",
    "head_stats",
    "kl_rows",
    "make_rule",
    "mix_ages",
    "mix_heads",
    "register_rule",
    "route_features",
    "routed_error",
    "routing_fit_metrics",
    "rules_to_fit",
    "sample_weights",
    "servable_rules",
]
