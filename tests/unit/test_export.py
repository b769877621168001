"""Exports of the whole routed model (image + flip, both heads, a fitted learned router):
ONNX run in ONNX Runtime at batch sizes 1 and 7, TorchScript, parity with PyTorch within
1e-4 on real faces (synthetic when ../shared/data is absent), only operators TensorRT and
OpenVINO accept, and the onnxruntime backend of the one path and of Serve."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from faces import face_records, make_routed_model

from ageray.inference import OnnxBackend, TorchBackend, fetch_model_files, load_predictor
from ageray.inference.export import PORTABLE_OPS, check_ops, export_model

TOL = 1e-4


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    folder = make_routed_model(root / "model", rule="learned")
    path = load_predictor(folder)
    records, origin = face_records(9, seed=5)
    x = torch.stack([path.prepare(r.image, r.key).tensor for r in records])
    onnx = export_model(folder, root / "onnx", fmt="onnx", images=x)
    return SimpleNamespace(root=root, folder=folder, path=path, x=x, onnx=onnx, origin=origin)


def _close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, ref in want.items():
        if name == "head":
            np.testing.assert_array_equal(got[name], ref)
        else:
            np.testing.assert_allclose(got[name], ref, atol=TOL, rtol=0, err_msg=name)


def test_onnx_runs_in_onnxruntime_at_batch_1_and_7(routed) -> None:
    info = routed.onnx
    assert info["rule"] == "learned" and info["parity"]["head_mismatches"] == 0
    assert max(info["parity"]["max_abs_diff"].values()) <= TOL
    assert set(info["parity"]["batch_sizes"]) >= {1, 7}
    ort = OnnxBackend(info["path"])
    assert ort.rule == "learned" and ort.input_name == "image"
    torch_backend = TorchBackend(routed.path.model)
    for batch in (1, 7):
        x = routed.x[:batch]
        got = ort(x)
        assert got["age"].shape == (batch,) and got["probs"].shape == (batch, 101)
        _close(got, torch_backend(x))
    with pytest.raises(ValueError, match="routes with 'learned'"):
        ort(routed.x[:1], rule="smaller")
    # one self-contained file: no stale copy of the weights beside it
    assert sorted(p.name for p in Path(info["path"]).parent.iterdir()) == [
        "export.json",
        "model.onnx",
    ]


def test_onnx_operators_are_portable(routed) -> None:
    ops = routed.onnx["ops"]
    assert set(ops) <= PORTABLE_OPS
    assert "Col2Im" not in ops and "DepthToSpace" in ops  # FR's pixel shuffle
    assert check_ops(routed.onnx["path"]) == ops


def test_check_ops_refuses_col2im_and_float64(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    def save(nodes, inits, name, dtype=TensorProto.FLOAT) -> Path:
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", dtype, [1, 4, 2])],
            [helper.make_tensor_value_info("y", dtype, None)],
            initializer=inits,
        )
        path = tmp_path / name
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        return path

    col2im = helper.make_node("Col2Im", ["x", "shape", "block"], ["y"])
    inits = [
        helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2]),
        helper.make_tensor("block", TensorProto.INT64, [2], [1, 1]),
    ]
    with pytest.raises(ValueError, match=r"\['Col2Im'\].*TensorRT and OpenVINO"):
        check_ops(save([col2im], inits, "col2im.onnx"))
    double = helper.make_node("Identity", ["x"], ["y"])
    with pytest.raises(ValueError, match="float64"):
        check_ops(save([double], [], "double.onnx", TensorProto.DOUBLE))
    assert check_ops(save([double], [], "fine.onnx")) == ["Identity"]


def test_export_records_the_weights_and_is_found_only_for_them(routed, tmp_path: Path) -> None:
    meta = json.loads((Path(routed.onnx["path"]).parent / "export.json").read_text())
    weights = (routed.folder / "model.safetensors").read_bytes()
    assert meta["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["input"]["image_size"] == 64 and meta["outputs"][0] == "age"
    copy = tmp_path / "model"
    shutil.copytree(routed.folder, copy)
    assert fetch_model_files(copy).onnx() is None
    shutil.copytree(Path(routed.onnx["path"]).parent, copy / "export" / "onnx")
    graph = (copy / "export" / "onnx" / "model.onnx").read_bytes()
    assert fetch_model_files(copy).onnx() == graph
    (copy / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    assert fetch_model_files(copy).onnx() is None  # other weights: the export is not theirs


def test_onnxruntime_backend_answers_like_torch(routed, tmp_path: Path) -> None:
    """The one path and Serve's model with backend onnxruntime (the export found beside the
    weights, as jobs.export logs it) give the torch rows within the parity tolerance."""
    from ageray.serving import Limits, load_served_model

    model_dir = tmp_path / "model"
    shutil.copytree(routed.folder, model_dir)
    shutil.copytree(Path(routed.onnx["path"]).parent, model_dir / "export" / "onnx")
    faces, _ = face_records(4, seed=5)
    images = [r.image for r in faces]
    ref = load_predictor(model_dir).predict(images)
    ort = load_predictor(model_dir, backend="onnxruntime", threads=1)
    for a, b in zip(ort.predict(images), ref):
        assert a["head"] == b["head"] and a["rule"] == b["rule"] == "learned"
        for k in ("age", "age_low", "age_high", "age_vanilla", "kl_balanced"):
            assert a[k] == pytest.approx(b[k], abs=TOL)
    served = load_served_model(str(model_dir), "cpu", backend="onnxruntime", threads=1)
    assert served.backend == "onnxruntime"
    x = torch.stack([served.model_input(d, "x", Limits()).tensor for d in images])
    for a, b in zip(served.forward(x), ref):
        assert a["age"] == pytest.approx(b["age"], abs=TOL) and a["head"] == b["head"]
    with pytest.raises(ValueError, match="onnxruntime runs on the CPU"):
        load_served_model(str(model_dir), "cuda:0", backend="onnxruntime")


def test_torchscript_export_matches(routed) -> None:
    info = export_model(routed.folder, routed.root / "ts", fmt="torchscript", images=routed.x)
    assert info["rule"] == "learned" and max(info["parity"]["max_abs_diff"].values()) <= TOL
    with zipfile.ZipFile(info["path"]) as z:  # a pickle-format zip: never in the registry
        assert any(n.endswith("data.pkl") for n in z.namelist())
        assert "ageray.json" in {n.rsplit("/", 1)[-1] for n in z.namelist()}
    module = torch.jit.load(info["path"])
    want = TorchBackend(routed.path.model)
    for batch in (1, 7):
        with torch.inference_mode():
            outs = module(routed.x[:batch])
        got = {n: t.numpy() for n, t in zip(info["outputs"], outs)}
        _close(got, want(routed.x[:batch]))
