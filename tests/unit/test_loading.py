"""The one model loader: what it accepts, what it refuses before copying, and that loading
and swapping models leaves the temporary folder as it found it (issue 21, bounded disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from datagen import make_tiny_model

from ageray.inference import fetch_model_files, load_predictor, with_export
from ageray.inference import scratch as scratch_mod
from ageray.serving import load_served_model


@pytest.fixture()
def tmpdir_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp folder for this test, so its contents can be compared exactly."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(scratch_mod, "_ROOT", None)
    return tmp


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("loading") / "model")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_only_a_model_folder_is_accepted_and_nothing_else_is_read(
    tmp_path: Path, tmpdir_only: Path
) -> None:
    junk = tmp_path / "home"
    (junk / "sub").mkdir(parents=True)
    (junk / "big.bin").write_bytes(b"x" * 100_000)
    for uri in (str(junk), f"file://{junk}"):
        with pytest.raises(FileNotFoundError, match=r"not a model folder.*model\.json"):
            fetch_model_files(uri)
    assert _tree(tmpdir_only) == set()  # refused before anything was copied


def test_the_model_files_and_only_they_are_read(model_dir: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("model.json", "model.safetensors"):
        (mixed / name).write_bytes((model_dir / name).read_bytes())
    (mixed / "optim.pt").write_bytes(b"pickle would be here")
    files = fetch_model_files(mixed)
    assert sorted(files.files) == ["model.json", "model.safetensors"]
    assert files.onnx() is None


def test_a_model_over_the_size_cap_is_refused(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGERAY_MAX_MODEL_BYTES", "1000")
    with pytest.raises(ValueError, match="AGERAY_MAX_MODEL_BYTES"):
        fetch_model_files(model_dir)


def test_onnx_runtime_answers_without_building_the_torch_model(model_dir: Path) -> None:
    files = with_export(fetch_model_files(model_dir))
    ort = load_predictor(files, backend="onnxruntime", threads=1)
    ref = load_predictor(model_dir)
    assert ort.model is None and ref.model is not None
    assert ort.backend.name == "onnxruntime" and ort.backend.path is None  # from bytes


def test_loading_and_swapping_ten_models_leaves_the_temp_folder_as_it_was(
    model_dir: Path, tmp_path: Path, tmpdir_only: Path
) -> None:
    logged = tmp_path / "logged"
    logged.mkdir()
    for rel, data in with_export(fetch_model_files(model_dir)).files.items():
        (logged / rel).parent.mkdir(parents=True, exist_ok=True)
        (logged / rel).write_bytes(data)
    before = _tree(tmpdir_only)
    served = None
    for i in range(10):
        source = model_dir if i == 0 else logged  # the first one exports in scratch
        served = load_served_model(str(source), "cpu", backend="onnxruntime", threads=1)
        assert served.backend == "onnxruntime"
    assert served is not None
    # only this process's (empty) scratch folder may remain until exit
    left = _tree(tmpdir_only) - before
    assert left <= {f"{scratch_mod.PREFIX}{os.getpid()}"}, left


def test_a_dead_process_scratch_folder_is_reclaimed(tmpdir_only: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmpdir_only / f"{scratch_mod.PREFIX}{child.stdout.strip()}"
    (dead / "download-x").mkdir(parents=True)
    (dead / "download-x" / "model.onnx").write_bytes(b"x" * 1000)
    mine = scratch_mod.scratch_root()
    assert not dead.exists() and mine.is_dir()
