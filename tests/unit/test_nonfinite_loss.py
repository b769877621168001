"""A training loss that goes non-finite stops the step with a message that names the batch's
samples (their shard ``key``) and what to check, told apart by cause: a poisoned image or
age in some samples, weights an earlier step already broke, or a learning rate too large for
finite inputs. The stage-1 step of a real (small) model, the real loss and optimiser."""

from __future__ import annotations

import pytest
import torch

from ageray.config import load_config
from ageray.training.loop import train_step
from ageray.training.optim import build_optimizer, build_scheduler
from ageray.training.plans import plan_stage1, spec_for

KEYS = [f"utk/{i:05d}" for i in range(6)]


def stage1(*overrides: str):
    cfg = load_config(
        None,
        [
            "model.backbone=resnet18",
            "model.head=linear",
            "loss.name=kl",
            "data.image_size=32",
            "train.stage1.optim.scale_lr=false",
            "train.stage1.optim.scheduler=constant",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    plan = plan_stage1(cfg, spec_for(cfg, "stage1"))
    optimizer = build_optimizer(plan.params, plan.optim, global_batch=len(KEYS))
    scheduler = build_scheduler(optimizer, plan.optim, epochs=1, steps_per_epoch=100)
    return plan, optimizer, scheduler


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(KEYS)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "age": torch.tensor([5.0, 23.0, 31.0, 47.0, 62.0, 80.0]),
        "age_std": torch.full((n,), float("nan")),  # absent in UTKFace: never a cause
        "gender": torch.zeros(n, dtype=torch.int64),
        "race": torch.zeros(n, dtype=torch.int64),
        "identity": torch.full((n,), -1, dtype=torch.int64),
        "key": list(KEYS),
    }


def step(plan, optimizer, scheduler, b: dict) -> dict:
    return train_step(
        plan.model,
        b,
        step=plan.step,
        optimizer=optimizer,
        scheduler=scheduler,
        params=plan.params,
        device=torch.device("cpu"),
        grad_clip=plan.optim.grad_clip,
        where="stage1 epoch 0 step 3",
    )


@pytest.mark.parametrize("field", ["image", "age"])
def test_a_poisoned_sample_is_named_by_its_key(field: str) -> None:
    plan, optimizer, scheduler = stage1()
    b = batch()
    b[field][2] = float("nan")
    with pytest.raises(FloatingPointError) as err:
        step(plan, optimizer, scheduler, b)
    message = str(err.value)
    assert message.startswith("stage1 epoch 0 step 3: loss is nan: ")
    assert f"non-finite image or age values in sample(s) {KEYS[2]};" in message
    assert KEYS[1] not in message and KEYS[3] not in message  # only the culprit
    assert "check those samples in the shards" in message


def test_broken_weights_point_at_the_learning_rate() -> None:
    plan, optimizer, scheduler = stage1()
    with torch.no_grad():
        plan.params[0].view(-1)[0] = float("inf")  # what a diverged step leaves behind
    with pytest.raises(FloatingPointError) as err:
        step(plan, optimizer, scheduler, batch())
    message = str(err.value)
    assert "the weights are non-finite (an earlier step diverged at lr 0.005)" in message
    assert "train.*.optim.lr" in message and "optim.grad_clip" in message


def test_a_huge_learning_rate_names_the_batch_and_what_to_check() -> None:
    """Finite inputs, lr 1e12 without clipping: within a few steps the loss is inf or NaN;
    the message names the batch's samples or the broken weights, and the learning rate."""
    plan, optimizer, scheduler = stage1(
        "train.stage1.optim.lr=1e12", "train.stage1.optim.grad_clip=null"
    )
    with pytest.raises(FloatingPointError) as err:
        for i in range(10):
            step(plan, optimizer, scheduler, batch(seed=i))
    message = str(err.value)
    assert "1e+12" in message and "train.*.optim.lr" in message
    assert (
        f"the batch holds {', '.join(KEYS)}. Check these samples' labels" in message
        or "the weights are non-finite" in message
    ), message
    assert "non-finite image or age values" not in message  # the inputs were fine
