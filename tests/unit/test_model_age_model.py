"""AgeModel: the factory's checks, forward dicts, stage-1/2 gradients, predict."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_predict import predict

from ageray.config import Config, ModelConfig
from ageray.model import AgeModel, adaptive_route, age_from_probs, build_model

SIZE = 64


def make(image_size: int = SIZE, **kw: object) -> AgeModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(**kw), image_size=image_size)  # type: ignore[arg-type]


def images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------ construction


def test_build_checks_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"resnet18 gives a 512x2x2.*fr_r=32.*in_channels=512"):
        make(fr_r=32, fr_kernel=32, fr_stride=32)
    with pytest.raises(ValueError, match=r"smaller than kernel_size=32.*empty"):
        make(fr_kernel=32, fr_stride=16, image_size=32)
    with pytest.raises(ValueError, match=r"multitask=hybrid with model\.head=glae"):
        make(multitask="hybrid")
    with pytest.raises(ValueError, match="head=glae with formulation=ordinal"):
        make(formulation="ordinal")
    with pytest.raises(ValueError, match="age_min=1 with formulation=ldl"):
        make(head="linear", age_min=1)
    with pytest.raises(ValueError, match="num_classes=1"):
        make(head="linear", num_classes=1)
    with pytest.raises(ValueError, match="proj_depth=-1"):
        make(proj_depth=-1)
    with pytest.raises(FileNotFoundError, match=r"weights\.safetensors.*do not exist"):
        make(head="linear", pretrained="/nonexistent/weights.safetensors")


def test_build_from_config_uses_data_image_size() -> None:
    cfg = Config()
    cfg.data.image_size = 64
    model = build_model(cfg)
    assert model.image_size == 64
    assert model.heads["vanilla"].fr.in_size == (2, 2)


@pytest.mark.parametrize(
    ("kw", "keys"),
    [
        ({"head": "glae"}, {"logits", "age", "local_logits"}),
        ({"head": "linear"}, {"logits", "age"}),
        ({"head": "linear", "formulation": "mse"}, {"age"}),
        ({"head": "linear", "formulation": "ordinal"}, {"ordinal_logits", "age"}),
        ({"head": "glae", "multitask": "parallel"},
         {"logits", "age", "local_logits", "gender_logits", "race_logits"}),
        ({"head": "linear", "formulation": "mae", "multitask": "deep"},
         {"age", "gender_logits", "race_logits"}),
        ({"head": "linear", "formulation": "mae", "multitask": "hybrid"},
         {"age", "gender_logits", "race_logits", "group_logits", "group_ages", "group_raw",
          "group_map"}),
    ],
)  # fmt: skip
def test_forward_keys_and_shapes(kw: dict[str, object], keys: set[str]) -> None:
    model = make(**kw).train()
    out = model(images())
    assert out["features"].shape == (2, 512, 2, 2)
    head = out["vanilla"]
    assert set(head) == keys
    assert head["age"].shape == (2,)
    shapes = {
        "logits": (2, 101),
        "ordinal_logits": (2, 100),
        "gender_logits": (2, 2),
        "race_logits": (2, 5),
        "group_logits": (2, 4),  # Morph's BF, BM, WF, WM by default
        "group_raw": (2, 4, 1),
        "group_map": (2, 5),
        "local_logits": (2, 101, 2, 2),
    }
    for k, shape in shapes.items():
        if k in head:
            assert head[k].shape == shape, k
    model.eval()
    assert "local_logits" not in model(images())["vanilla"]
    local = model(images(), return_local=True)["vanilla"]
    assert ("local_logits" in local) == (kw["head"] == "glae")


def test_deep_multitask_reads_stage_maps() -> None:
    model = make(head="linear", multitask="deep")
    head = model.heads["vanilla"]
    assert head.stage_indices == (2, 3)  # resnet: layer2 (race), layer3 (gender)
    assert head.race[0].in_channels == 128 and head.gender[0].in_channels == 256


def test_other_backbones_end_to_end() -> None:
    for name, channels in (("resnet50", 2048), ("tf_efficientnetv2_b0", 1280)):
        model = make(backbone=name, fr_r=16).eval()
        with torch.no_grad():
            out = model(images(1))
        assert out["features"].shape == (1, channels, 2, 2)
        assert out["vanilla"]["logits"].shape == (1, 101)


def test_unknown_head_name() -> None:
    with pytest.raises(KeyError, match="add_balanced_head"):
        make(head="linear")(images(), heads="balanced")


# ------------------------------------------------------------------ gradients


def test_stage1_local_branch_gets_gradients() -> None:
    model = make(proj_depth=1).train()
    out = model(images())
    out["vanilla"]["local_logits"].logsumexp(1).mean().backward()
    head = model.heads["vanilla"]
    assert head.fr.conv.weight.grad is not None and head.fr.conv.weight.grad.abs().sum() > 0
    assert model.backbone.model.conv1.weight.grad is not None
    assert head.classifier.weight.grad is None  # the local loss does not touch the holistic FC


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


@pytest.mark.parametrize("trainable", ["head", "classifier"])
def test_stage2_freezing(trainable: str) -> None:
    model = make(proj_depth=1)
    model.add_balanced_head(trainable)  # type: ignore[arg-type]
    model.train()
    assert not model.backbone.training and not model.heads["vanilla"].training
    balanced = model.heads["balanced"]
    expected = (
        set(balanced.parameters()) if trainable == "head" else set(balanced.classifier.parameters())
    )
    assert set(model.stage2_parameters()) == expected
    backbone_stats = _bn_stats(model.backbone)
    head_stats = _bn_stats(balanced)
    out = model(images())
    out["balanced"]["age"].sum().backward()
    for name, p in model.named_parameters():
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert got == (p in expected), name
    for k, v in _bn_stats(model.backbone).items():
        assert torch.equal(v, backbone_stats[k]), k
    moved = any(not torch.equal(v, head_stats[k]) for k, v in _bn_stats(balanced).items())
    assert moved == (trainable == "head")  # the projection's BN trains only with the head
    assert model.heads["balanced"] is not model.heads["vanilla"]
    with pytest.raises(ValueError, match="already has a balanced head"):
        model.add_balanced_head()


def test_balanced_head_starts_as_copy() -> None:
    model = make(head="linear").eval()
    model.add_balanced_head()
    out = model(images())
    assert torch.equal(out["vanilla"]["logits"], out["balanced"]["logits"])


# ------------------------------------------------------------------ predict


def _count_backbone_calls(model: AgeModel) -> list[int]:
    calls: list[int] = []
    model.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls


def test_predict_single_head() -> None:
    model = make().train()
    calls = _count_backbone_calls(model)
    pred = predict(model, images(3))
    assert calls == [6]  # one backbone pass over image + flip
    assert model.training  # mode restored
    assert pred.age.shape == (3,) and pred.probs is not None and pred.probs.shape == (3, 101)
    assert pred.head.tolist() == [0, 0, 0]
    assert set(pred.heads) == {"vanilla"}
    van = pred.heads["vanilla"]
    assert van["kl"] is not None and van["kl"].shape == (3,) and (van["kl"] >= 0).all()
    assert torch.allclose(pred.age, age_from_probs(pred.probs))
    # probs is the average of the image and flip distributions
    model.eval()
    with torch.no_grad():
        x = images(3)
        p = torch.softmax(model(x)["vanilla"]["logits"], -1)
        pf = torch.softmax(model(x.flip(-1))["vanilla"]["logits"], -1)
    assert torch.allclose(pred.probs, 0.5 * (p + pf), atol=1e-6)


def test_predict_routes_between_heads() -> None:
    model = make(head="linear")
    model.add_balanced_head()
    with torch.no_grad():  # make the heads differ
        model.heads["balanced"].classifier.weight.mul_(3.0)
    calls = _count_backbone_calls(model)
    x = images(4)
    pred = predict(model, x)
    assert calls == [8]
    v, b = pred.heads["vanilla"], pred.heads["balanced"]
    model.eval()
    with torch.no_grad():
        both = model(torch.cat([x, x.flip(-1)]))
    pv = torch.softmax(both["vanilla"]["logits"], -1)
    pb = torch.softmax(both["balanced"]["logits"], -1)
    probs, choice, kl_v, kl_b = adaptive_route(pv[:4], pv[4:], pb[:4], pb[4:])
    assert torch.equal(pred.head, choice)
    assert torch.allclose(pred.probs, probs, atol=1e-6)
    # The model's KL is float32 from log-softmax (traceable, no float64): the float64
    # reference on probabilities agrees to float32 precision.
    assert torch.allclose(v["kl"].double(), kl_v, atol=1e-6)
    assert torch.allclose(b["kl"].double(), kl_b, atol=1e-6)
    routed = torch.where(choice.bool(), b["age"], v["age"])
    assert torch.allclose(pred.age, routed, atol=1e-4)
    bigger = predict(model, x, rule="bigger")
    assert torch.equal(bigger.head, 1 - choice) or bool((kl_v == kl_b).any())


def test_predict_without_flip_and_regression() -> None:
    model = make(head="linear")
    model.add_balanced_head()
    pred = predict(model, images(), flip=False)
    assert pred.head.tolist() == [0, 0] and pred.heads["vanilla"]["kl"] is None
    reg = make(head="linear", formulation="mae", multitask="parallel")
    pred = predict(reg, images())
    assert pred.probs is None and pred.head.tolist() == [0, 0]
    assert pred.gender is not None and pred.gender.shape == (2, 2)
    reg.eval()
    with torch.no_grad():
        a = reg(images())["vanilla"]["age"]
        af = reg(images().flip(-1))["vanilla"]["age"]
    assert torch.allclose(pred.age, 0.5 * (a + af), atol=1e-5)


@pytest.mark.parametrize("answer", ["paper", "expectation"])
def test_predict_answers_as_the_formulation_says(answer: str) -> None:
    """Ordinal: flip TTA averages the K-1 probabilities, then counts the votes above 0.5
    (Xing eq. 11) or sums them; one-hot: argmax (Xing 3.2.1) or the expectation of the
    flip-averaged distribution; the hybrid net: eq. 13 per pass, averaged over the flip, and
    its group probabilities."""
    x = images(3)
    ordinal = make(head="linear", formulation="ordinal", answer=answer).eval()
    with torch.no_grad():
        q = torch.sigmoid(ordinal(x)["vanilla"]["ordinal_logits"])
        qf = torch.sigmoid(ordinal(x.flip(-1))["vanilla"]["ordinal_logits"])
    q = 0.5 * (q + qf)
    want = (q > 0.5).float().sum(-1) if answer == "paper" else q.sum(-1)
    assert torch.allclose(predict(ordinal, x).age, want, atol=1e-5)
    onehot = make(head="linear", formulation="onehot", answer=answer)
    pred = predict(onehot, x)
    want = pred.probs.argmax(-1).float() if answer == "paper" else age_from_probs(pred.probs)
    assert torch.allclose(pred.age, want, atol=1e-5)
    hybrid = make(head="linear", formulation="ordinal", multitask="hybrid", answer=answer)
    pred = predict(hybrid.eval(), x)
    with torch.no_grad():
        a, af = hybrid(x)["vanilla"]["age"], hybrid(x.flip(-1))["vanilla"]["age"]
    assert torch.allclose(pred.age, 0.5 * (a + af), atol=1e-5)
    assert pred.group is not None and pred.group.shape == (3, 4)
    assert torch.allclose(pred.group.sum(-1), torch.ones(3), atol=1e-5)
    assert pred.race is not None and pred.race[:, 2:].max() < 1e-6  # Morph groups: W, B only


def test_channels_last_and_backbone_state() -> None:
    model = make(channels_last=True).eval()
    assert model.backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert predict(model, images()).age.shape == (2,)
    state = model.backbone_state_dict()
    assert "conv1.weight" in state and not any(k.startswith("model.") for k in state)
    other = make(head="linear")
    report = other.load_backbone(state)
    assert report.ignored == []
    for k, v in other.backbone_state_dict().items():
        assert torch.equal(v, state[k])


def test_config_is_kept() -> None:
    model = make(head="linear", drop_rate=0.1)
    assert dataclasses.asdict(model.cfg)["drop_rate"] == 0.1


def test_predict_under_bf16_autocast() -> None:
    """The training loop predicts under autocast; probabilities and KL stay float32/64."""
    model = make()
    model.add_balanced_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = predict(model, images())
    assert pred.probs is not None and pred.probs.dtype == torch.float32
    assert torch.isfinite(pred.age).all() and torch.allclose(pred.probs.sum(-1), torch.ones(2))
