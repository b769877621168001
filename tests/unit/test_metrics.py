"""ageray.metrics against values worked out by hand (the arithmetic is in the comments).

Every expected number below is computed from the definitions on literal numbers, never by
calling the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ageray import metrics as M

# --------------------------------------------------------------------------------------
# MAE and input handling
# --------------------------------------------------------------------------------------


def test_mae_three_samples() -> None:
    # |10-12| + |20-18| + |30-33| = 2 + 2 + 3 = 7 -> 7/3
    assert M.mae([10, 20, 30], [12, 18, 33]) == pytest.approx(7 / 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: list(v),
        lambda v: tuple(v),
        lambda v: np.asarray(v, dtype=np.float32),
        lambda v: np.asarray(v, dtype=np.int64),
        lambda v: torch.tensor(v, dtype=torch.float32),
        lambda v: torch.tensor(v, dtype=torch.float32, requires_grad=True),
        lambda v: torch.tensor(v, dtype=torch.float32)[:, None],  # (B, 1) squeezes
        lambda v: torch.tensor(v, dtype=torch.bfloat16),
    ],
    ids=["list", "tuple", "np32", "np_int", "torch", "requires_grad", "B1", "bf16"],
)
def test_array_likes_accepted_and_plain_python_out(make) -> None:
    y, p = [10, 20, 30], [12, 18, 33]
    value = M.mae(make(y), make(p))
    assert type(value) is float  # not np.float64 / tensor
    assert value == pytest.approx(7 / 3)
    assert type(M.ccs(make(y), make(p), 2)) is int
    assert all(type(k) is int and type(v) is float for k, v in M.per_age_mae(y, p).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_accepted() -> None:
    y = torch.tensor([10.0, 20.0, 30.0], device="cuda")
    p = torch.tensor([12.0, 18.0, 33.0], device="cuda", requires_grad=True)
    assert M.mae(y, p) == pytest.approx(7 / 3)
    assert M.cmae(y, p) == pytest.approx(7 / 3)


def test_validation_messages_name_the_argument() -> None:
    with pytest.raises(ValueError, match="y_true has 3 values but y_pred has 2"):
        M.mae([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"y_pred must be 1-D.*\(2, 2\)"):
        M.mae([1, 2, 3, 4], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="y_true is empty"):
        M.cmae([], [])
    with pytest.raises(ValueError, match="y_pred has 1 non-finite"):
        M.mae([1, 2], [1, float("nan")])
    with pytest.raises(ValueError, match="y_true has 1 non-finite"):
        M.aar([1, float("inf")], [1, 2])
    with pytest.raises(ValueError, match="y_true must be a sequence of numbers"):
        M.mae("abc", [1, 2, 3])
    with pytest.raises(ValueError, match="y_pred must be a sequence of numbers"):
        M.mae([1, 2], [1, "x"])
    with pytest.raises(ValueError, match=r"y_true must be a 1-D sequence.*scalar"):
        M.mae(3.0, 3.0)
    with pytest.raises(ValueError, match="not a known grouping"):
        M.aar([1], [1], groups="decades")
    with pytest.raises(ValueError, match="lo <= hi"):
        M.group_mae([1], [1], groups=[(10, 5)])
    with pytest.raises(ValueError, match="t must be a finite, non-negative"):
        M.ccs([1], [1], -1)


# --------------------------------------------------------------------------------------
# CMAE and per-age MAE
# --------------------------------------------------------------------------------------


def test_cmae_differs_from_mae() -> None:
    y = [10, 10, 10, 50]
    p = [11, 11, 11, 54]
    # errors 1, 1, 1, 4: MAE = 7/4; per age: 10 -> 1, 50 -> 4; CMAE = (1 + 4) / 2
    assert M.mae(y, p) == pytest.approx(1.75)
    assert M.cmae(y, p) == pytest.approx(2.5)
    assert M.per_age_mae(y, p) == {10: pytest.approx(1.0), 50: pytest.approx(4.0)}


def test_cmae_bins_real_labels_round_half_up() -> None:
    y = [2.5, 3.4, 3.5]
    p = [3.5, 3.4, 5.5]
    # errors 1, 0, 2 (raw labels). floor(y + 0.5): 2.5 -> 3, 3.4 -> 3, 3.5 -> 4
    # per age {3: (1 + 0)/2, 4: 2}; CMAE = (0.5 + 2)/2 = 1.25.
    # (Banker's rounding would put 2.5 at age 2 and give (1 + 0 + 2)/3 = 1.0.)
    assert M.per_age_mae(y, p) == {3: pytest.approx(0.5), 4: pytest.approx(2.0)}
    assert M.cmae(y, p) == pytest.approx(1.25)


def test_per_age_mae_sorted_by_age() -> None:
    assert list(M.per_age_mae([40, 3, 17, 3], [41, 3, 17, 5])) == [3, 17, 40]


# --------------------------------------------------------------------------------------
# AAR
# --------------------------------------------------------------------------------------


def test_aar_two_groups_step_by_step() -> None:
    y = [5, 5, 25, 25]
    p = [6, 8, 25, 26]
    # errors 1, 3, 0, 1 -> MAE = 5/4 = 1.25
    # LAE groups with samples: 1-10 -> (1 + 3)/2 = 2.0; 21-30 -> (0 + 1)/2 = 0.5
    # (the six empty groups are left out)
    # sigma = sqrt(((2.0 - 1.25)^2 + (0.5 - 1.25)^2) / 2) = sqrt((0.5625 + 0.5625)/2) = 0.75
    # AAR = max(0, 7 - 1.25) + max(0, 3 - 0.75) = 5.75 + 2.25 = 8.0
    assert M.aar(y, p) == pytest.approx(8.0)
    d = M.aar_details(y, p)
    assert d["mae"] == pytest.approx(1.25)
    assert d["sigma"] == pytest.approx(0.75)
    assert d["groups"] == {"0-10": pytest.approx(2.0), "21-30": pytest.approx(0.5)}


def test_aar_clips_at_zero() -> None:
    # errors 10, 0: MAE 5; groups 1-10 -> 10, 21-30 -> 0; sigma = sqrt((25 + 25)/2) = 5
    # AAR = max(0, 2) + max(0, -2) = 2
    assert M.aar([5, 25], [15, 25]) == pytest.approx(2.0)


def test_aar_lae_last_group_is_71_and_above() -> None:
    # errors 1, 3; both 75 and 90 are in "71+": one group with MAE 2 = overall MAE
    # sigma = 0 -> AAR = (7 - 2) + 3 = 8. (A 71-81 group would drop 90: sigma 1, AAR 7.)
    assert M.aar([75, 90], [76, 93]) == pytest.approx(8.0)


def test_aar_lae_puts_age_zero_in_first_group() -> None:
    y = [0, 10, 40]
    p = [2, 10, 40]
    # errors 2, 0, 0 -> MAE 2/3. Group 1-10 holds ages 0 and 10 -> (2 + 0)/2 = 1;
    # group 31-40 -> 0. sigma^2 = ((1 - 2/3)^2 + (0 - 2/3)^2) / 2 = (1/9 + 4/9) / 2 = 5/18
    expected = (7 - 2 / 3) + (3 - math.sqrt(5 / 18))
    assert M.aar(y, p) == pytest.approx(expected)


def test_aar_decade_groups_differ_from_lae() -> None:
    y, p = [9, 10], [10, 13]
    # errors 1, 3: MAE 2. decade: 0-9 -> 1, 10-19 -> 3, sigma 1 -> AAR 5 + 2 = 7
    # lae: both in 1-10 -> sigma 0 -> AAR 5 + 3 = 8
    assert M.aar(y, p, groups="decade") == pytest.approx(7.0)
    assert M.aar(y, p, groups="lae") == pytest.approx(8.0)


def test_aar_group_membership_uses_round_half_up() -> None:
    y = [10.4, 10.5]
    p = [11.4, 13.5]
    # errors 1, 3. 10.4 -> age 10 (group 1-10), 10.5 -> age 11 (group 11-20): sigma 1, AAR 7
    assert M.aar(y, p) == pytest.approx(7.0)


def test_aar_explicit_groups() -> None:
    # groups 0-50 and 51+: errors 2 (age 20) and 0 (age 60): MAE 1, sigma 1 -> 6 + 2 = 8
    assert M.aar([20, 60], [22, 60], groups=[(0, 50), (51, None)]) == pytest.approx(8.0)
    assert M.aar([20, 60], [22, 60], groups=[(0, 50), (51, math.inf)]) == pytest.approx(8.0)


# --------------------------------------------------------------------------------------
# epsilon-error
# --------------------------------------------------------------------------------------


def test_epsilon_error_is_a_mean() -> None:
    y, p, s = [20, 30], [22, 30], [2, 5]
    # sample 1: 1 - exp(-(22-20)^2 / (2 * 2^2)) = 1 - exp(-0.5); sample 2: 1 - exp(0) = 0
    expected = ((1 - math.exp(-0.5)) + 0.0) / 2
    assert M.epsilon_error(y, p, s) == pytest.approx(expected)
    # a second check: error 3 with std 3 -> 1 - exp(-9/18) = 1 - exp(-0.5) as well
    assert M.epsilon_error([10], [13], [3]) == pytest.approx(1 - math.exp(-0.5))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_epsilon_error_rejects_bad_std(bad: float) -> None:
    with pytest.raises(ValueError, match=r"y_std .*not finite positive.*index \[1\]"):
        M.epsilon_error([20, 30], [22, 30], [2.0, bad])


def test_epsilon_error_std_length() -> None:
    with pytest.raises(ValueError, match="y_std has 1"):
        M.epsilon_error([20, 30], [22, 30], [2.0])


# --------------------------------------------------------------------------------------
# CCS / RCCS
# --------------------------------------------------------------------------------------


def test_ccs_counts() -> None:
    y = [10, 10, 10, 10]
    p = [10, 11, 12.5, 7]  # errors 0, 1, 2.5, 3
    assert M.ccs(y, p, 0) == 1
    assert M.ccs(y, p, 1) == 2  # <= is inclusive
    assert M.ccs(y, p, 2) == 2
    assert M.ccs(y, p, 2.5) == 3
    assert M.ccs(y, p, 3) == 4
    assert M.ccs_curve(y, p, t_max=3) == [1, 2, 2, 4]


def test_ccs_float_noise_at_the_threshold() -> None:
    # |3.0 - 2.9| is 0.10000000000000009 in binary floating point
    assert M.ccs([3.0], [2.9], 0.1) == 1


def test_rccs() -> None:
    y = [10, 10, 10, 10]
    a = [10, 11, 12.5, 7]  # errors 0, 1, 2.5, 3
    b = [12, 12, 12, 12]  # errors 2, 2, 2, 2
    assert M.rccs(y, a, b, 1) == 2 - 0
    assert M.rccs(y, a, b, 2) == 2 - 4
    assert M.rccs(y, a, b, 3) == 4 - 4
    with pytest.raises(ValueError, match="y_pred_b"):
        M.rccs(y, a, b[:3], 1)


# --------------------------------------------------------------------------------------
# Group metrics and routing usage
# --------------------------------------------------------------------------------------


def test_group_mae_table_ix() -> None:
    y = [5, 10, 30, 70]
    p = [6, 13, 30, 72]  # errors 1, 3, 0, 2
    assert M.group_mae(y, p) == {
        "0-17": pytest.approx(2.0),
        "18-65": pytest.approx(0.0),
        "66-100": pytest.approx(2.0),
    }


def test_group_mae_keeps_empty_groups_as_nan() -> None:
    out = M.group_mae([5, 30], [6, 30])
    assert list(out) == ["0-17", "18-65", "66-100"]
    assert math.isnan(out["66-100"])


def test_group_cmae_differs_from_group_mae() -> None:
    y = [5, 5, 5, 10]
    p = [6, 6, 6, 14]
    # 0-17: errors 1, 1, 1 (age 5) and 4 (age 10): MAE 7/4, CMAE (1 + 4)/2 = 2.5
    assert M.group_mae(y, p)["0-17"] == pytest.approx(1.75)
    out = M.group_cmae(y, p)
    assert out["0-17"] == pytest.approx(2.5)
    assert math.isnan(out["18-65"]) and math.isnan(out["66-100"])


def test_routing_usage() -> None:
    y = [5, 10, 30, 40, 50, 70]
    choice = [1, 1, 0, 0, 1, 1]
    out = M.routing_usage(y, choice)
    assert out["0-17"] == {"n": 2, "vanilla": 0.0, "balanced": 1.0}
    assert out["18-65"]["n"] == 3
    assert out["18-65"]["vanilla"] == pytest.approx(2 / 3)
    assert out["18-65"]["balanced"] == pytest.approx(1 / 3)
    assert out["66-100"] == {"n": 1, "vanilla": 0.0, "balanced": 1.0}
    with pytest.raises(ValueError, match="choice must hold 0"):
        M.routing_usage([5, 10], [0, 2])


# --------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------


def test_summarize_row() -> None:
    y = [5, 5, 25, 25]
    p = [6, 8, 25, 26]  # the AAR example: MAE 1.25, AAR 8.0
    row = M.summarize(y, p, y_std=[1, 1, 1, 1], ccs_max=2)
    assert row["n"] == 4
    assert row["mae"] == pytest.approx(1.25)
    # per age: 5 -> 2, 25 -> 0.5 -> CMAE 1.25 (equal counts per age: same as MAE here)
    assert row["cmae"] == pytest.approx(1.25)
    assert row["aar"] == pytest.approx(8.0)
    assert row["ccs"] == [1, 3, 3]  # errors 1, 3, 0, 1
    assert row["group_mae"]["0-17"] == pytest.approx(2.0)
    assert row["group_cmae"]["18-65"] == pytest.approx(0.5)
    # epsilon: (1-e^-0.5) + (1-e^-4.5) + 0 + (1-e^-0.5), over 4
    eps = (2 * (1 - math.exp(-0.5)) + (1 - math.exp(-4.5))) / 4
    assert row["epsilon_error"] == pytest.approx(eps)
    json.dumps(row)  # plain Python values


def test_summarize_skips_epsilon_without_a_full_std() -> None:
    assert "epsilon_error" not in M.summarize([5, 25], [6, 25])
    assert "epsilon_error" not in M.summarize([5, 25], [6, 25], y_std=[1.0, float("nan")])
