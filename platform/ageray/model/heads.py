"""Age heads on the backbone feature map: ``linear`` (GAP + FC) and ``glae`` (FR + PA).

Every head takes the feature map F (and, for multi-task heads, a dict of stage maps) and
returns the head dict of docs/design.md: ``logits`` / ``ordinal_logits`` and ``age`` per the
formulation, plus ``local_logits`` for the GLAE head when asked (training). Every head also
names its final classifier layer(s) (``classifier_layers``), which is what LAE's stage 2
retrains when ``trainable="classifier"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .formulation import Formulation
from .fr import FeatureRearrangement

__all__ = ["AgeHead", "GLAEHead", "LinearHead", "Projection"]


class AgeHead(nn.Module):
    """Base class: ``forward(features, stages=None, return_local=False) -> dict``."""

    #: indices into ``Backbone.feature_info`` of the stage maps this head reads (deep MTL).
    stage_indices: tuple[int, ...] = ()
    formulation: Formulation

    def classifier_layers(self) -> list[nn.Module]:
        """The final layer(s) that produce the age outputs (LAE's "FC")."""
        raise NotImplementedError

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LinearHead(AgeHead):
    """GAP + dropout + Linear(C, out_dim): LAE's standard baseline, GLAE's l_kl / l_base rows,
    and Xing's single-task networks for every formulation."""

    def __init__(
        self, in_channels: int, formulation: Formulation, *, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.formulation = formulation
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(in_channels, formulation.out_dim)
        formulation.init_layer(self.classifier)

    def classifier_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        return self.formulation.outputs(self.classifier(self.drop(self.pool(features))))


class Projection(nn.Sequential):
    """GLAE's MLP projection (eq. 8): flattened F' (in_features) -> C-dim embedding.

    ``depth=0``: a single ``Linear(in_features, C)`` with no activation or normalisation
    (Table IV, depth 0). ``depth=d``: ``d`` hidden blocks ``Linear + BatchNorm1d + ReLU`` of
    width C (the first one does the reduction ``in_features -> C``, the others ``C -> C``),
    followed by the same final ``Linear(C, C)``; i.e. an MLP with d hidden layers of width C.
    """

    def __init__(self, in_features: int, out_features: int, *, depth: int = 0) -> None:
        if depth < 0:
            raise ValueError(f"model.proj_depth={depth} must be >= 0")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, out_features), nn.BatchNorm1d(out_features), nn.ReLU()]
            width = out_features
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
        self.depth = depth


class GLAEHead(AgeHead):
    """FR + PA (GLAE III-B, III-C): the GLAE vanilla head.

    F -> FR -> F' (B, K, H', W'). Local branch: every pixel of F' is a K-way prediction
    (eq. 6), returned as ``local_logits`` only when ``return_local`` (training; eq. 7 averages
    the per-pixel losses). Holistic branch: ``Projection`` of flattened F' to a C-dim
    embedding (eq. 8), dropout, then the classifier ``Linear(C, K)`` whose softmax is p^hol
    (eq. 9). The projection's input size K * H' * W' is fixed at construction, so the head is
    built for one backbone map size ``in_size`` (from the input image size).

    ``r``, ``kernel_size`` and ``stride`` are FR's (``FeatureRearrangement``) and keyword-only:
    three ints in a row are too easy to swap, and a swapped kernel/stride still builds.
    """

    def __init__(
        self,
        in_channels: int,
        in_size: Sequence[int],
        formulation: Formulation,
        *,
        r: int = 16,
        kernel_size: int = 16,
        stride: int = 16,
        proj_depth: int = 0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not formulation.is_distribution:
            raise ValueError(
                f"head=glae with formulation={formulation.name}: FR outputs one channel per age "
                "and PA's branches are softmax distributions; use formulation=ldl or onehot, or "
                "head=linear for mse/mae/ordinal"
            )
        self.formulation = formulation
        num_classes = formulation.num_classes
        self.fr = FeatureRearrangement(
            in_channels,
            r=r,
            kernel_size=kernel_size,
            stride=stride,
            num_classes=num_classes,
            in_size=in_size,
        )
        height, width = self.fr.output_size(*self.fr.in_size)  # type: ignore[misc]
        self.proj = Projection(num_classes * height * width, in_channels, depth=proj_depth)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(in_channels, num_classes)

    def classifier_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def forward(
        self,
        features: torch.Tensor,
        stages: Mapping[int, torch.Tensor] | None = None,
        return_local: bool = False,
    ) -> dict[str, torch.Tensor]:
        expected = self.fr.in_size
        if expected is not None and tuple(features.shape[-2:]) != expected:
            raise ValueError(
                f"GLAE head was built for a {expected[0]}x{expected[1]} feature map (its "
                f"projection takes {self.proj[0].in_features} inputs) but got "
                f"{features.shape[-2]}x{features.shape[-1]}; feed images of the size given to "
                "build_model(..., image_size=...)"
            )
        fmap = self.fr(features)
        out = self.formulation.outputs(self.classifier(self.drop(self.proj(fmap.flatten(1)))))
        if return_local:
            out["local_logits"] = fmap
        return out
