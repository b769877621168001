"""No pickle in the registry: a registered model holds safetensors and JSON (and an ONNX
export); the optimiser state (``optim.pt``, pickle-format) stays in checkpoints; every
``torch.load`` in the code refuses arbitrary objects (``weights_only=True``).

The registry walk uses MLflow's embedded store (a real MLflow, no server; the integration
test ``test_predict.py`` walks a registered model on the real ``mlflow server`` with S3)."""

from __future__ import annotations

import ast
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from datagen import make_tiny_model
from faces import is_pickle, pickle_files

ROOT = Path(__file__).resolve().parents[2]
CODE = ("platform", "jobs", "serve", "tuning", "benchmarks")


def test_the_detector_finds_every_pickle_format(tmp_path: Path) -> None:
    """Positive and negative controls for the check the registry tests rely on."""
    torch.save({"w": torch.ones(2)}, tmp_path / "zip_format.bin")  # zip with data.pkl
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy").write_bytes(legacy.getvalue())
    (tmp_path / "p2").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    (tmp_path / "p5").write_bytes(pickle.dumps({"a": 1}, protocol=5))
    (tmp_path / "empty.pt").write_bytes(b"")  # the name promises pickle
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "ok.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    assert pickle_files(tmp_path) == ["empty.pt", "legacy", "p2", "p5", "zip_format.bin"]
    assert not is_pickle(tmp_path / "ok.safetensors")


def test_registry_files_leave_the_optimiser_state_in_the_checkpoint(tmp_path: Path) -> None:
    from ageray.config import Config
    from ageray.model import load_model
    from ageray.tracking import registry_files
    from ageray.training.checkpoint import save_checkpoint

    model, _ = load_model(make_tiny_model(tmp_path / "m"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64))["vanilla"]["logits"].sum().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, cfg=Config(), state={"epoch": 1},
                           optimizer=opt)  # fmt: skip
    assert pickle_files(ckpt) == ["optim.pt"]  # the checkpoint keeps it (resume)
    out = registry_files(ckpt, tmp_path / "registered")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert pickle_files(out) == []


def test_registered_model_tree_has_no_pickle(tmp_path: Path, monkeypatch) -> None:
    """log_model on a checkpoint folder (optim.pt + state.json beside the weights), then
    the whole registered artifact tree as MLflow hands it out: no pickle-format file, and
    the pyfunc model loads from it and answers."""
    import mlflow

    from ageray.config import Config
    from ageray.model import load_model
    from ageray.tracking import Tracker, log_model
    from ageray.training.checkpoint import save_checkpoint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.run.storage_path = str(tmp_path / "runs")
    cfg.data.image_size = 64  # the tiny model's
    tracker = Tracker(cfg)
    model, _ = load_model(make_tiny_model(tmp_path / "m"))
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, cfg=cfg, state={"epoch": 1},
                           optimizer=opt)  # fmt: skip
    assert (ckpt / "optim.pt").is_file()
    run_id = tracker.start_pipeline("train")
    out = log_model(tracker, run_id, ckpt, metrics={"val_mae": 5.0})
    tracker.end(run_id)
    uri = f"models:/{out['name']}/{out['version']}"
    tree = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert "artifacts/model/model.safetensors" in files and "MLmodel" in files
    assert not any(f.endswith(("optim.pt", "state.json")) for f in files), files
    assert pickle_files(tree) == [], files
    pyfunc = mlflow.pyfunc.load_model(uri)
    import pandas as pd
    from datagen import jpeg

    answer = pyfunc.predict(pd.DataFrame({"image": [jpeg(1, 48)]}))
    assert answer["error"].isna().all() and answer["age"].notna().all()


def _torch_loads() -> list[tuple[str, int, bool]]:
    found = []
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if not (
                    isinstance(f, ast.Attribute)
                    and f.attr == "load"
                    and isinstance(f.value, ast.Name)
                    and f.value.id == "torch"
                ):
                    continue
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                found.append((str(path.relative_to(ROOT)), node.lineno, safe))
    return found


def test_every_torch_load_is_weights_only() -> None:
    loads = _torch_loads()
    assert loads, "the scan found no torch.load at all: is it looking in the right place?"
    unsafe = [f"{p}:{line}" for p, line, safe in loads if not safe]
    assert not unsafe, f"torch.load without weights_only=True (unpickles objects): {unsafe}"


@pytest.mark.parametrize("call", ["torch.load(f)", "torch.load(f, weights_only=False)"])
def test_the_scan_catches_an_unsafe_load(call: str) -> None:
    node = ast.parse(call).body[0].value  # type: ignore[attr-defined]
    assert not any(
        k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords
    )
