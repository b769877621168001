"""Adaptive Routing (GLAE eq. 11): KL direction, the choice rule, ties, flip averaging,
numerical safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ageray.model import adaptive_route, kl_rows


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# Two samples, three classes. Sample 0: the vanilla head is the stable one; sample 1: the
# balanced head is.
P_VAN = [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]
P_VAN_F = [[0.6, 0.3, 0.1], [0.6, 0.2, 0.2]]
P_BAL = [[0.5, 0.3, 0.2], [0.3, 0.4, 0.3]]
P_BAL_F = [[0.1, 0.3, 0.6], [0.3, 0.5, 0.2]]


def test_hand_worked_example() -> None:
    f64 = torch.float64  # exact inputs, so the hand values match to 1e-12
    probs, choice, kl_van, kl_bal = adaptive_route(
        *(torch.tensor(a, dtype=f64) for a in (P_VAN, P_VAN_F, P_BAL, P_BAL_F))
    )
    # KL(p || p_flip) by hand, e.g. sample 0 vanilla:
    # 0.7 ln(0.7/0.6) + 0.2 ln(0.2/0.3) + 0.1 ln(0.1/0.1) = 0.02681...
    expected_van = [kl(P_VAN[i], P_VAN_F[i]) for i in range(2)]
    expected_bal = [kl(P_BAL[i], P_BAL_F[i]) for i in range(2)]
    assert expected_van[0] == pytest.approx(0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(2 / 3))
    assert kl_van.tolist() == pytest.approx(expected_van, rel=1e-12)
    assert kl_bal.tolist() == pytest.approx(expected_bal, rel=1e-12)
    assert expected_van[0] < expected_bal[0] and expected_van[1] > expected_bal[1]
    assert choice.tolist() == [0, 1]
    # The chosen head's image+flip average (GLAE test protocol).
    assert probs[0].tolist() == pytest.approx([0.65, 0.25, 0.1])
    assert probs[1].tolist() == pytest.approx([0.3, 0.45, 0.25])
    assert choice.dtype == torch.long and probs.dtype == f64


def test_no_flip_average_and_bigger_rule() -> None:
    args = [torch.tensor(a) for a in (P_VAN, P_VAN_F, P_BAL, P_BAL_F)]
    probs, choice, _, _ = adaptive_route(*args, flip_average=False)
    assert choice.tolist() == [0, 1]
    assert probs.flatten().tolist() == pytest.approx(P_VAN[0] + P_BAL[1])
    assert probs.dtype == torch.float32 and kl_rows(args[0], args[1]).dtype == torch.float64
    probs, choice, _, _ = adaptive_route(*args, rule="bigger")
    assert choice.tolist() == [1, 0]  # Table IX's "Bigger Upsilon" row: the opposite head
    assert probs[0].tolist() == pytest.approx([0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="rule='largest'"):
        adaptive_route(*args, rule="largest")  # type: ignore[arg-type]


def test_ties_go_to_balanced() -> None:
    """Paper: 'the vanilla classifier is chosen if Y1 < Y2; otherwise, the balanced'."""
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    pf = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    _, choice, kl_van, kl_bal = adaptive_route(p, pf, p.clone(), pf.clone())
    assert torch.equal(kl_van, kl_bal)
    assert choice.tolist() == [1, 1]
    _, choice, _, _ = adaptive_route(p, pf, p.clone(), pf.clone(), rule="bigger")
    assert choice.tolist() == [1, 1]


def test_underflow_zeros_are_safe() -> None:
    # float32 softmax outputs that underflowed to exact zeros, on either side.
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    values = kl_rows(p, q)
    assert torch.isfinite(values).all()
    assert values[0] == 0 and values[2] == 0  # 0 * log(0 / q) = 0 and identical rows
    assert values[1] > 100  # p > 0 where q = 0: large but finite
    probs, choice, kl_van, kl_bal = adaptive_route(p, q, q, p)
    assert torch.isfinite(kl_van).all() and torch.isfinite(kl_bal).all()
    assert torch.isfinite(probs).all()
    assert choice.tolist() == [1, 1, 1]  # rows 0, 2 tie (0 == 0); row 1 inf-free comparison
    # Extremely peaked float32 softmax, both heads.
    logits = torch.tensor([[200.0, 0.0, -200.0]])
    pv = torch.softmax(logits, -1)
    assert (pv == 0).any()
    _, _, kv, _ = adaptive_route(pv, pv.flip(-1), pv, pv)
    assert torch.isfinite(kv).all()


def test_numpy_and_single_row_inputs() -> None:
    probs, choice, kl_van, kl_bal = adaptive_route(
        np.array(P_VAN[0]), np.array(P_VAN_F[0]), np.array(P_BAL[0]), np.array(P_BAL_F[0])
    )
    assert isinstance(probs, torch.Tensor) and probs.shape == (1, 3)
    assert choice.tolist() == [0]
    assert kl_van.shape == kl_bal.shape == (1,)


def test_kl_matches_torch_for_positive_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 101, generator=g), -1)
    q = torch.softmax(torch.randn(4, 101, generator=g), -1)
    ref = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)
    assert torch.allclose(kl_rows(p, q).float(), ref, atol=1e-5)


def test_shape_mismatch() -> None:
    a = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="share one"):
        adaptive_route(a, a, a, torch.full((2, 4), 0.25))
