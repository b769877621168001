"""``compute_loss`` gives the values it gave before its if-chain became a registry, to the bit.

The golden file ``data/compute_loss_golden.json`` was recorded from the if-chain
``compute_loss`` (commit before "losses: registry") on fixed seeded inputs, for every loss
name x stage (1; 2 without and with ``mae_ref``) x multi-task arrangement (none, parallel,
deep, hybrid with and without the head's group table, hybrid without group logits), plus
every error the entry point raises. Values are stored as ``float.hex`` and compared with
``==``; the gradient of the loss with respect to every head output is compared as a SHA-256
of its bytes. Why exact: a refactor must not move a single training run.

Re-record (only when a loss is meant to change, and say so in the commit):
``PYTHONPATH=platform:. python -m tests.unit.test_loss_golden --record``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ageray.config import LossConfig, ModelConfig
from ageray.losses import compute_loss

GOLDEN = Path(__file__).parent / "data" / "compute_loss_golden.json"
NAMES = ("kl", "base", "sum", "ce", "ldl_ce", "mse", "mae", "ordinal_bce")
FORMULATION = {"mse": "mse", "mae": "mae", "ordinal_bce": "ordinal", "ce": "onehot"}
B, K = 6, 101


def _inputs(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One head's outputs with every key any loss reads, and a batch with some labels
    absent (-1); all drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    head = {
        "logits": torch.randn(B, K, generator=g) * 3,
        "local_logits": torch.randn(B, K, 2, 3, generator=g) * 2,
        "age": torch.rand(B, generator=g) * 90,
        "ordinal_logits": torch.randn(B, K - 1, generator=g) * 4,
        "gender_logits": torch.randn(B, 2, generator=g),
        "race_logits": torch.randn(B, 5, generator=g),
        "group_logits": torch.randn(B, 10, generator=g),
    }
    batch = {
        "age": torch.rand(B, generator=g) * 95 + 0.4,
        "age_std": torch.full((B,), float("nan")),
        "gender": torch.tensor([0, 1, -1, 1, 0, 1]),
        "race": torch.tensor([2, -1, 3, 4, 0, 1]),
    }
    return head, batch


def _morph_map() -> torch.Tensor:
    group_map = torch.full((2, 5), -1)
    group_map[1, 1], group_map[0, 1], group_map[1, 0], group_map[0, 0] = 0, 1, 2, 3
    return group_map


def _cases() -> list[tuple[str, dict[str, Any]]]:
    """(case id, arguments) for every branch of compute_loss."""
    cases = []
    arrangements = {
        "none": ({}, None),
        "parallel": ({"multitask": "parallel"}, None),
        "deep": ({"multitask": "deep"}, None),
        "hybrid": ({"multitask": "hybrid"}, None),
        "hybrid_map": ({"multitask": "hybrid", "num_genders": 2, "num_races": 5}, "morph"),
        "hybrid_nogroup": ({"multitask": "hybrid"}, "drop"),
    }
    for name in NAMES:
        model = {
            "formulation": FORMULATION.get(name, "ldl"),
            "age_min": 1 if name == "ordinal_bce" else 0,
        }
        for stage, mae_ref in ((1, None), (1, 2.5), (2, None), (2, 3.25)):
            if mae_ref is not None and stage == 2 and name in ("mse", "mae", "ordinal_bce"):
                continue  # an error case, below
            for arrangement, (extra, group) in arrangements.items():
                cases.append(
                    (
                        f"{name}-s{stage}-mae{mae_ref}-{arrangement}",
                        {
                            "loss": {
                                "name": name,
                                "sigma": 1.5,
                                "lambda_er": 0.7,
                                "alpha": 0.3,
                                "beta": 1.7,
                            },
                            "model": {**model, **extra},
                            "stage": stage,
                            "mae_ref": mae_ref,
                            "group": group,
                            "seed": len(cases),
                        },
                    )
                )
    return cases


def _run(args: dict[str, Any]) -> dict[str, Any]:
    head, batch = _inputs(args["seed"])
    if args["group"] == "morph":
        head["group_logits"] = head["group_logits"][:, :4].contiguous()
        head["group_map"] = _morph_map()
    elif args["group"] == "drop":
        del head["group_logits"]
    for v in head.values():
        if v.is_floating_point():
            v.requires_grad_(True)
    loss, parts = compute_loss(
        LossConfig(**args["loss"]),
        ModelConfig(**args["model"]),
        head,
        batch,
        mae_ref=args["mae_ref"],
        stage=args["stage"],
    )
    loss.backward()
    grads = {
        k: hashlib.sha256(v.grad.numpy().tobytes()).hexdigest()
        for k, v in sorted(head.items())
        if v.is_floating_point() and v.grad is not None
    }
    return {
        "loss": float(loss.item()).hex(),
        "parts": {k: float(v).hex() for k, v in parts.items()},
        "grads": grads,
    }


def _errors() -> dict[str, Any]:
    """Every error compute_loss raises, as (case id -> message)."""
    head, batch = _inputs(0)
    calls = {
        "stage3": lambda: compute_loss(LossConfig(), ModelConfig(), head, batch, stage=3),
        "no_tensors": lambda: compute_loss(LossConfig(), ModelConfig(), {"x": None}, batch),
        "no_age": lambda: compute_loss(
            LossConfig(), ModelConfig(), head, {"gender": batch["gender"]}
        ),
        "bad_mae": lambda: compute_loss(LossConfig(name="kl"), ModelConfig(), head, batch, -1.0, 2),
        "nan_mae": lambda: compute_loss(
            LossConfig(name="kl"), ModelConfig(), head, batch, float("nan"), 2
        ),
        "unknown": lambda: compute_loss(LossConfig(name="huber"), ModelConfig(), head, batch),  # type: ignore[arg-type]
        "unknown_s2": lambda: compute_loss(
            LossConfig(name="huber"), ModelConfig(), head, batch, 1.0, 2
        ),  # type: ignore[arg-type]
        "bad_group_shape": lambda: compute_loss(
            LossConfig(name="mae"),
            ModelConfig(multitask="hybrid"),
            {**head, "group_map": _morph_map()},
            batch,
        ),
    }
    for name in ("mse", "mae", "ordinal_bce"):
        calls[f"mae_term_{name}"] = lambda n=name: compute_loss(
            LossConfig(name=n), ModelConfig(), head, batch, 1.0, 2
        )
    for name, key in (
        ("kl", "logits"),
        ("sum", "local_logits"),
        ("ce", "logits"),
        ("mse", "age"),
        ("ordinal_bce", "ordinal_logits"),
    ):
        out = {k: v for k, v in head.items() if k != key}
        calls[f"missing_{name}"] = lambda n=name, o=out: compute_loss(
            LossConfig(name=n), ModelConfig(), o, batch
        )
    found = {}
    for case, call in calls.items():
        try:
            call()
        except ValueError as exc:
            found[case] = str(exc)
        else:
            found[case] = None
    return found


def _record() -> dict[str, Any]:
    return {"values": {case: _run(args) for case, args in _cases()}, "errors": _errors()}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def test_golden_covers_every_case(golden: dict[str, Any]) -> None:
    assert sorted(golden["values"]) == sorted(case for case, _ in _cases())
    assert len(golden["values"]) == 8 * 4 * 6 - 3 * 6


@pytest.mark.parametrize(("case", "args"), _cases(), ids=[c for c, _ in _cases()])
def test_compute_loss_is_bit_identical(
    golden: dict[str, Any], case: str, args: dict[str, Any]
) -> None:
    assert _run(args) == golden["values"][case]


def test_compute_loss_errors_unchanged(golden: dict[str, Any]) -> None:
    """Every error message as before, except an unknown loss.name: the registry now names
    the registered losses (and checks the name before the stage-2 term)."""
    found, recorded = _errors(), golden["errors"]
    assert found.keys() == recorded.keys()
    for case in found:
        if case.startswith("unknown"):
            assert "loss.name='huber' is not registered (registered: [" in found[case]
        else:
            assert found[case] == recorded[case], case


if __name__ == "__main__" and "--record" in sys.argv:
    GOLDEN.write_text(json.dumps(_record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
