"""The served model: loading a registered version, warming it up, turning image bytes into
its input, the batched forward and the JSON answer for one image.

Why these rules: every step is the one inference path's (:class:`ageray.inference.
ImagePredictor`): alignment as trained, the JPEG draft decode and evaluation's preprocessing
(:meth:`~ageray.inference.ImagePredictor.prepare`, with Serve's header check for pixel bombs
in front), GLAE's test protocol in one forward (image and flip, both heads, the model's
routing rule) and the answer row, so the endpoint answers exactly what ``jobs.evaluate``
measured and ``jobs.predict`` writes. ``backend`` picks who runs the forward: eager PyTorch
(``torch``, the default) or the ONNX export in ONNX Runtime (``onnxruntime``: the export
``jobs.export`` logged with the model, or one made when the replica loads it).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ageray.inference import HEADS, INTERVAL_LEVEL, ImagePredictor
from ageray.serving.images import decode_checked
from ageray.serving.settings import Limits

__all__ = [
    "ModelInput",
    "ServedModel",
    "batch_buckets",
    "build_prediction",
    "load_served_model",
    "warmup",
]


@dataclass
class ModelInput:
    """One image ready for the batched forward: a (3, S, S) tensor plus what was learnt on
    the way (the face box when detection is on) and how long decoding took."""

    tensor: Any
    face: dict[str, Any] | None
    decode_ms: float


@dataclass
class ServedModel:
    """A loaded model with everything serving needs next to it.

    Immutable once built: the replica swaps the whole object on reconfigure, so an in-flight
    batch keeps using the object (and weights) it started with.
    """

    model: Any  # ageray.model.AgeModel
    info: dict[str, Any]  # model.json
    registry: dict[str, Any]  # name, version, alias, run_id, metrics, uri
    data_cfg: Any  # ageray.config.DataConfig (image_size, normalize)
    device: Any  # torch.device
    aligner: Any | None = None  # ageray.data.align.FaceAligner when model.json says align
    loaded_at: float = field(default_factory=time.time)
    key: str = ""  # identity of the loaded weights (uri + version) for swap decisions
    path: ImagePredictor | None = None  # the one inference path (built in __post_init__)
    backend: str = "torch"  # torch | onnxruntime (who runs the forward)
    # Sizes a batch is padded up to before the forward (on a GPU; empty: no padding). cuDNN
    # picks kernels per input shape (benchmark mode): a handful of fixed shapes, each warmed
    # up at load, means no request pays an autotuning step.
    buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.path is None:
            from ageray.inference import InputSpec, TorchBackend

            spec = InputSpec.from_info(self.info)
            self.path = ImagePredictor(
                backend=TorchBackend(self.model, device=self.device),
                spec=spec,
                info=self.info,
                aligner=self.aligner,
                model=self.model,
            )

    @property
    def image_size(self) -> int:
        return int(self.data_cfg.image_size)

    @property
    def head_names(self) -> list[str]:
        return list(self.model.head_names)

    def model_ref(self) -> dict[str, Any]:
        """The short model reference every prediction carries."""
        r = self.registry
        return {
            "name": r.get("name"),
            "version": r.get("version"),
            "alias": r.get("alias"),
            "uri": r.get("uri"),
        }

    def describe(self) -> dict[str, Any]:
        """``GET /v1/model``: registry facts, the metrics it was registered with, config."""
        return {
            **self.model_ref(),
            "run_id": self.registry.get("run_id"),
            "aliases": self.registry.get("aliases", []),
            "metrics": self.registry.get("metrics", {}),
            "config": {
                "model": self.info.get("model"),
                "data": {
                    "image_size": self.data_cfg.image_size,
                    "normalize": self.data_cfg.normalize,
                },
                "align": bool(self.info.get("align", False)),
                "heads": self.head_names,
                "routing": self.model.routing_info(),  # rule served, fitted rules, fit reports
                "format": self.info.get("format"),
            },
            "meta": self.info.get("meta", {}),
            "device": str(self.device),
            "loaded_at": self.loaded_at,
        }

    # ---------------------------------------------------------------- preprocessing
    def model_input(self, data: bytes, name: str, limits: Limits) -> ModelInput:
        """Encoded bytes -> (3, S, S) tensor by the one path's ``prepare`` (alignment as
        trained, draft decode, evaluation's preprocessing), with Serve's header check and
        error codes in its decoder."""

        def decode(raw: bytes, what: str, size: int) -> Image.Image:
            return decode_checked(raw, what, limits, size)

        prep = self.path.prepare(data, name, decode=decode)  # type: ignore[union-attr]
        return ModelInput(prep.tensor, prep.face, prep.decode_ms)

    # ---------------------------------------------------------------- forward
    def forward(self, x: Any, rule: str | None = None) -> list[dict[str, Any]]:
        """(B, 3, S, S) -> one answer row per image (``ageray.inference.answers``: age,
        interval, head, each head's age and KL, ...), with its ``distribution``.

        The backend runs GLAE's protocol in one call: x and its flip in one batch through
        the backbone once, every head on the same features, the routing rule per image.
        """
        if rule is not None:
            from ageray.model.routing import check_servable

            check_servable(rule, "serving rule")
        path = self.path
        n = int(x.shape[0])
        size = padded_size(n, self.buckets)
        if size > n:  # zero images fill the bucket; their rows are dropped below
            x = torch_cat_zeros(x, size - n)
        outputs = path.forward(x, rule)  # type: ignore[union-attr]
        return path.rows(outputs, rule=rule, distribution=True)[:n]  # type: ignore[union-attr]


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU replica runs: powers of two below ``max_batch_size``, and
    ``max_batch_size`` itself (1, 2, 4, 8, 16, 32 for 32; 1, 2, 4, 8, 16, 32, 48 for 48)."""
    top = max(1, int(max_batch_size))
    sizes = [1 << i for i in range(top.bit_length()) if (1 << i) < top]
    return (*sizes, top)


def padded_size(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images; ``n`` itself when none does (a batch
    larger than every bucket runs as it is) or there are no buckets."""
    return min((b for b in buckets if b >= n), default=n)


def torch_cat_zeros(x: Any, extra: int) -> Any:
    import torch

    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


def _resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"serving device={device!r} but CUDA is not available in this replica; give the "
            "deployment num_gpus (ray_actor_options) or set device: cpu"
        )
    return dev


def load_served_model(
    uri: str,
    device: str = "auto",
    registry: Mapping[str, Any] | None = None,
    *,
    channels_last: bool = False,
    backend: str = "torch",
    threads: int | None = None,
    max_batch_size: int | None = None,
) -> ServedModel:
    """Load ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a ``runs:/`` URI or a
    local model folder for serving.

    For an alias the version is resolved first and exactly that version is downloaded, so
    the version reported with every answer is the one whose weights answer (an alias moved
    during the download cannot mix them up). Downloads go to a temporary folder that is
    removed once the weights are in memory. ``backend="auto"`` is ``onnxruntime`` on a CPU
    and ``torch`` on a GPU. ``backend="onnxruntime"`` answers with ONNX
    Runtime on ``threads`` intra-op threads (CPU only), from the ONNX export logged with
    the model (``jobs.export``) when it matches these weights, else from an export made
    now (:func:`ageray.export.ensure_onnx`: op and parity checks as ``jobs.export``).
    On a GPU with ``max_batch_size`` batches are padded to :func:`batch_buckets` (bf16
    autocast comes with the torch backend on CUDA, as ``train.amp=auto``).
    """
    from ageray.inference import InputSpec, make_aligner, make_backend
    from ageray.model import load_model
    from ageray.tracking import model_info, resolve_model_dir

    reg = dict(registry) if registry is not None else model_info(uri)
    fetch = uri
    if uri.startswith("models:/") and reg.get("name") and reg.get("version"):
        fetch = f"models:/{reg['name']}/{reg['version']}"
    if backend == "auto":  # the faster on this device (benchmarks/RESULTS.md, serve_backends)
        backend = "onnxruntime" if _resolve_device(device).type == "cpu" else "torch"
    if backend == "onnxruntime":
        if device not in ("auto", "cpu"):
            raise ValueError(
                f"serving backend onnxruntime runs on the CPU, but device={device!r}; set "
                "device: cpu (or auto), or backend: torch for a GPU replica"
            )
        device = "cpu"
    dev = _resolve_device(device)
    tmp = None
    try:
        if "://" in fetch or ":/" in fetch:
            tmp = tempfile.mkdtemp(prefix="ageray-serve-")
            folder = resolve_model_dir(fetch, dst=tmp)
        else:
            folder = resolve_model_dir(fetch)
        model, info = load_model(folder, map_location=dev)
        onnx_path = None
        if backend == "onnxruntime":  # the export logged with these weights, else one now
            from ageray.export import ensure_onnx

            onnx_path = ensure_onnx(folder, tempfile.mkdtemp(prefix="ageray-serve-onnx-"))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    if channels_last and backend == "torch":
        import torch

        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True  # AgeModel.forward then converts inputs too
    spec = InputSpec.from_info(info)
    # save_model(cfg=None) writes "normalize": null; the model was then built and evaluated
    # with the DataConfig default, which is what InputSpec falls back to as well.
    data_cfg = spec.data_config()
    aligner = make_aligner(spec)
    path = ImagePredictor(
        backend=make_backend(model, backend, device=str(dev), onnx_path=onnx_path, threads=threads),
        spec=spec,
        info=dict(info),
        aligner=aligner,
        model=model,
    )
    reg.setdefault("uri", uri)
    if "name" not in reg:
        reg["name"] = (info.get("meta") or {}).get("name") or Path(str(folder)).name
        reg.setdefault("version", None)
        reg.setdefault("alias", None)
    return ServedModel(
        model=model,
        info=info,
        registry=reg,
        data_cfg=data_cfg,
        device=dev,
        aligner=aligner,
        key=f"{reg.get('name')}/{reg.get('version')}|{uri}|{backend}",
        path=path,
        backend=backend,
        buckets=batch_buckets(max_batch_size) if dev.type == "cuda" and max_batch_size else (),
    )


def warmup(
    served: ServedModel, batch_sizes: Sequence[int] = (1,), rule: str | None = None
) -> float:
    """Run the forward once per batch size (and per GPU bucket) before the replica reports
    ready; returns ms.

    Why: the first forward allocates buffers and picks kernels (hundreds of ms on CPU, more
    with cuDNN autotuning); a user request must not pay that.
    """
    import torch

    t0 = time.perf_counter()
    s = served.image_size
    for b in sorted({*batch_sizes, *served.buckets}):
        x = torch.zeros(max(1, int(b)), 3, s, s)
        served.forward(x, rule)
        if served.device.type == "cuda":
            torch.cuda.synchronize(served.device)
    if served.aligner is not None:  # build the detector now, not on the first request
        served.aligner.align(Image.new("RGB", (s, s), (128, 128, 128)))
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------- responses


def build_prediction(
    result: Mapping[str, Any],
    served: ServedModel,
    *,
    distribution: bool = False,
    face: Mapping[str, Any] | None = None,
    timing_ms: Mapping[str, float] | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One image's answer row (``ServedModel.forward``) as a JSON-ready dict.

    ``{"age", "head", "heads": {name: {"age", "kl"}}, "interval": {"level", "low", "high"},
    "rule", "model": {...}, "timing_ms": {...}}`` plus ``distribution`` (101 probabilities
    over ages 0..100) on request, ``gender`` / ``race`` (``{"label", "index", "probs"}``)
    for multi-task models, ``face`` when detection ran, and ``batch_size`` (how many images
    shared the forward pass).
    """

    def num(v: Any) -> float | None:
        return None if v is None else float(v)

    out: dict[str, Any] = {
        "age": float(result["age"]),
        "head": result["head"],
        "heads": {
            name: {"age": num(result.get(f"age_{name}")), "kl": num(result.get(f"kl_{name}"))}
            for name in HEADS
            if result.get(f"age_{name}") is not None
        },
        "interval": None
        if result.get("age_low") is None
        else {
            "level": INTERVAL_LEVEL,
            "low": float(result["age_low"]),
            "high": float(result["age_high"]),
        },
        "rule": result.get("rule"),
        "model": served.model_ref(),
    }
    for group in ("gender", "race"):
        if result.get(group) is not None:
            out[group] = {
                "label": result.get(f"{group}_label"),
                "index": int(result[group]),
                "probs": list(result[f"{group}_probs"]),
            }
    if distribution:
        probs = result.get("distribution")
        out["distribution"] = None if probs is None else [float(p) for p in probs.tolist()]
    if face is not None:
        out["face"] = dict(face)
    if timing_ms is not None:
        out["timing_ms"] = {k: round(float(v), 3) for k, v in timing_ms.items()}
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out
