"""AM-softmax (Wang et al. 2018): the identity-pretraining loss of LAE 2.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AMSoftmaxHead", "am_softmax_logits", "am_softmax_loss"]


def am_softmax_logits(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    scale: float = 30.0,
    margin: float = 0.35,
) -> Tensor:
    """``s * (cos(theta_j) - m * [j == label])`` (Wang et al. 2018), (B, C).

    ``cos(theta_j)`` is the cosine between the L2-normalised embedding (B, D) and the
    L2-normalised class weight ``weight[j]`` (``weight`` is (C, D), as in ``nn.Linear``).
    Without ``labels`` no margin is subtracted (plain scaled cosines, for accuracy).
    """
    if embeddings.ndim != 2 or weight.ndim != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be (B, D) and weight (C, D) with the same D; got "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()
    if labels is not None:
        labels = labels.to(cos.device).long()
        if labels.shape != (cos.shape[0],):
            raise ValueError(
                f"labels must have shape (B,)=({cos.shape[0]},), got {tuple(labels.shape)}"
            )
        cos = cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return scale * cos


def am_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    scale: float = 30.0,
    margin: float = 0.35,
) -> Tensor:
    """Additive-margin softmax (Wang et al. 2018; LAE 2.3 identity pretraining):
    ``CE(s * (cos(theta) - m * onehot), label)``, mean over the batch.

    Features and class weights are normalised, so the loss separates identities by angle
    only, with a margin m between classes; s = 30, m = 0.35 are the AM-softmax paper's
    values.
    """
    logits = am_softmax_logits(embeddings, weight, labels, scale, margin)
    return F.cross_entropy(logits, labels.to(logits.device).long())


class AMSoftmaxHead(nn.Module):
    """The identity classifier of AM-softmax pretraining: holds the (C, D) class weights.

    ``forward(emb, labels)`` returns the AM-softmax loss; ``logits(emb)`` the scaled cosines
    without margin (argmax = predicted identity, for accuracy). The head is dropped after
    pretraining; only the backbone is kept.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 2:
            raise ValueError(
                f"AMSoftmaxHead needs embedding_dim >= 1 and num_classes >= 2 identities, got "
                f"{embedding_dim} and {num_classes}"
            )
        if scale <= 0 or margin < 0:
            raise ValueError(f"scale must be > 0 and margin >= 0, got {scale} and {margin}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        return am_softmax_loss(emb, self.weight, labels, self.scale, self.margin)

    def logits(self, emb: Tensor) -> Tensor:
        return am_softmax_logits(emb, self.weight, None, self.scale, self.margin)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale}, margin={self.margin}"
        )
