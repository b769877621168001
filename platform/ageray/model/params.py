"""Parameter counts of GLAE models, next to the paper's figures (GLAE Table IV, V-A 2).

Run ``python -m ageray.model.params`` for the table. Models are built on the ``meta`` device
(shapes only), so the count costs no memory and no download.

At 224 px with the paper's FR (r = k = s = 16), F' is 101 x 7 x 7 = 4949 values, so the
depth-0 projection ``Linear(4949, C)`` alone costs 2.53M (ResNet-18, C = 512) or 10.14M
(ResNet-50, C = 2048), and each hidden block ``Linear(C, C) + BN`` adds 0.26M / 4.20M. The
paper's "11M" and "23M" are the trunks without their ImageNet FC (11.18M, 23.51M): they leave
FR + PA out. Table IV's +0.3M (depth 1) and +0.9M (depth 2) are far below one C-wide hidden
layer for ResNet-50 (4.2M), so the paper's hidden layers cannot be C-wide; no single width
reproduces both steps (width 512 gives +0.26M, then +0.53M), and we keep C-wide hidden blocks
as the text describes ("transform ... into a holistic feature embedding of C dimensions").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ageray.config import ModelConfig

from .counting import count_parameters, parameter_breakdown

__all__ = ["count_parameters", "glae_parameter_table", "main", "parameter_breakdown"]

#: GLAE's reported sizes: V-A 2 ("ResNet-18 (denoted by 11M) or ResNet-50 (denoted by 23M)")
#: and Table IV (ResNet-50, projection depth 0 / 1 / 2).
PAPER = {
    ("resnet18", 0): "11M",
    ("resnet50", 0): "23M",
    ("resnet50", 1): "23.3M",
    ("resnet50", 2): "23.9M",
}
TEXT_COLUMNS = ("backbone", "depth", "fmap", "fprime", "paper")
COLUMNS = (*TEXT_COLUMNS[:4], "trunk", "fr", "proj", "classifier", "total", "eval_total", "paper")


def glae_parameter_table(
    backbones: Sequence[str] = ("resnet18", "resnet50"),
    *,
    depths: Sequence[int] = (0, 1, 2),
    image_size: int = 224,
) -> list[dict[str, object]]:
    """One row per (backbone, projection depth): component counts and totals."""
    from .age_model import build_model

    rows: list[dict[str, object]] = []
    for name in backbones:
        for depth in depths:
            cfg = ModelConfig(backbone=name, head="glae", proj_depth=depth)
            with torch.device("meta"):
                model = build_model(cfg, image_size=image_size)
            parts = parameter_breakdown(model)
            head = model.heads["vanilla"]
            rows.append(
                {
                    "backbone": name,
                    "depth": depth,
                    "fmap": "x".join(map(str, model.backbone.feature_size(image_size))),
                    "fprime": "x".join(map(str, (cfg.num_classes, *head.fr.out_size))),
                    "trunk": parts["backbone"],
                    "fr": parts.get("vanilla.fr", 0),
                    "proj": parts.get("vanilla.proj", 0),
                    "classifier": parts.get("vanilla.classifier", 0),
                    "total": count_parameters(model),
                    "eval_total": count_parameters(model, include_local=False),
                    "paper": PAPER.get((name, depth), "-"),
                }
            )
    return rows


def _millions(count: object) -> str:
    return f"{int(count) / 1e6:.3f}M"  # type: ignore[call-overload]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    args = parser.parse_args(argv)
    rows = glae_parameter_table(args.backbones, image_size=args.image_size)
    cols = COLUMNS
    table = [[str(r[c]) if c in TEXT_COLUMNS else _millions(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print(f"GLAE parameter counts at {args.image_size} px (FR r=16, k=16, s=16)")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(
        "trunk = timm backbone without its ImageNet classifier; eval_total leaves out the "
        "training-only local branch (it owns no parameters: it reads F' directly).\n"
        "The paper's figures match the trunk alone (ResNet-18 11.2M -> '11M', ResNet-50 23.5M "
        "-> '23M'); see this module's docstring for Table IV."
    )


if __name__ == "__main__":
    main()
