"""Export the whole routed model as one graph: ONNX (for ONNX Runtime, TensorRT, OpenVINO)
or TorchScript.

What is exported is :class:`ageray.inference.RoutedGraph`: the images and their flips in
one batch, the backbone once, both heads, the routing features and the model's routing rule
with its fitted parameters (a threshold's tau, a learned router's weights), the mixed
distribution and its answer. The batch axis is dynamic; the outputs carry the predictor's
names (``age``, ``head``, ``weight``, ``probs``, ``age_vanilla``, ``kl_vanilla``, ...), so
:class:`ageray.inference.OnnxBackend` and the answer rows work on them unchanged.

Why the checks:

* **portable operators** -- an export is only useful where it can run: every node's op type
  must be in :data:`PORTABLE_OPS`, operators that both TensorRT's ONNX parser and OpenVINO's
  ONNX frontend implement (no ``Col2Im``: unfold/fold are not used; FR's pixel shuffle is
  ``DepthToSpace``, which both accept), and no tensor may be float64 (TensorRT has none);
* **parity** -- the export must answer what PyTorch answers: every float output within
  ``tolerance`` (1e-4) of the eager predictor on the given images, at two batch sizes.

``export.json`` beside the file records the format, the rule, the input spec (size,
normalisation, alignment), the output names, the op types, the parity numbers and the sha256
of the ``model.safetensors`` it came from, so a loader can tell an export of other weights.
A TorchScript file is a zip whose ``data.pkl`` is pickle-format (read by TorchScript's own
restricted unpickler): it is logged to the run, never into the registered model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ageray.inference import InputSpec, OnnxBackend, RoutedGraph

__all__ = [
    "FORMATS",
    "PORTABLE_OPS",
    "check_ops",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "onnx_op_types",
    "parity",
]

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
EXPORT_INFO = "export.json"
TOLERANCE = 1e-4

#: ONNX operators that TensorRT's ONNX parser (onnx-tensorrt, TensorRT 10) and OpenVINO's ONNX
#: frontend both implement; an export with any other op type fails :func:`check_ops`.
PORTABLE_OPS = frozenset(
    {
        "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization",
        "Cast", "Ceil", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
        "ConvTranspose", "CumSum", "DepthToSpace", "Div", "Einsum", "Elu", "Equal", "Erf",
        "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "Gemm",
        "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "HardSigmoid",
        "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu",
        "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool", "Mean",
        "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu", "Range",
        "Reciprocal", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round",
        "Selu", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice", "Softmax", "Softplus",
        "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK",
        "Transpose", "Unsqueeze", "Where", "Xor",
    }
)  # fmt: skip

_DOUBLE = 11  # onnx.TensorProto.DOUBLE


@contextlib.contextmanager
def _quiet() -> Any:
    """Hide the exporters' expected warnings: TorchScript's deprecation notices and the
    tracer's notes on shape checks (the input size is fixed by design; the batch axis is
    what stays dynamic, and the parity check runs two batch sizes to prove it)."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        for lg in loggers:  # the ONNX optimiser logs every initializer it merges
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sample(spec: InputSpec, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)


def _spec(model: nn.Module, info: Mapping[str, Any] | None) -> InputSpec:
    if info:
        return InputSpec.from_info(info)
    size = int(getattr(model, "image_size", None) or 112)
    return InputSpec.from_info({"data": {"image_size": size}})


def _export_info(
    fmt: str,
    predictor: RoutedGraph,
    spec: InputSpec,
    info: Mapping[str, Any] | None,
    weights_sha256: str | None,
) -> dict[str, Any]:
    return {
        "format": fmt,
        "ageray_export": 1,
        "file": FILES[fmt],
        "rule": predictor.rule_name,
        "heads": predictor.head_names,
        "input": {
            "name": "image",
            "shape": ["batch", 3, spec.image_size, spec.image_size],
            "dtype": "float32",
            "image_size": spec.image_size,
            "normalize": spec.normalize,
            "align": spec.align,
        },
        "outputs": predictor.output_names,
        "model_format": (info or {}).get("format"),
        "weights_sha256": weights_sha256,
        "versions": {"torch": torch.__version__},
    }


# --------------------------------------------------------------------------- ONNX


def onnx_op_types(path: str | Path) -> list[str]:
    """Every op type in the graph (and its subgraphs and local functions), sorted."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            ops.add(node.op_type)
    return sorted(ops)


def _double_tensors(path: str | Path) -> list[str]:
    """Names of float64 initializers, graph inputs/outputs and Cast-to-double nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    found = [t.name for t in g.initializer if t.data_type == _DOUBLE]
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == _DOUBLE:
            found.append(v.name)
    for node in g.node:
        if node.op_type == "Cast" and any(
            a.name == "to" and a.i == _DOUBLE for a in node.attribute
        ):
            found.append(node.name or node.output[0])
    return found


def check_ops(path: str | Path) -> list[str]:
    """The graph's op types; raises ValueError naming any op outside :data:`PORTABLE_OPS`
    or any float64 tensor (an export TensorRT or OpenVINO would refuse)."""
    ops = onnx_op_types(path)
    bad = [op for op in ops if op not in PORTABLE_OPS]
    if bad:
        raise ValueError(
            f"{path}: operators {bad} are not accepted by both TensorRT and OpenVINO; "
            "rewrite the module that emits them with portable ops "
            "(ageray.inference.export.PORTABLE_OPS)"
        )
    doubles = _double_tensors(path)
    if doubles:
        raise ValueError(f"{path}: float64 tensors {doubles[:5]}: TensorRT has no float64")
    return ops


def _set_metadata(path: Path, meta: Mapping[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))  # the weights too, from torch's external-data file
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))  # one self-contained file (the models here are far < 2 GB)
    # torch.onnx (dynamo) wrote the weights beside the graph as model.onnx.data; the saved
    # file now holds them, so that copy is stale: as large as the model, never read, and
    # uploaded with every logged model
    (path.parent / f"{path.name}.data").unlink(missing_ok=True)


def export_onnx(
    model: nn.Module,
    folder: str | Path,
    *,
    info: Mapping[str, Any] | None = None,
    rule: str | None = None,
    images: torch.Tensor | None = None,
    check: bool = True,
    weights: str | Path | None = None,
    opset: int | None = None,
) -> dict[str, Any]:
    """Write ``folder/model.onnx`` + ``export.json``; returns the export info (with
    ``path``). ``images`` (B, 3, S, S) are the parity inputs (default: noise); ``check``
    runs the op check and the parity check (raising past :data:`TOLERANCE`); ``weights``
    is the ``model.safetensors`` the model came from (its sha256 is recorded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _spec(model, info)
    predictor = RoutedGraph(model, rule=rule).cpu()
    path = folder / FILES["onnx"]
    example = _sample(spec, 2)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    # torch.onnx prints its progress to stdout; the console is ageray's own.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), _quiet():
        torch.onnx.export(
            predictor,
            (example,),
            str(path),
            input_names=["image"],
            output_names=predictor.output_names,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            dynamo=True,
            optimize=True,
            verbose=False,
            **kwargs,
        )
    out = _export_info("onnx", predictor, spec, info, _sha256(Path(weights)) if weights else None)
    out["export_s"] = round(time.perf_counter() - t0, 2)
    _set_metadata(path, {"ageray.rule": predictor.rule_name, "ageray.export": json.dumps(out)})
    out["ops"] = check_ops(path) if check else onnx_op_types(path)
    if check:
        backend = OnnxBackend(path)
        out["parity"] = parity(predictor, backend, images if images is not None else example)
    out["path"] = str(path)
    (folder / EXPORT_INFO).write_text(json.dumps(_public(out), indent=2))
    return out


# --------------------------------------------------------------------------- TorchScript


class _TorchScriptBackend:
    """A loaded TorchScript export with the backend interface (parity checks, tests)."""

    def __init__(self, path: str | Path, output_names: Sequence[str]) -> None:
        with _quiet():
            self.module = torch.jit.load(str(path), map_location="cpu")
        self.output_names = list(output_names)

    def __call__(self, x: Any, rule: str | None = None) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.module(torch.as_tensor(x, dtype=torch.float32))
        return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, outs)}


def export_torchscript(
    model: nn.Module,
    folder: str | Path,
    *,
    info: Mapping[str, Any] | None = None,
    rule: str | None = None,
    images: torch.Tensor | None = None,
    check: bool = True,
    weights: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``folder/model.ts`` (``torch.jit.trace`` of the routed predictor; the export
    info also inside the file as ``ageray.json``) + ``export.json``; returns the info."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _spec(model, info)
    predictor = RoutedGraph(model, rule=rule).cpu()
    path = folder / FILES["torchscript"]
    example = _sample(spec, 3)
    t0 = time.perf_counter()
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(predictor, (example,), check_trace=False, strict=False)
    out = _export_info(
        "torchscript", predictor, spec, info, _sha256(Path(weights)) if weights else None
    )
    with _quiet():
        torch.jit.save(traced, str(path), _extra_files={"ageray.json": json.dumps(out)})
    out["export_s"] = round(time.perf_counter() - t0, 2)
    if check:
        backend = _TorchScriptBackend(path, predictor.output_names)
        out["parity"] = parity(predictor, backend, images if images is not None else example)
    out["path"] = str(path)
    (folder / EXPORT_INFO).write_text(json.dumps(_public(out), indent=2))
    return out


# --------------------------------------------------------------------------- shared


def export_model(
    model_dir: str | Path,
    folder: str | Path,
    *,
    fmt: str = "onnx",
    images: torch.Tensor | None = None,
    rule: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Export a saved model folder (``model.safetensors`` + ``model.json``)."""
    from ageray.model import load_model

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {list(FORMATS)}")
    model, info = load_model(model_dir)
    fn = export_onnx if fmt == "onnx" else export_torchscript
    weights = Path(model_dir) / "model.safetensors"
    return fn(model, folder, info=info, rule=rule, images=images, check=check, weights=weights)


def parity(
    predictor: RoutedGraph,
    backend: Any,
    images: torch.Tensor,
    *,
    tolerance: float = TOLERANCE,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Compare ``backend`` with the eager ``predictor`` on ``images``, run in chunks of
    each of ``batch_sizes`` (default 1, 7 and all: the dynamic batch axis): per output the
    largest absolute difference, and how many answering heads differ. Raises past
    ``tolerance``."""
    x = images.float().cpu()
    sizes = list(batch_sizes or sorted({1, min(7, len(x)), len(x)}))
    with torch.inference_mode():
        ref = {k: v.float().numpy() for k, v in predictor.named(x).items()}
    worst: dict[str, float] = {}
    head_flips = 0
    for size in sizes:
        parts = [backend(x[i : i + size]) for i in range(0, len(x), size)]
        got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for name, want in ref.items():
            if name == "head":
                head_flips = max(head_flips, int((got[name] != want).sum()))
                continue
            diff = float(np.max(np.abs(got[name].astype(np.float64) - want))) if want.size else 0
            worst[name] = max(worst.get(name, 0.0), diff)
    out = {
        "images": len(x),
        "batch_sizes": sizes,
        "max_abs_diff": worst,
        "head_mismatches": head_flips,
        "tolerance": tolerance,
    }
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        raise ValueError(f"export parity failed: {bad} exceed {tolerance} ({out})")
    return out


def _public(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "path"}
