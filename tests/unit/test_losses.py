"""ageray.losses against values worked out by hand on tiny examples.

Most examples use K = 2 ages (0 and 1) and sigma = 1, where everything can be written out:
the Gaussian label distribution for y = 0 is proportional to (exp(0), exp(-1/2)), so
z = (1, e) / (1 + e) with e = exp(-0.5). Expected values are computed from those literals
with ``math``, never by calling the code under test.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ageray import losses as L
from ageray.config import LossConfig, ModelConfig

E = math.exp(-0.5)
Z0 = (1 / (1 + E), E / (1 + E))  # label distribution of y = 0 over ages (0, 1), sigma 1


def kl_by_hand(z: tuple[float, ...], p: tuple[float, ...]) -> float:
    return sum(zk * math.log(zk / pk) for zk, pk in zip(z, p) if zk > 0)


# Uniform prediction p = (1/2, 1/2): logits (0, 0); expected age 0.5
KL_A = kl_by_hand(Z0, (0.5, 0.5))
# p = (3/4, 1/4): logits (log 3, 0); expected age 0 * 0.75 + 1 * 0.25 = 0.25
KL_B = kl_by_hand(Z0, (0.75, 0.25))
LOG3 = math.log(3.0)


# --------------------------------------------------------------------------------------
# Gaussian label distribution
# --------------------------------------------------------------------------------------


def test_gaussian_middle_matches_the_density() -> None:
    z = L.gaussian_label_distribution(torch.tensor([50.0]), 101, 1.0)
    assert z.shape == (1, 101)
    # In the interior the renormalisation changes nothing: z_50 = 1/sqrt(2 pi)
    assert z[0, 50].item() == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-6)
    assert z[0, 49].item() == pytest.approx(math.exp(-0.5) / math.sqrt(2 * math.pi), abs=1e-6)
    assert z[0, 51].item() == pytest.approx(z[0, 49].item())
    assert z.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_gaussian_border_is_renormalised() -> None:
    z = L.gaussian_label_distribution([0.0], 101, 1.0)
    # Unnormalised weights exp(-k^2/2) for k = 0, 1, 2, ...; the rest is below 1e-20
    s = sum(math.exp(-(k**2) / 2) for k in range(12))
    # Paper's density sums to s / sqrt(2 pi) ~ 0.70 here; ours to 1
    assert s / math.sqrt(2 * math.pi) == pytest.approx(0.6995, abs=1e-3)
    assert z[0, 0].item() == pytest.approx(1 / s, rel=1e-5)
    assert z[0, 1].item() == pytest.approx(math.exp(-0.5) / s, rel=1e-5)
    assert z.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the top border likewise
    z100 = L.gaussian_label_distribution([100.0], 101, 1.0)
    assert z100[0, 100].item() == pytest.approx(1 / s, rel=1e-5)


def test_gaussian_real_valued_and_per_sample_sigma() -> None:
    z = L.gaussian_label_distribution(torch.tensor([2.5, 50.0]), 101, torch.tensor([1.0, 2.0]))
    # 2.5 is halfway between ages 2 and 3
    assert z[0, 2].item() == pytest.approx(z[0, 3].item())
    # sigma 2 in the interior: 1 / (2 sqrt(2 pi))
    assert z[1, 50].item() == pytest.approx(1 / (2 * math.sqrt(2 * math.pi)), abs=1e-6)
    # K = 2, y = 0: (1, e) / (1 + e)
    z2 = L.gaussian_label_distribution([0], 2, 1.0)
    assert z2[0].tolist() == pytest.approx(list(Z0))


@pytest.mark.parametrize(
    "sigma", [0.0, -1.0, torch.tensor([1.0, 0.0]), torch.tensor([1.0, math.nan])]
)
def test_gaussian_rejects_bad_sigma(sigma) -> None:
    with pytest.raises(ValueError, match="sigma must be"):
        L.gaussian_label_distribution([1.0, 2.0], 101, sigma)


# --------------------------------------------------------------------------------------
# KL, expectation, er, base
# --------------------------------------------------------------------------------------


def test_kl_tiny_distribution_and_gradient_with_zeros() -> None:
    z = torch.tensor([[0.5, 0.5, 0.0]])  # an exact zero: 0 log 0 = 0
    logits = torch.log(torch.tensor([[0.25, 0.25, 0.5]])).requires_grad_()
    loss = L.kl_loss(z, logits)
    # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.25) + 0 = log 2
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    # d KL / d logits = p - z (z sums to 1) = (0.25 - 0.5, 0.25 - 0.5, 0.5 - 0)
    assert logits.grad is not None
    assert logits.grad[0].tolist() == pytest.approx([-0.25, -0.25, 0.5])


def test_kl_finite_when_target_requires_grad_and_has_zeros() -> None:
    z = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    logits = torch.zeros(1, 3, requires_grad=True)
    loss = L.kl_loss(z, logits)
    assert loss.item() == pytest.approx(math.log(3))  # 1 * log(1 / (1/3))
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(logits.grad).all()


def test_kl_batch_mean() -> None:
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    logits = torch.zeros(2, 2)
    # sample 1: log 2, sample 2: 0 -> mean log(2)/2
    assert L.kl_loss(z, logits).item() == pytest.approx(math.log(2) / 2)
    assert L.kl_loss(z, logits, reduction="none").tolist() == pytest.approx([math.log(2), 0.0])


def test_expected_age() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.5]])
    # 0 * 0.25 + 1 * 0.25 + 2 * 0.5 = 1.25
    assert L.expected_age(probs).item() == pytest.approx(1.25)
    assert L.expected_age(logits=torch.log(probs)).item() == pytest.approx(1.25)
    assert L.expected_age(probs, age_min=1).item() == pytest.approx(2.25)
    per_pixel = probs[:, :, None, None].expand(1, 3, 2, 2)
    assert L.expected_age(per_pixel).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        L.expected_age(probs, logits=probs)


def test_er_loss() -> None:
    # (|1 - 1.5| + |2 - 4|) / 2 = 1.25
    assert L.er_loss([1.0, 2.0], torch.tensor([1.5, 4.0])).item() == pytest.approx(1.25)


def test_base_loss_by_hand() -> None:
    logits = torch.zeros(1, 2)  # p = (1/2, 1/2), y_hat = 0.5, |0 - 0.5| = 0.5
    assert L.base_loss(logits, [0.0]).item() == pytest.approx(KL_A + 0.5, rel=1e-5)
    assert L.base_loss(logits, [0.0], lambda_er=2.0).item() == pytest.approx(KL_A + 1.0, rel=1e-5)
    assert L.holistic_loss(logits, [0.0]).item() == pytest.approx(KL_A + 0.5, rel=1e-5)


def test_base_loss_shape_errors() -> None:
    with pytest.raises(ValueError, match="batch size 2 but the labels y have 3"):
        L.base_loss(torch.zeros(2, 5), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        L.base_loss(torch.zeros(2), [1.0, 2.0])


# --------------------------------------------------------------------------------------
# GLAE local / sum, LAE stage 2
# --------------------------------------------------------------------------------------


def _local_logits() -> torch.Tensor:
    """(1, 2, 2, 2): top row pixels predict (1/2, 1/2), bottom row (3/4, 1/4)."""
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0, 1, :] = LOG3
    return x


def test_local_loss_per_pixel_softmax() -> None:
    # pixels: two with KL_A and er 0.5, two with KL_B and er 0.25; mean over the 4 pixels
    expected = (2 * (KL_A + 0.5) + 2 * (KL_B + 0.25)) / 4
    assert L.local_loss(_local_logits(), [0.0]).item() == pytest.approx(expected, rel=1e-5)


def test_sum_loss() -> None:
    local = (2 * (KL_A + 0.5) + 2 * (KL_B + 0.25)) / 4
    hol = KL_B + 0.25  # holistic logits (log 3, 0)
    logits = torch.tensor([[LOG3, 0.0]])
    out = L.sum_loss(_local_logits(), logits, [0.0])
    assert out.item() == pytest.approx(local + hol, rel=1e-5)


def test_lae_stage2_per_sample_term() -> None:
    logits = torch.tensor([[0.0, 0.0], [LOG3, 0.0]], requires_grad=True)
    y = [0.0, 0.0]
    # errors 0.5 and 0.25; with mae = 0.5 the per-sample term is ((0)^2 + (-0.25)^2)/2
    # = 0.03125 (the batch-mean version would be (0.375 - 0.5)^2 = 0.015625)
    expected = (KL_A + KL_B) / 2 + 0.03125
    loss = L.lae_stage2_loss(logits, y, mae_ref=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_lae_stage2_mae_ref_is_required_and_validated() -> None:
    param = inspect.signature(L.lae_stage2_loss).parameters["mae_ref"]
    assert param.default is inspect.Parameter.empty
    logits = torch.zeros(1, 2)
    with pytest.raises(TypeError):
        L.lae_stage2_loss(logits, [0.0])  # type: ignore[call-arg]
    for bad in (None, -1.0, math.nan, math.inf, "1.5"):
        with pytest.raises(ValueError, match=r"stage 1.*validation"):
            L.lae_stage2_loss(logits, [0.0], bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# AM-softmax
# --------------------------------------------------------------------------------------


def test_am_softmax_known_angles() -> None:
    a = math.radians(30)
    emb = torch.tensor([[5 * math.cos(a), 5 * math.sin(a)]])  # norm 5: irrelevant
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # directions 0 and 90 degrees
    labels = torch.tensor([0])
    s, m = 30.0, 0.35
    # cos(theta_0) = cos 30 = sqrt(3)/2, cos(theta_1) = cos 60 = 1/2
    l0, l1 = s * (math.sqrt(3) / 2 - m), s * 0.5
    expected = -math.log(math.exp(l0) / (math.exp(l0) + math.exp(l1)))
    assert L.am_softmax_loss(emb, weight, labels, s, m).item() == pytest.approx(expected, rel=1e-5)

    head = L.AMSoftmaxHead(2, 2, scale=s, margin=m)
    with torch.no_grad():
        head.weight.copy_(weight)
    loss = head(emb, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert head.logits(emb)[0].tolist() == pytest.approx([s * math.sqrt(3) / 2, s * 0.5])
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_am_softmax_shape_errors() -> None:
    with pytest.raises(ValueError, match="same D"):
        L.am_softmax_loss(torch.zeros(2, 3), torch.zeros(4, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        L.AMSoftmaxHead(8, 1)


# --------------------------------------------------------------------------------------
# Xing et al.
# --------------------------------------------------------------------------------------


def test_softmax_ce_rounds_half_up() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    assert L.softmax_ce(logits, [1.5]).item() == pytest.approx(-math.log(0.5))  # class 2
    assert L.softmax_ce(logits, [1.4]).item() == pytest.approx(-math.log(0.3))  # class 1
    # above the last class: the last class (classes clip above, as ldl and ordinal do)
    assert L.softmax_ce(logits, [7.0]).item() == pytest.approx(-math.log(0.5))  # class 2
    with pytest.raises(ValueError, match=r"ages -2\.\.-2 but the classifier covers 0\.\.2"):
        L.softmax_ce(logits, [-2.0])


def test_ldl_ce() -> None:
    logits = torch.tensor([[LOG3, 0.0]])  # p = (3/4, 1/4)
    expected = -(Z0[0] * math.log(0.75) + Z0[1] * math.log(0.25))
    assert L.ldl_ce(logits, [0.0]).item() == pytest.approx(expected, rel=1e-5)


def test_regression_losses() -> None:
    pred = torch.tensor([1.0, 4.0])
    # errors -1, 2: MSE (1 + 4)/2 = 2.5, MAE (1 + 2)/2 = 1.5
    assert L.mse_loss(pred, [2.0, 2.0]).item() == pytest.approx(2.5)
    assert L.mae_loss(pred, [2.0, 2.0]).item() == pytest.approx(1.5)
    assert L.mae_loss(pred[:, None], [2.0, 2.0]).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="one age per sample"):
        L.mse_loss(torch.zeros(2, 3), [2.0, 2.0])


def test_ordinal_targets() -> None:
    # y = 3, K = 6, thresholds age_min + k for k = 0..4: is 3 > 0, 1, 2, 3, 4?
    assert L.ordinal_targets([3], 6, age_min=0)[0].tolist() == [1, 1, 1, 0, 0]
    # Xing's thresholds 1..5
    assert L.ordinal_targets([3], 6, age_min=1)[0].tolist() == [1, 1, 0, 0, 0]
    # real labels are rounded half up first: 3.4 -> 3, 3.5 -> 4
    assert L.ordinal_targets([3.4, 3.5], 6)[:, 3].tolist() == [0, 1]


def test_ordinal_bce_and_age() -> None:
    zeros = torch.zeros(1, 5)
    # every output sigmoid(0) = 1/2: BCE = log 2 whatever the target
    assert L.ordinal_bce(zeros, [3]).item() == pytest.approx(math.log(2))
    # soft: 0 + 5 * 0.5; hard: sigmoid(0) = 0.5 is not > 0.5 -> 0
    assert L.ordinal_age(zeros).item() == pytest.approx(2.5)
    assert L.ordinal_age(zeros, hard=True).item() == 0
    sure = torch.tensor([[20.0, 20.0, -20.0, -20.0, -20.0]])
    # Xing eq. 11 with age_min = 1: 1 + 2 = 3
    assert L.ordinal_age(sure, age_min=1, hard=True).item() == 3
    assert L.ordinal_age(sure, age_min=1).item() == pytest.approx(3.0, abs=1e-6)
    assert L.ordinal_bce(sure, [3], age_min=1).item() < 1e-6


def test_multitask_ignores_absent_labels() -> None:
    age_loss = torch.tensor(1.0)
    gender_logits = torch.tensor([[0.0, 0.0], [LOG3, 0.0]], requires_grad=True)
    race_logits = torch.zeros(2, 5, requires_grad=True)
    gender = torch.tensor([-1, 0])  # only the second sample: p(0) = 3/4
    race = torch.tensor([-1, -1])  # nobody: the race term is 0, not NaN
    loss = L.multitask_loss(age_loss, gender_logits, gender, race_logits, race, 2.0, 3.0)
    assert loss.item() == pytest.approx(1.0 + 2.0 * -math.log(0.75), rel=1e-6)
    loss.backward()
    assert torch.isfinite(gender_logits.grad).all() and torch.isfinite(race_logits.grad).all()
    assert race_logits.grad.abs().sum().item() == 0.0
    # with race: (log 5 + log 5)/2 = log 5, weighted by 3
    both = L.multitask_loss(age_loss, None, None, race_logits, torch.tensor([0, 4]), 2.0, 3.0)
    assert both.item() == pytest.approx(1.0 + 3.0 * math.log(5), rel=1e-6)


# --------------------------------------------------------------------------------------
# compute_loss
# --------------------------------------------------------------------------------------


def test_compute_loss_base_parts() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    loss, parts = L.compute_loss(
        LossConfig(name="base", lambda_er=2.0),
        ModelConfig(head="linear"),
        {"logits": logits},
        {"age": torch.tensor([0.0]), "age_std": torch.tensor([math.nan])},
    )
    assert loss.item() == pytest.approx(KL_A + 2 * 0.5, rel=1e-5)
    assert parts["kl"] == pytest.approx(KL_A, rel=1e-5)
    assert parts["er"] == pytest.approx(0.5)
    assert parts["loss"] == pytest.approx(loss.item())
    assert all(type(v) is float for v in parts.values())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_compute_loss_kl_and_sum() -> None:
    batch = {"age": torch.tensor([0.0])}
    hol = torch.tensor([[LOG3, 0.0]])
    loss, _ = L.compute_loss(LossConfig(name="kl"), ModelConfig(), {"logits": hol}, batch)
    assert loss.item() == pytest.approx(KL_B, rel=1e-5)
    out = {"logits": hol, "local_logits": _local_logits()}
    loss, parts = L.compute_loss(LossConfig(name="sum"), ModelConfig(), out, batch)
    local = (2 * (KL_A + 0.5) + 2 * (KL_B + 0.25)) / 4
    assert loss.item() == pytest.approx(local + KL_B + 0.25, rel=1e-5)
    assert parts["loc"] == pytest.approx(local, rel=1e-5)
    assert parts["hol"] == pytest.approx(KL_B + 0.25, rel=1e-5)
    with pytest.raises(ValueError, match="needs head output 'local_logits'"):
        L.compute_loss(LossConfig(name="sum"), ModelConfig(), {"logits": hol}, batch)


def test_compute_loss_stage2_mae_term() -> None:
    logits = torch.tensor([[0.0, 0.0], [LOG3, 0.0]])
    batch = {"age": torch.tensor([0.0, 0.0])}
    expected = (KL_A + KL_B) / 2 + 0.03125  # as in test_lae_stage2_per_sample_term
    for name in ("kl", "base"):
        loss, parts = L.compute_loss(
            LossConfig(name=name),
            ModelConfig(head="linear"),
            {"logits": logits},
            batch,
            mae_ref=0.5,
            stage=2,
        )
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert parts["er_mae"] == pytest.approx(0.03125, rel=1e-5)
    # stage 1 ignores mae_ref
    loss, _ = L.compute_loss(
        LossConfig(name="base"), ModelConfig(), {"logits": logits}, batch, mae_ref=0.5, stage=1
    )
    assert loss.item() == pytest.approx((KL_A + 0.5 + KL_B + 0.25) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="stage 1"):
        L.compute_loss(
            LossConfig(name="base"), ModelConfig(), {"logits": logits}, batch, -1.0, stage=2
        )
    with pytest.raises(ValueError, match="needs a distribution head"):
        L.compute_loss(
            LossConfig(name="mae"),
            ModelConfig(formulation="mae"),
            {"age": torch.zeros(2)},
            batch,
            0.5,
            stage=2,
        )


def test_compute_loss_xing_formulations() -> None:
    batch = {"age": torch.tensor([2.0, 2.0])}
    out = {"age": torch.tensor([1.0, 4.0])}
    assert L.compute_loss(LossConfig(name="mse"), ModelConfig(), out, batch)[0].item() == 2.5
    assert L.compute_loss(LossConfig(name="mae"), ModelConfig(), out, batch)[0].item() == 1.5
    ce_out = {"logits": torch.log(torch.tensor([[0.2, 0.3, 0.5]]))}
    loss, _ = L.compute_loss(LossConfig(name="ce"), ModelConfig(), ce_out, {"age": [2.0]})
    assert loss.item() == pytest.approx(-math.log(0.5))
    ord_out = {"ordinal_logits": torch.tensor([[20.0, 20.0, -20.0, -20.0, -20.0]])}
    # age_min from the model config: with 1, targets for y = 3 are (1, 1, 0, 0, 0)
    loss, _ = L.compute_loss(
        LossConfig(name="ordinal_bce"),
        ModelConfig(formulation="ordinal", age_min=1),
        ord_out,
        {"age": [3.0]},
    )
    assert loss.item() < 1e-6


def test_compute_loss_multitask_parallel_and_hybrid() -> None:
    batch = {
        "age": torch.tensor([2.0, 2.0, 2.0]),
        "gender": torch.tensor([0, 1, -1]),
        "race": torch.tensor([2, -1, 3]),
    }
    out = {
        "age": torch.tensor([2.0, 2.0, 2.0]),  # perfect: age term 0
        "gender_logits": torch.zeros(3, 2),
        "race_logits": torch.zeros(3, 5),
        "group_logits": torch.zeros(3, 10),
    }
    cfg = LossConfig(name="mae", alpha=1.0, beta=3.0)
    # parallel: gender over 2 samples: log 2; race over 2 samples: log 5
    loss, parts = L.compute_loss(
        cfg, ModelConfig(formulation="mae", multitask="parallel"), out, batch
    )
    assert loss.item() == pytest.approx(math.log(2) + 3 * math.log(5), rel=1e-6)
    assert parts["gender"] == pytest.approx(math.log(2))
    # hybrid: group = gender * 5 + race, only sample 0 has both; CE log 10, weight (1+3)/2
    loss, parts = L.compute_loss(
        cfg, ModelConfig(formulation="mae", multitask="hybrid"), out, batch
    )
    assert loss.item() == pytest.approx(2 * math.log(10), rel=1e-6)
    assert "gender" not in parts and parts["group"] == pytest.approx(math.log(10))
    # no multitask: the extra logits are ignored
    loss, _ = L.compute_loss(cfg, ModelConfig(formulation="mae"), out, batch)
    assert loss.item() == 0.0


def test_hybrid_group_labels_come_from_the_heads_table() -> None:
    """The hybrid term reads the head's (gender, race) -> group table: with Morph's four
    groups a sample of another race belongs to no group and adds nothing."""
    group_map = torch.full((2, 5), -1)
    group_map[1, 1], group_map[0, 1], group_map[1, 0], group_map[0, 0] = 0, 1, 2, 3
    groups = L.group_labels(
        torch.tensor([1, 0, 0, 1, -1]), torch.tensor([1, 0, 2, 0, 1]), group_map
    )
    assert groups.tolist() == [0, 3, -1, 2, -1]
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 5))
    # samples 0 (BF: p 0.5), 1 (WM: p 0.125), 3 (WF: p 0.125); 2 and 4 in no group
    want = -(math.log(0.5) + 2 * math.log(0.125)) / 3
    assert L.group_loss(logits, groups).item() == pytest.approx(want, rel=1e-6)
    out = {"age": torch.full((5,), 2.0), "group_logits": logits, "group_map": group_map}
    batch = {
        "age": torch.full((5,), 2.0),
        "gender": torch.tensor([1, 0, 0, 1, -1]),
        "race": torch.tensor([1, 0, 2, 0, 1]),
    }
    cfg = LossConfig(name="mae", alpha=1.0, beta=1.0)
    loss, parts = L.compute_loss(
        cfg, ModelConfig(formulation="mae", multitask="hybrid"), out, batch
    )
    assert parts["group"] == pytest.approx(want, rel=1e-6) and loss.item() == pytest.approx(want)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        bad = {**out, "group_logits": torch.zeros(5, 10)}
        L.compute_loss(cfg, ModelConfig(formulation="mae", multitask="hybrid"), bad, batch)


# --------------------------------------------------------------------------------------
# The loss registry: every entry, through the registry
# --------------------------------------------------------------------------------------


def _terms(head_out: dict, ages: list[float], *, mae: float | None = None, name: str = "x"):
    return L.AgeTerms(
        name=name,
        head_out=head_out,
        y=torch.tensor(ages),
        sigma=1.0,
        lam=2.0,
        mae=mae,
        age_min=1,
    )


def test_registry_holds_every_name_the_config_allows() -> None:
    from typing import get_args, get_type_hints

    assert sorted(L.LOSSES) == sorted(get_args(get_type_hints(LossConfig)["name"]))
    assert [n for n, e in L.LOSSES.items() if e.distribution] == [
        "kl",
        "base",
        "sum",
        "ce",
        "ldl_ce",
    ]


def test_distribution_entries_through_the_registry() -> None:
    uniform = {"logits": torch.zeros(1, 2)}
    t = _terms(uniform, [0.0])
    assert L.loss_entry("kl").fn(t).item() == pytest.approx(KL_A, rel=1e-5)
    assert t.parts["er"] == pytest.approx(0.5)
    t = _terms(uniform, [0.0])
    assert L.loss_entry("base").fn(t).item() == pytest.approx(KL_A + 2 * 0.5, rel=1e-5)
    t = _terms({"logits": torch.tensor([[LOG3, 0.0]]), "local_logits": _local_logits()}, [0.0])
    local = (2 * (KL_A + 2 * 0.5) + 2 * (KL_B + 2 * 0.25)) / 4  # lambda 2 on both parts
    loss = L.loss_entry("sum").fn(t)
    assert t.parts["loc"] == pytest.approx(local, rel=1e-5)
    assert loss.item() == pytest.approx(local + KL_B + 2 * 0.25, rel=1e-5)
    t = _terms({"logits": torch.log(torch.tensor([[0.2, 0.3, 0.5]]))}, [2.0], name="ce")
    assert L.loss_entry("ce").fn(t).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    assert t.parts["ce"] == pytest.approx(-math.log(0.5), rel=1e-6)
    t = _terms(uniform, [0.0], name="ldl_ce")
    assert L.loss_entry("ldl_ce").fn(t).item() == pytest.approx(math.log(2), rel=1e-6)


def test_stage2_mae_term_through_the_registry() -> None:
    """LAE eq. 4 on the entry: (|y - y_hat| - mae)^2 replaces lambda * er."""
    t = _terms({"logits": torch.zeros(1, 2)}, [0.0], mae=0.25)
    loss = L.loss_entry("kl").fn(t)
    assert loss.item() == pytest.approx(KL_A + 0.0625, rel=1e-5)
    assert t.parts["er_mae"] == pytest.approx(0.0625, rel=1e-5)


def test_regression_and_ordinal_entries_through_the_registry() -> None:
    out = {"age": torch.tensor([1.0, 4.0])}
    assert L.loss_entry("mse").fn(_terms(out, [2.0, 2.0])).item() == 2.5
    assert L.loss_entry("mae").fn(_terms(out, [2.0, 2.0])).item() == 1.5
    ordinal = {"ordinal_logits": torch.tensor([[20.0, 20.0, -20.0, -20.0, -20.0]])}
    assert L.loss_entry("ordinal_bce").fn(_terms(ordinal, [3.0])).item() < 1e-6  # age_min 1
    with pytest.raises(ValueError, match=r"loss\.name=mae needs head output 'age'"):
        L.loss_entry("mae").fn(_terms({"logits": torch.zeros(1, 2)}, [1.0], name="mae"))


def test_unknown_loss_is_refused_with_a_suggestion() -> None:
    with pytest.raises(
        ValueError, match=r"loss.name='kll' is not registered; did you mean 'kl'\? \(registered"
    ):
        L.loss_entry("kll")
    with pytest.raises(ValueError, match=r"'base', 'ce', 'kl', 'ldl_ce', 'mae', 'mse'"):
        L.compute_loss(
            LossConfig(name="huber"), ModelConfig(), {"age": torch.zeros(1)}, {"age": [1.0]}
        )  # type: ignore[arg-type]


def test_a_new_loss_is_one_decorated_function() -> None:
    @L.register_loss("test_half_mae")
    def _half(t: L.AgeTerms) -> torch.Tensor:
        return 0.5 * (t.need("age") - t.y).abs().mean()

    try:
        loss, parts = L.compute_loss(
            LossConfig(name="test_half_mae"),  # type: ignore[arg-type]
            ModelConfig(formulation="mae"),
            {"age": torch.tensor([1.0, 4.0])},
            {"age": torch.tensor([2.0, 2.0])},
        )
        assert loss.item() == 0.75 and parts["age"] == 0.75
        with pytest.raises(ValueError, match="already registered"):
            L.register_loss("test_half_mae")(lambda t: t.y)
        with pytest.raises(ValueError, match="needs a distribution head"):
            L.compute_loss(
                LossConfig(name="test_half_mae"),  # type: ignore[arg-type]
                ModelConfig(),
                {"age": torch.zeros(2)},
                {"age": torch.zeros(2)},
                mae_ref=1.0,
                stage=2,
            )
    finally:
        del L.LOSSES["test_half_mae"]
