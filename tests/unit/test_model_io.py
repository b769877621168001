"""Saved model format: safetensors + model.json, no pickle, identical predictions after load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_predict import predict
from safetensors.torch import save_file

from ageray.config import Config, ModelConfig
from ageray.model import build_model, load_model, read_model_info, save_model

SIZE = 64


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _assert_no_pickle(path: Path) -> None:
    raw = path.read_bytes()
    assert not raw.startswith(b"PK")  # torch.save's zip container
    assert not raw.startswith(b"\x80")  # a pickle protocol header
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 + JSON header
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "pt"


def _trained_ish(tmp_path: Path) -> tuple[torch.nn.Module, Config]:
    """A two-head GLAE model whose BN statistics and weights differ from a fresh build."""
    cfg = Config()
    cfg.data.image_size = SIZE
    cfg.data.normalize = "glae"
    cfg.model = ModelConfig(head="glae", proj_depth=1, pretrained=None)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        model(_images(4))  # move BN running stats
    model.add_balanced_head("head")
    with torch.no_grad():
        model.heads["balanced"].classifier.weight.mul_(2.0)
        model.heads["balanced"].proj[1].running_mean.add_(0.5)
    return model, cfg


def test_round_trip_identical_predictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg = _trained_ish(tmp_path)
    x = _images()
    before = predict(model, x)
    folder = save_model(model, tmp_path / "m", cfg, meta={"metrics": {"val_mae": 3.5}})
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    _assert_no_pickle(folder / "model.safetensors")
    info = json.loads((folder / "model.json").read_text())
    assert info["format"] == "ageray-model/1"
    assert info["heads"] == ["vanilla", "balanced"]
    assert info["data"] == {"image_size": SIZE, "normalize": "glae"}
    assert info["align"] is False and info["meta"]["metrics"]["val_mae"] == 3.5
    assert info["model"]["head"] == "glae" and info["model"]["proj_depth"] == 1

    def no_torch_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_model must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_torch_load)
    loaded, info2 = load_model(folder)
    assert info2 == info and not loaded.training
    assert loaded.head_names == ["vanilla", "balanced"]
    after = predict(loaded, x)
    assert torch.allclose(before.age, after.age, atol=1e-6)
    assert torch.allclose(before.probs, after.probs, atol=1e-6)
    assert torch.equal(before.head, after.head)
    for name in ("vanilla", "balanced"):
        assert torch.allclose(before.heads[name]["kl"], after.heads[name]["kl"], atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_does_not_need_pretrained_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "imagenet.safetensors"
    src = build_model(ModelConfig(head="linear"), image_size=SIZE)
    save_file({k: v.contiguous() for k, v in src.backbone_state_dict().items()}, str(weights))
    model = build_model(ModelConfig(head="linear", pretrained=str(weights)), image_size=SIZE)
    save_model(model, tmp_path / "m", meta={"align": True})
    weights.unlink()
    loaded, info = load_model(tmp_path / "m")
    assert info["align"] is True and info["data"] == {"image_size": SIZE, "normalize": None}
    assert loaded.cfg.pretrained is None
    assert loaded.head_names == ["vanilla"]


def test_multitask_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(head="linear", formulation="mae", multitask="deep")
    model = build_model(cfg, image_size=SIZE).eval()
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    x = _images(2)
    with torch.no_grad():
        a, b = model(x)["vanilla"], loaded(x)["vanilla"]
    for k in ("age", "gender_logits", "race_logits"):
        assert torch.allclose(a[k], b[k], atol=1e-6)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.json is missing"):
        load_model(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": "other/2"}))
    with pytest.raises(ValueError, match="format 'other/2'"):
        read_model_info(bad)
    torch.manual_seed(0)
    model = build_model(ModelConfig(head="linear"), image_size=SIZE)
    folder = save_model(model, tmp_path / "m")
    info = json.loads((folder / "model.json").read_text())
    info["model"]["head"] = "glae"  # architecture no longer matches the weights
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="do not match the architecture"):
        load_model(folder)
    info["model"]["backbon"] = "resnet18"
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"\['backbon'\] are unknown"):
        load_model(folder)


def test_model_saved_with_retired_dual_head_still_loads(tmp_path: Path) -> None:
    """model.json files written before ``model.dual_head`` was retired carry the key."""
    model, cfg = _trained_ish(tmp_path)
    folder = save_model(model, tmp_path / "old", cfg)
    info = json.loads((folder / "model.json").read_text())
    info["model"]["dual_head"] = True
    (folder / "model.json").write_text(json.dumps(info))
    loaded, _ = load_model(folder)
    assert loaded.head_names == ["vanilla", "balanced"]
    info["model"]["not_a_key"] = 1
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"model keys \['not_a_key'\] are unknown"):
        load_model(folder)
