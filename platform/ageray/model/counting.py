"""Parameter counting (``python -m ageray.model.params`` prints GLAE's table with it)."""

from __future__ import annotations

from torch import nn

__all__ = ["count_parameters", "parameter_breakdown"]


def count_parameters(model: nn.Module, *, include_local: bool = True) -> int:
    """Number of distinct parameters (tied ones counted once).

    ``include_local=False`` leaves out modules marked ``training_only = True`` (GLAE's
    local branch is removed at evaluation). In this implementation the local branch is F'
    itself -- every pixel of the FR output is a prediction (eq. 6) -- so it owns no
    parameters and both counts agree; the flag keeps the distinction explicit.
    """
    skip: set[int] = set()
    if not include_local:
        for module in model.modules():
            if getattr(module, "training_only", False):
                skip.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Counts per component: ``backbone``, then each head's direct children."""
    out: dict[str, int] = {}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        out["backbone"] = count_parameters(backbone)
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.ModuleDict):
        for name, head in heads.items():
            for child, module in head.named_children():
                n = count_parameters(module)
                if n:
                    out[f"{name}.{child}"] = n
    return out
