"""The one model loader: any model reference -> the one predictor.

    predictor = load_predictor("models:/ageray@champion", backend="auto", device="auto")
    rows = predictor.predict([jpeg_bytes])

Serve, ``jobs.predict`` (driver and actors), the pyfunc model, ``ageray predict`` and the
benchmarks all load through here, so a model is found, checked and built one way:

1. :func:`fetch_model_files` reads the model's files into memory, and only those
   (``model.json``, ``model.safetensors`` and a logged ONNX export): from a local folder (or
   ``file://``), ``s3://bucket/prefix`` through the shards' storage layer, or an MLflow URI
   (``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/...``). An alias is
   resolved to its version first and exactly that version is downloaded, so the version a
   caller reports is the one whose weights answer. Anything that is not a model folder is
   refused before a byte is copied, and a model over ``max_bytes`` is refused by size.
   Downloads go to this process's scratch folder (:mod:`.scratch`) and are removed at once.
2. :func:`load_predictor` builds the backend from those bytes: PyTorch weights, or, for
   ``onnxruntime``, the ONNX session straight from the export's bytes (no file left on disk;
   the PyTorch model is not built at all when a matching export came with the model).

Why bytes in memory: actors on other nodes get the files shipped once by the driver (they
need neither the registry nor the driver's disk), and a process that swaps models keeps no
downloads around.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .predictor import ImagePredictor

__all__ = [
    "EXPORT_FILES",
    "MODEL_FILES",
    "ModelFiles",
    "fetch_model_files",
    "load_predictor",
    "resolve_backend",
    "resolve_model_dir",
    "with_export",
]

MODEL_FILES = ("model.json", "model.safetensors")
EXPORT_FILES = ("export/onnx/model.onnx", "export/onnx/export.json")
MAX_BYTES_ENV = "AGERAY_MAX_MODEL_BYTES"
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB: an EfficientNetV2-L with both heads is ~0.5 GiB


def _max_bytes(max_bytes: int | None) -> int:
    return int(max_bytes or os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES)


@dataclass
class ModelFiles:
    """A model's files as bytes (``{relative path: bytes}``), where they came from and, for
    a registry URI, the registry's facts (name, version, alias, run id, metrics)."""

    files: dict[str, bytes]
    uri: str = ""
    registry: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> dict[str, Any]:
        from ageray.model.io import MODEL_FORMAT as FORMAT

        info = json.loads(self.files["model.json"])
        if info.get("format") != FORMAT:
            raise ValueError(
                f"{self.uri or 'model'}: model.json format {info.get('format')!r} is not "
                f"{FORMAT!r}; this ageray reads {FORMAT} folders only"
            )
        return info

    def onnx(self) -> bytes | None:
        """The ONNX export of exactly these weights, or None (an export whose recorded
        ``weights_sha256`` differs from ``model.safetensors`` is ignored)."""
        graph, meta = (self.files.get(name) for name in EXPORT_FILES)
        if graph is None or meta is None:
            return None
        recorded = json.loads(meta).get("weights_sha256")
        return (
            graph
            if recorded == hashlib.sha256(self.files["model.safetensors"]).hexdigest()
            else None
        )


# --------------------------------------------------------------------------- fetching


def _refuse_folder(where: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{where!r} is not a model folder: it must hold {' and '.join(MODEL_FILES)} (written "
        "by ageray.model.save_model, registered by jobs.train); give a model folder or an "
        "MLflow URI like models:/ageray@candidate"
    )


def _model_folder(path: Path) -> Path:
    for cand in (path, path / "artifacts" / "model", path / "model"):
        if all((cand / name).is_file() for name in MODEL_FILES):
            return cand
    raise _refuse_folder(str(path))


def _read_folder(folder: Path, max_bytes: int, where: str) -> dict[str, bytes]:
    """Only the model's own files, their total size checked before any is read."""
    names = [n for n in (*MODEL_FILES, *EXPORT_FILES) if (folder / n).is_file()]
    size = sum((folder / n).stat().st_size for n in names)
    if size > max_bytes:
        raise ValueError(
            f"model {where!r} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB "
            f"cap; raise {MAX_BYTES_ENV} if this is really the model"
        )
    return {n: (folder / n).read_bytes() for n in names}


def _read_s3(url: str, max_bytes: int) -> dict[str, bytes]:
    from ageray.data import storage

    base = url.rstrip("/")
    if not all(storage.exists(f"{base}/{n}") for n in MODEL_FILES):
        raise _refuse_folder(url)
    files = {}
    for name in (*MODEL_FILES, *EXPORT_FILES):
        if name in MODEL_FILES or storage.exists(f"{base}/{name}"):
            files[name] = storage.read_bytes(f"{base}/{name}")
    if sum(map(len, files.values())) > max_bytes:
        raise ValueError(f"model {url!r} is over the {max_bytes} byte cap ({MAX_BYTES_ENV})")
    return files


def resolve_registry(uri: str) -> tuple[str, dict[str, Any]]:
    """``(what to download, registry facts)``: an alias is pinned to its version now."""
    from ageray.tracking import model_info

    reg = model_info(uri)
    if uri.startswith("models:/") and reg.get("name") and reg.get("version"):
        return f"models:/{reg['name']}/{reg['version']}", reg
    return uri, reg


def _download(uri: str, dst: Path) -> Path:
    """An MLflow artifact URI downloaded into ``dst``; the model folder inside it."""
    import mlflow

    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    try:
        return _model_folder(path)
    except FileNotFoundError:
        found = sorted(path.rglob("model.safetensors"))
        if not found:
            raise _refuse_folder(uri) from None
        return _model_folder(found[0].parent)


def _read_mlflow(uri: str, max_bytes: int) -> dict[str, bytes]:
    from .scratch import scratch_use

    with scratch_use("download") as tmp:
        return _read_folder(_download(uri, tmp), max_bytes, uri)


def resolve_model_dir(uri: str, dst: str | Path | None = None) -> Path:
    """A model FOLDER for any reference, for the callers that need files on disk (training
    from a model, evaluation, ``jobs.export``): a local folder as it is, an MLflow URI
    downloaded into ``dst`` (default: a folder in this process's scratch, removed at exit).
    Answering images goes through :func:`load_predictor`, which keeps no files."""
    if "://" not in uri and ":/" not in uri:
        return _model_folder(Path(uri))
    import tempfile

    from .scratch import scratch_root

    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="model-", dir=scratch_root()))
    return _download(uri, target)


def fetch_model_files(
    source: str | Path | Mapping[str, bytes] | ModelFiles,
    *,
    registry: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
) -> ModelFiles:
    """The model's files for any reference (module docstring). ``registry``: facts already
    looked up (Serve resolves an alias once per swap decision); else looked up here."""
    if isinstance(source, ModelFiles):
        return source
    if isinstance(source, Mapping):
        return ModelFiles(dict(source), uri="<files>", registry=dict(registry or {}))
    cap = _max_bytes(max_bytes)
    uri = str(source)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if uri.startswith("s3://"):
        return ModelFiles(_read_s3(uri, cap), uri=uri, registry=dict(registry or {"uri": uri}))
    if "://" not in uri and ":/" not in uri:
        folder = _model_folder(Path(uri))
        files = _read_folder(folder, cap, uri)
        return ModelFiles(files, uri=uri, registry=dict(registry or {"uri": uri}))
    if registry is not None:
        reg = dict(registry)
        fetch = uri
        if uri.startswith("models:/") and reg.get("name") and reg.get("version"):
            fetch = f"models:/{reg['name']}/{reg['version']}"
    else:
        fetch, reg = resolve_registry(uri)
    return ModelFiles(_read_mlflow(fetch, cap), uri=uri, registry=reg)


# --------------------------------------------------------------------------- building


def resolve_backend(backend: str, device: str) -> tuple[str, Any]:
    """``(backend, torch.device)``. ``auto`` device: CUDA when there is one. ``auto``
    backend: ONNX Runtime on a CPU, PyTorch on a GPU (the faster on each, measured in
    benchmarks/RESULTS.md, serve_backends). ONNX Runtime runs on the CPU only here."""
    import torch

    from .backends import BACKENDS

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend={backend!r} is not one of {['auto', *BACKENDS]}")
    if backend == "onnxruntime" and device not in ("auto", "cpu"):
        raise ValueError(
            f"backend onnxruntime runs on the CPU, but device={device!r}; use device cpu (or "
            "auto), or backend torch for a GPU"
        )
    if device == "auto":
        use_cuda = backend != "onnxruntime" and torch.cuda.is_available()
        dev = torch.device("cuda" if use_cuda else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} but CUDA is not available in this process; give it a GPU "
                "(Serve: ray_actor_options num_gpus) or use device cpu"
            )
    if backend == "auto":
        backend = "onnxruntime" if dev.type == "cpu" else "torch"
    return backend, dev


def _torch_model(files: ModelFiles, device: Any) -> Any:
    from safetensors.torch import load as load_safetensors

    from ageray.model.io import model_from_state

    state = load_safetensors(files.files["model.safetensors"])
    return model_from_state(files.info, state, map_location=device, source=files.uri)


def with_export(files: ModelFiles) -> ModelFiles:
    """``files`` with an ONNX export of exactly these weights: the one that came with them,
    else one made now (jobs.export's op and parity checks) in scratch, kept as bytes, nothing
    left on disk. ``jobs.predict`` calls it once on the driver, so actors never export."""
    if files.onnx() is not None:
        return files
    from .export import EXPORT_INFO, export_model
    from .scratch import scratch_use

    with scratch_use("export") as tmp:
        folder = tmp / "model"
        folder.mkdir()
        for name in MODEL_FILES:
            (folder / name).write_bytes(files.files[name])
        graph = Path(export_model(folder, tmp / "onnx", fmt="onnx")["path"])
        made = {
            EXPORT_FILES[0]: graph.read_bytes(),
            EXPORT_FILES[1]: (graph.parent / EXPORT_INFO).read_bytes(),
        }
    return ModelFiles({**files.files, **made}, uri=files.uri, registry=files.registry)


def load_predictor(
    source: str | Path | Mapping[str, bytes] | ModelFiles,
    *,
    backend: str = "torch",
    device: str = "cpu",
    align: bool | str = "auto",
    flip: bool = True,
    threads: int | None = None,
    channels_last: bool = False,
    registry: Mapping[str, Any] | None = None,
) -> ImagePredictor:
    """The one predictor for ``source`` (any reference :func:`fetch_model_files` takes).

    ``backend``: ``torch``, ``onnxruntime`` (the export that came with these weights, else
    one made now) or ``auto``; ``device``: ``cpu``, ``cuda`` or ``auto``; ``align``:
    ``"auto"`` = as the model was trained; ``threads``: intra-op threads (ONNX Runtime);
    ``channels_last``: the torch model's memory format (a GPU replica's choice).
    """
    from .backends import OnnxBackend, TorchBackend
    from .inputs import InputSpec, make_aligner

    clock = _PhaseClock()
    files = fetch_model_files(source, registry=registry)
    clock.mark("fetch")
    backend, dev = resolve_backend(backend, device)
    info = files.info
    spec = InputSpec.from_info(info)
    clock.mark("device")  # torch's import and the CUDA probe, when not yet done
    model = None
    if backend == "onnxruntime":
        if not flip:
            raise ValueError("backend onnxruntime runs the exported graph, which always flips")
        graph = with_export(files).onnx()
        clock.mark("export")  # ~0 when the export came with the weights
        runner: Any = OnnxBackend(graph, threads=threads)
        clock.mark("session")
    else:
        model = _torch_model(files, dev)
        clock.mark("torch_model")
        if channels_last:
            import torch

            model = model.to(memory_format=torch.channels_last)
            model.channels_last = True  # AgeModel.forward then converts inputs too
        runner = TorchBackend(model, flip=flip, device=dev)
    aligner = make_aligner(spec, align)
    clock.mark("aligner")
    return ImagePredictor(
        backend=runner,
        spec=spec,
        info=dict(info),
        aligner=aligner,
        model=model,
        source=files.uri,
        registry=dict(files.registry),
        load_ms=clock.phases,
    )


class _PhaseClock:
    """Milliseconds per loading phase, in order (fetch, device, export, session or
    torch_model, aligner): a cold start's figure split where it can be acted on."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = self._now()
        self.phases[name] = round((now - self._last) * 1000.0, 1)
        self._last = now
