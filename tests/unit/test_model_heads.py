"""Heads: PA on the paper's feature maps, the five formulations, the multi-task nets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ageray.config import ModelConfig
from ageray.model import (
    DeepMultiTask,
    Formulation,
    GLAEHead,
    HybridMultiTask,
    LinearHead,
    ParallelMultiTask,
    Projection,
    age_from_probs,
    build_model,
    create_backbone,
)
from ageray.model.head_registry import (
    HEADS,
    MULTITASK,
    head_builder,
    make_head,
    multitask_builder,
    register_head,
)

LDL = Formulation("ldl", 101)
PAPER_OUT_7X7 = {(16, 8): 13, (16, 16): 7, (32, 8): 11, (32, 16): 6}


@pytest.mark.parametrize(("kernel", "stride"), list(PAPER_OUT_7X7))
def test_glae_head_resnet18_shapes(kernel: int, stride: int) -> None:
    """ResNet-18 at 224: F 512x7x7 -> F' 101xH'xW' -> Proj(101*H'*W' -> 512) -> 101."""
    head = GLAEHead(512, (7, 7), LDL, r=16, kernel_size=kernel, stride=stride)
    h = PAPER_OUT_7X7[(kernel, stride)]
    assert isinstance(head.proj[0], nn.Linear)
    assert head.proj[0].in_features == 101 * h * h and head.proj[0].out_features == 512
    assert head.classifier.in_features == 512 and head.classifier.out_features == 101
    out = head(torch.randn(2, 512, 7, 7), return_local=True)
    assert out["local_logits"].shape == (2, 101, h, h)
    assert out["logits"].shape == (2, 101) and out["age"].shape == (2,)
    assert "local_logits" not in head(torch.randn(2, 512, 7, 7))


def test_glae_head_resnet50_shapes() -> None:
    """ResNet-50 at 224 with the paper's (16, 16): 2048x7x7 -> 8x112x112 -> 101x7x7 -> 2048."""
    head = GLAEHead(2048, (7, 7), LDL, r=16, kernel_size=16, stride=16)
    assert head.fr.conv.in_channels == 8
    assert head.proj[0].in_features == 101 * 49 and head.proj[0].out_features == 2048
    out = head(torch.randn(2, 2048, 7, 7), return_local=True)
    assert out["local_logits"].shape == (2, 101, 7, 7) and out["logits"].shape == (2, 101)


def test_glae_head_rejects_other_map_size_and_regression() -> None:
    head = GLAEHead(512, (4, 4), LDL)
    with pytest.raises(ValueError, match=r"built for a 4x4 feature map.*got 7x7.*image_size"):
        head(torch.randn(1, 512, 7, 7))
    with pytest.raises(ValueError, match="head=glae with formulation=mae"):
        GLAEHead(512, (4, 4), Formulation("mae"))


def test_projection_depths() -> None:
    p0 = Projection(1616, 512, depth=0)
    assert [type(m) for m in p0] == [nn.Linear]  # depth 0: one linear layer, no BN/activation
    p2 = Projection(1616, 512, depth=2)
    kinds = [type(m) for m in p2]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert p2[0].in_features == 1616 and p2[3].in_features == 512 and p2[6].out_features == 512
    with pytest.raises(ValueError, match="proj_depth=-1"):
        Projection(10, 10, depth=-1)


@pytest.mark.parametrize(
    ("name", "keys", "dim"),
    [
        ("ldl", {"logits", "age"}, 101),
        ("onehot", {"logits", "age"}, 101),
        ("mse", {"age"}, 1),
        ("mae", {"age"}, 1),
        ("ordinal", {"ordinal_logits", "age"}, 100),
    ],
)
def test_linear_head_formulations(name: str, keys: set[str], dim: int) -> None:
    form = Formulation(name, 101)
    head = LinearHead(64, form)
    assert head.classifier.out_features == dim == form.out_dim
    out = head(torch.randn(2, 64, 3, 3))
    assert set(out) == keys and out["age"].shape == (2,)


def test_formulation_ages_by_hand() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert age_from_probs(probs).tolist() == [1.5, 0.0]
    # Xing eq. 11: 1 + sum_k f_k with f_k = [sigmoid_k > 0.5] (0.5 itself is no "yes")
    ordinal = Formulation("ordinal", 4, age_min=1)
    raw = torch.tensor([[0.0, math.log(3.0), -1e4]])  # sigmoids 0.5, 0.75, 0
    assert ordinal.outputs(raw)["age"].tolist() == [2.0]
    soft = Formulation("ordinal", 4, age_min=1, answer="expectation")
    assert soft.outputs(raw)["age"].tolist() == pytest.approx([1 + 0.5 + 0.75])
    # one-hot: the most likely age (Xing 3.2.1) unless the expectation is asked for
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    assert Formulation("onehot", 4).outputs(logits)["age"].tolist() == [3.0, 0.0]
    expect = Formulation("onehot", 4, answer="expectation").outputs(logits)["age"]
    assert expect.tolist() == pytest.approx([2.0, 0.6])
    assert Formulation("ldl", 4).outputs(logits)["age"].tolist() == pytest.approx([2.0, 0.6])
    with pytest.raises(ValueError, match=r"model\.answer='mode'"):
        Formulation("onehot", 4, answer="mode")
    mse = Formulation("mse", 101)
    layer = nn.Linear(4, 1)
    mse.init_layer(layer)
    assert layer.bias.item() == 50.0  # middle of 0..100
    with pytest.raises(ValueError, match="age_min=1 with formulation=ldl"):
        Formulation("ldl", 101, age_min=1)
    with pytest.raises(ValueError, match="formulation='huber'"):
        Formulation("huber")


def _hybrid(form: Formulation, channels: int = 3) -> HybridMultiTask:
    torch.manual_seed(0)
    return HybridMultiTask(channels, form, num_genders=2, num_races=2)


def test_hybrid_fusion_regression_by_hand() -> None:
    """Xing eq. 13: F_a = sum_k F_group_k * F_k on a tiny example."""
    head = _hybrid(Formulation("mae", 101))
    group_logits = torch.tensor([[math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]])
    ages = torch.tensor([[[10.0], [20.0], [30.0], [40.0]]])
    out = head.fuse(group_logits, ages)
    # Group probabilities 0.1, 0.2, 0.3, 0.4 -> 1 + 4 + 9 + 16 = 30.
    assert out["age"].item() == pytest.approx(30.0)
    assert out["group_ages"].tolist() == [[10.0, 20.0, 30.0, 40.0]]
    # race_gender groups: group = gender * R + race: gender 0 = groups 0, 1; race 0 = 0, 2.
    assert out["gender_logits"].exp().tolist()[0] == pytest.approx([0.3, 0.7])
    assert out["race_logits"].exp().tolist()[0] == pytest.approx([0.4, 0.6])


def test_hybrid_forward_matches_formula() -> None:
    head = _hybrid(Formulation("ldl", 5), channels=3)
    x = torch.randn(2, 3, 2, 2)
    out = head(x)
    pooled = x.mean((2, 3))
    g = torch.softmax(head.group(pooled), -1)
    p_k = torch.stack([torch.softmax(h(pooled), -1) for h in head.age_heads], 1)
    ages_k = (p_k * torch.arange(5.0)).sum(-1)
    assert torch.allclose(out["age"], (g * ages_k).sum(-1), atol=1e-5)
    fused = (g[..., None] * p_k).sum(1)
    assert torch.allclose(torch.softmax(out["logits"], -1), fused, atol=1e-6)
    assert out["group_logits"].shape == (2, 4) and out["group_ages"].shape == (2, 4)
    assert out["group_raw"].shape == (2, 4, 5)


@pytest.mark.parametrize("answer", ["paper", "expectation"])
def test_hybrid_fusion_is_eq13_on_the_group_answers(answer: str) -> None:
    """The fused age is sum_k g_k * (group k's own answer): for ordinal the count of
    "older than" votes per group (Xing eq. 11) as the paper, the soft sum as the option; for
    one-hot each group's argmax."""
    glog = torch.randn(3, 4)
    g = torch.softmax(glog, -1)
    form = Formulation("ordinal", 5, age_min=1, answer=answer)
    raw = torch.randn(3, 4, 4)
    out = _hybrid(form).fuse(glog, raw)
    q = torch.sigmoid(raw)
    per_group = 1 + ((q > 0.5).float() if answer == "paper" else q).sum(-1)
    assert torch.allclose(out["age"], (g * per_group).sum(-1), atol=1e-5)
    assert out["ordinal_logits"].shape == (3, 4)
    fused_q = (g[..., None] * q).sum(1)
    assert torch.allclose(torch.sigmoid(out["ordinal_logits"]), fused_q, atol=1e-5)
    onehot = Formulation("onehot", 5, answer=answer)
    raw = torch.randn(3, 4, 5)
    out = _hybrid(onehot).fuse(glog, raw)
    p = torch.softmax(raw, -1)
    per_group = p.argmax(-1).float() if answer == "paper" else (p * torch.arange(5.0)).sum(-1)
    assert torch.allclose(out["age"], (g * per_group).sum(-1), atol=1e-5)


def test_hybrid_morph_groups() -> None:
    """Morph's BF, BM, WF, WM (Xing 3.3.3): four groups over the 2 x 5 label codes; a race no
    group covers gets probability 0, and the label table sends it to no group (-1)."""
    from ageray.model.multitask import hybrid_groups

    groups = hybrid_groups("morph", num_genders=2, num_races=5)
    assert groups == ((1, 1), (0, 1), (1, 0), (0, 0))  # (gender, race): 1 female, 1 black
    head = HybridMultiTask(3, Formulation("mae", 101), groups=groups, num_races=5)
    glog = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    out = head.fuse(glog, torch.zeros(1, 4, 1))
    assert out["gender_logits"].exp().tolist()[0] == pytest.approx([0.6, 0.4])  # BM+WM, BF+WF
    race = out["race_logits"].exp().tolist()[0]
    assert race == pytest.approx([0.7, 0.3, 0.0, 0.0, 0.0], abs=1e-6)  # white, black, rest 0
    labels = head.group_labels(torch.tensor([1, 0, 1, 0, 0, -1]), torch.tensor([1, 1, 0, 0, 2, 0]))
    assert labels.tolist() == [0, 1, 2, 3, -1, -1]
    with pytest.raises(ValueError, match="hybrid_groups=morph needs"):
        hybrid_groups("morph", num_genders=2, num_races=1)
    with pytest.raises(ValueError, match="hybrid_groups='all'"):
        hybrid_groups("all")
    with pytest.raises(ValueError, match="outside"):
        HybridMultiTask(3, Formulation("mae", 101), groups=((0, 0), (2, 0)), num_genders=2)


# --------------------------------------------------------------------------------------
# The head registry: every entry, built through the registry
# --------------------------------------------------------------------------------------

SMALL = {"fr_r": 4, "fr_kernel": 2, "fr_stride": 2}


@pytest.fixture(scope="module")
def resnet18():
    return create_backbone("resnet18")


def test_registries_hold_every_name_the_config_allows() -> None:
    from typing import get_args, get_type_hints

    hints = get_type_hints(ModelConfig)
    assert sorted(HEADS) == sorted(get_args(hints["head"]))
    assert sorted(MULTITASK) == sorted(get_args(hints["multitask"]))


@pytest.mark.parametrize(("name", "cls"), [("linear", LinearHead), ("glae", GLAEHead)])
def test_each_age_head_through_the_registry(resnet18, name: str, cls: type) -> None:
    head = head_builder(name)(ModelConfig(head=name, **SMALL), resnet18, image_size=64, form=LDL)
    assert type(head) is cls and head.formulation is LDL
    out = head(torch.randn(2, 512, 2, 2), {}, name == "glae")
    assert out["logits"].shape == (2, 101)
    assert ("local_logits" in out) == (name == "glae")


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("none", LinearHead),
        ("parallel", ParallelMultiTask),
        ("deep", DeepMultiTask),
        ("hybrid", HybridMultiTask),
    ],
)
def test_each_multitask_arrangement_through_the_registry(resnet18, name: str, cls: type) -> None:
    mc = ModelConfig(head="linear", multitask=name)
    built = []

    def age_head() -> LinearHead:
        built.append(LinearHead(512, LDL))
        return built[-1]

    head = multitask_builder(name)(mc, resnet18, age_head, form=LDL)
    assert type(head) is cls
    assert len(built) == (0 if name == "hybrid" else 1)  # the hybrid net has its own estimators
    if name in ("parallel", "deep"):
        assert head.age is built[0]
    assert type(make_head(mc, resnet18, image_size=64, form=LDL)) is cls


def test_arrangement_errors_through_the_registry(resnet18) -> None:
    with pytest.raises(ValueError, match="needs num_genders and num_races >= 1"):
        multitask_builder("parallel")(
            ModelConfig(multitask="parallel", num_races=0), resnet18, lambda: None, form=LDL
        )
    with pytest.raises(ValueError, match=r"use model\.head=linear"):
        make_head(ModelConfig(head="glae", multitask="hybrid"), resnet18, image_size=64, form=LDL)
    with pytest.raises(ValueError, match=r"2x2 feature map at 64 px; with model.fr_r=3"):
        make_head(ModelConfig(head="glae", fr_r=3), resnet18, image_size=64, form=LDL)


def test_unknown_names_are_refused_with_a_suggestion() -> None:
    with pytest.raises(
        ValueError,
        match=r"model.head='glea' is not registered; did you mean 'glae'\? "
        r"\(registered: \['glae', 'linear'\]\)",
    ):
        head_builder("glea")
    with pytest.raises(
        ValueError,
        match=r"model.multitask='paralel'.*did you mean 'parallel'.*"
        r"'deep', 'hybrid', 'none', 'parallel'",
    ):
        multitask_builder("paralel")
    with pytest.raises(ValueError, match=r"model.head='zzz' is not registered \(registered"):
        build_model(ModelConfig(head="zzz"))  # type: ignore[arg-type]


def test_a_new_head_is_one_decorated_function(resnet18) -> None:
    @register_head("test_linear_half")
    def _half(mc, backbone, *, image_size, form):
        return LinearHead(backbone.out_channels, form, drop_rate=0.5)

    try:
        head = make_head(ModelConfig(head="test_linear_half"), resnet18, image_size=64, form=LDL)  # type: ignore[arg-type]
        assert type(head) is LinearHead
        with pytest.raises(ValueError, match="already registered"):
            register_head("test_linear_half")(lambda *a, **k: None)
    finally:
        del HEADS["test_linear_half"]
