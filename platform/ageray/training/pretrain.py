"""Identity pretraining (LAE 2.3): the backbone learns to tell people apart with AM-softmax
on images that carry identity labels; ``jobs.train`` then starts from that backbone
(``train.init_from``).

Why identities: a backbone that separates faces by person has learnt the facial detail that
age estimation needs, from labels that are cheap to collect (LAE pretrains on MS-Celeb-1M).
The identity head is thrown away; only ``backbone.safetensors`` is handed on. The stage's
plan (shards, sampler, loss step) is :func:`ageray.training.plans.plan_pretrain`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ageray.config import Config, to_dict

__all__ = ["IdentityNet"]


class IdentityNet(nn.Module):
    """backbone -> GAP -> Linear(C, d) -> BN -> AM-softmax over identities."""

    def __init__(self, cfg: Config, num_identities: int) -> None:
        super().__init__()
        from ageray.losses import AMSoftmaxHead
        from ageray.model import create_backbone

        if num_identities < 2:
            raise ValueError(
                f"identity pretraining needs at least 2 identities in the shards, found "
                f"{num_identities}: write shards from a source with identities (folders, "
                "synthetic, fgnet, mivia, morph)"
            )
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained)
        channels = self.backbone.out_channels
        self.embed = nn.Sequential(
            nn.Linear(channels, cfg.pretrain.embedding_dim, bias=False),
            nn.BatchNorm1d(cfg.pretrain.embedding_dim),
        )
        self.head = AMSoftmaxHead(
            cfg.pretrain.embedding_dim,
            num_identities,
            scale=cfg.pretrain.am_scale,
            margin=cfg.pretrain.am_margin,
        )
        self.num_identities = num_identities

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(x)
        if isinstance(fmap, list | tuple):
            fmap = fmap[-1]
        return self.embed(fmap.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embedding(x)
        return self.head(emb, labels), self.head.logits(emb)

    # checkpoint hooks used by ageray.training.checkpoint.save_checkpoint
    def save_files(self, folder: Path, meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        backbone = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
        save_file(backbone, str(folder / "backbone.safetensors"))
        info = {
            "format": "ageray-pretrain/1",
            "backbone": self.cfg.model.backbone,
            "num_identities": self.num_identities,
            "embedding_dim": self.cfg.pretrain.embedding_dim,
            "pretrain": to_dict(self.cfg.pretrain),
            "meta": meta,
        }
        (folder / "model.json").write_text(json.dumps(info, indent=2, default=float))
