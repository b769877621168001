"""timm trunks: feature maps, stage maps, and offline weight loading with strict key checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ageray.model import create_backbone, find_weights_file

EFFNET = "tf_efficientnetv2_b0"


@pytest.mark.parametrize(
    ("name", "channels", "stages"),
    [
        ("resnet18", 512, [64, 64, 128, 256, 512]),
        ("resnet50", 2048, [64, 256, 512, 1024, 2048]),
        (EFFNET, 1280, [16, 32, 48, 112, 192]),  # F is conv_head's 1280, not the last block
    ],
)
def test_shapes(name: str, channels: int, stages: list[int]) -> None:
    bb = create_backbone(name)
    assert bb.out_channels == channels
    assert [i["channels"] for i in bb.feature_info] == stages
    assert bb.feature_size(224) == (7, 7)
    assert bb.feature_size(112) == (4, 4)
    assert bb.feature_size(64) == (2, 2)
    assert bb.stage_sizes(64)[:-1] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    bb.eval()
    with torch.no_grad():
        final, inter = bb.forward_stages(torch.randn(1, 3, 64, 64), [2, -2])
    assert final.shape == (1, channels, 2, 2)
    assert sorted(inter) == [2, 3]
    assert inter[2].shape == (1, stages[2], 8, 8) and inter[3].shape == (1, stages[3], 4, 4)


def test_forward_resnet18_small_input() -> None:
    bb = create_backbone("resnet18")
    assert bb(torch.randn(2, 3, 112, 112)).shape == (2, 512, 4, 4)
    assert not any(k.startswith("fc") for k in bb.model.state_dict())


def test_unknown_backbone_name() -> None:
    with pytest.raises(ValueError, match=r"'resnet188' is not a timm model.*resnet18"):
        create_backbone("resnet188")


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    """A full timm resnet18 *classifier* (with fc), as an ImageNet file would hold."""
    torch.manual_seed(1)
    return timm.create_model("resnet18", pretrained=False, num_classes=1000)


def _assert_loaded(bb: torch.nn.Module, src: torch.nn.Module) -> None:
    ref = src.state_dict()
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_load_safetensors_file_ignores_classifier(
    tmp_path: Path, source_model: torch.nn.Module
) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    bb = create_backbone("resnet18")
    report = bb.load_pretrained(path)
    _assert_loaded(bb, source_model)
    assert report.ignored == ["fc.bias", "fc.weight"]
    assert report.loaded == len(bb.model.state_dict())
    assert "ignored 2 key(s)" in report.summary()


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
def test_load_pth_with_wrappers(
    tmp_path: Path, source_model: torch.nn.Module, wrapper: str | None
) -> None:
    state = source_model.state_dict()
    obj = {wrapper: state, "epoch": 3} if wrapper else state
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    bb = create_backbone("resnet18", pretrained=path)
    _assert_loaded(bb, source_model)


def test_load_from_cache_folder(tmp_path: Path, source_model: torch.nn.Module) -> None:
    snap = tmp_path / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()},
              str(snap / "model.safetensors"))  # fmt: skip
    (snap / "config.json").write_text("{}")
    assert find_weights_file(tmp_path) == snap / "model.safetensors"
    bb = create_backbone("resnet18", pretrained=tmp_path)
    _assert_loaded(bb, source_model)


def test_load_ddp_prefix_and_backbone_module_state(
    tmp_path: Path, source_model: torch.nn.Module
) -> None:
    bb = create_backbone("resnet18")
    bb.load_pretrained({f"module.{k}": v for k, v in source_model.state_dict().items()})
    _assert_loaded(bb, source_model)
    # A Backbone's own state dict ("model." prefix), as identity pretraining saves it.
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in bb.state_dict().items()}, str(path))
    other = create_backbone("resnet18", pretrained=path)
    _assert_loaded(other, source_model)


def test_missing_backbone_keys_name_the_file(tmp_path: Path, source_model: torch.nn.Module) -> None:
    state = {k: v for k, v in source_model.state_dict().items() if not k.startswith("layer4")}
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(KeyError, match=r"partial\.safetensors.*backbone key\(s\) missing.*layer4"):
        create_backbone("resnet18", pretrained=path)


def test_shape_mismatch(tmp_path: Path, source_model: torch.nn.Module) -> None:
    state = dict(source_model.state_dict())
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1.weight"):
        create_backbone("resnet18", pretrained=path)


def test_missing_path_and_ambiguous_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*do not exist.*nothing"):
        create_backbone("resnet18", pretrained=tmp_path / "nope.safetensors")
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="several weights files"):
        find_weights_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights file"):
        find_weights_file(empty)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        find_weights_file(tmp_path / "w.txt")


# --- another library's layout: torchvision files, timm's filter, a face-recognition file ---


def test_torchvision_resnet18_loads_by_name(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    tv = torchvision.models.resnet18()  # torchvision's layout: same names as timm's resnet
    path = tmp_path / "resnet18-tv.pth"
    torch.save(tv.state_dict(), path)
    bb = create_backbone("resnet18", pretrained=path)
    _assert_loaded(bb, tv)
    assert bb.model.state_dict().keys() <= tv.state_dict().keys()


def test_torchvision_efficientnet_maps_by_position(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    tv = torchvision.models.efficientnet_b0()  # features.0.0.weight ... vs conv_stem.weight ...
    # safetensors sorts its tensors, so another layout maps by position only from a pickle
    unordered = tmp_path / "effnet-tv.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(unordered))
    with pytest.raises(KeyError, match=r"effnet-tv\.safetensors.*safetensors does not keep"):
        create_backbone("efficientnet_b0", pretrained=unordered)
    path = tmp_path / "effnet-tv.pth"
    torch.save(tv.state_dict(), path)
    bb = create_backbone("efficientnet_b0")
    report = bb.load_pretrained(path)
    assert report.mapping == "position"
    assert report.ignored == ["classifier.1.bias", "classifier.1.weight"]
    assert "names mapped by position" in report.summary()
    mine = [v for k, v in bb.model.state_dict().items() if not k.endswith("num_batches_tracked")]
    theirs = [
        v
        for k, v in tv.state_dict().items()
        if not k.startswith("classifier.") and not k.endswith("num_batches_tracked")
    ]
    assert len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    # and the loaded trunk computes what torchvision's does
    x = torch.randn(1, 3, 64, 64)
    bb.eval()
    tv.eval()
    with torch.no_grad():
        assert torch.allclose(bb(x), tv.features(x), atol=1e-5)


def test_other_network_under_other_names_is_refused_by_name(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.mobilenet_v3_large()  # not timm's mobilenetv3 tensor for tensor
    path = tmp_path / "mnv3-tv.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(KeyError, match=r"mnv3-tv\.pth.*backbone key\(s\) missing.*conv_stem"):
        create_backbone("mobilenetv3_large_100", pretrained=path)


def test_face_recognition_file_reports_every_ignored_key(
    tmp_path: Path, source_model: torch.nn.Module
) -> None:
    state = {k: v for k, v in source_model.state_dict().items() if not k.startswith("fc.")}
    state.update({f"margin.{n}": torch.zeros(4, 512) for n in ("w0", "w1", "w2", "w3", "w4", "w5")})
    path = tmp_path / "arcface-r18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    report = create_backbone("resnet18").load_pretrained(path)
    assert report.mapping == "names"
    assert len(report.ignored) == 6
    for n in ("w0", "w1", "w2", "w3", "w4", "w5"):  # by name, no "..."
        assert f"margin.{n}" in report.summary()


class _Original(torch.nn.Module):
    """A trunk whose module (this test file) has a timm-style ``checkpoint_filter_fn``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)


def checkpoint_filter_fn(state: dict, model: torch.nn.Module) -> dict:
    """The original repository called the stem ``conv_in`` and the norm ``bn_in``."""
    rename = {"conv_in.": "stem.", "bn_in.": "norm."}
    out = {}
    for k, v in state.items():
        for old, new in rename.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        out[k] = v
    return out


def test_timm_checkpoint_filter_fn_maps_an_original_layout() -> None:
    from ageray.model.backbone import load_weights

    src = _Original()
    # the original layout: other names and, in between, a different order (norm first)
    original = {}
    for k, v in src.state_dict().items():
        original[k.replace("stem.", "conv_in.").replace("norm.", "bn_in.")] = v
    original = dict(reversed(list(original.items())))
    dst = _Original()
    report = load_weights(dst, original, name="original.pth")
    assert report.mapping == "timm filter"
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
