"""The served model: loading a registered version, warming it up, turning image bytes into
its input, the batched forward and the JSON answer for one image.

Why these rules: preprocessing is evaluation's (``decode_image`` at the model's input size,
then :func:`ageray.data.transforms.preprocess_for_eval` with the ``data`` section of the
model's ``model.json``; a model saved with ``"align": true`` first goes through the shard
writer's :class:`ageray.data.align.FaceAligner` path), and the forward is GLAE's test
protocol (``model.predict(x, flip=True, rule=...)``: image and flip in one pass, both heads
on one backbone pass, Adaptive Routing per image), so the endpoint answers exactly what
``jobs.evaluate`` measured.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ageray.serving.errors import ServeError
from ageray.serving.images import decode_checked
from ageray.serving.settings import Limits

__all__ = ["ModelInput", "ServedModel", "build_prediction", "load_served_model", "warmup"]


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
        """Encoded bytes -> (3, S, S) tensor exactly as evaluation turns a test image into
        the model's input."""
        from ageray.data.transforms import preprocess_for_eval

        t0 = time.perf_counter()
        img = decode_checked(data, name, limits, self.image_size)
        face = None
        if self.aligner is not None:
            img, face = self._align(data, img, name, limits)
        x = preprocess_for_eval([img], self.data_cfg)[0]
        return ModelInput(x, face, (time.perf_counter() - t0) * 1000.0)

    def _align(
        self, data: bytes, img: Image.Image, name: str, limits: Limits
    ) -> tuple[Image.Image, dict[str, Any]]:
        """The shard writer's path (``FaceAligner.align_bytes``: detect, align, JPEG
        re-encode), then evaluation's decoder on the crop."""
        del img  # validated above; the aligner decodes the original bytes itself
        crop, res = self.aligner.align_bytes(data)
        if crop is None:  # cannot happen with on_no_face="keep" (forced in _aligner_for)
            raise ServeError(422, "no_face", f"no face was found in image {name!r}; send a face")
        out = decode_checked(crop, name, limits, self.image_size)
        face = {
            "found": bool(res.found),
            "box": [round(float(v), 2) for v in res.box] if res.box is not None else None,
            "score": None if res.score is None else float(res.score),
            "detector": res.detector,
        }
        return out, face

    # ---------------------------------------------------------------- forward
    def forward(self, x: Any, rule: str | None = None) -> list[dict[str, Any]]:
        """(B, 3, S, S) -> one dict per image: age, head, heads{name: age, kl}, probs.

        ``model.predict(x, flip=True)`` is GLAE's protocol in one call: x and its flip in one
        batch through the backbone once, every head on the same features, AR per image.
        """
        import torch

        x = x.to(self.device, non_blocking=True)
        if rule is not None:
            from ageray.model.routing import check_servable

            check_servable(rule, "serving rule")
        pred = self.model.predict(x, flip=True, rule=rule)  # None: the model's own rule
        age = pred.age.float().cpu().tolist()
        head = pred.head.cpu().tolist()
        probs = pred.probs.float().cpu() if pred.probs is not None else None
        per_head: dict[str, tuple[list[float], list[float] | None]] = {}
        for hname, res in pred.heads.items():
            kl = res.get("kl")
            per_head[hname] = (
                res["age"].float().cpu().tolist(),
                kl.double().cpu().tolist() if isinstance(kl, torch.Tensor) else None,
            )
        out = []
        for i in range(len(age)):
            out.append(
                {
                    "age": float(age[i]),
                    "head": "balanced" if int(head[i]) == 1 else "vanilla",
                    "heads": {
                        n: {"age": float(a[i]), "kl": None if k is None else float(k[i])}
                        for n, (a, k) in per_head.items()
                    },
                    "probs": probs[i] if probs is not None else None,
                }
            )
        return out


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


def _aligner_for(info: dict[str, Any], image_size: int) -> Any | None:
    """The FaceAligner the shard writer used, when model.json says ``align: true``.

    ``model.json`` records only the flag; aligner settings are read from ``align_options``
    (top level or under ``meta``) when a training job stored them, else FaceAligner's
    defaults. ``on_no_face`` is forced to ``keep``: a request always gets an answer.
    """
    if not info.get("align"):
        return None
    from ageray.data.align import FaceAligner

    opts = dict(info.get("align_options") or (info.get("meta") or {}).get("align_options") or {})
    opts["on_no_face"] = "keep"
    return FaceAligner(**opts)


def load_served_model(
    uri: str,
    device: str = "auto",
    registry: Mapping[str, Any] | None = None,
    *,
    channels_last: bool = False,
) -> ServedModel:
    """Load ``models:/<name>@<alias>``, ``models:/<name>/<version>``, a ``runs:/`` URI or a
    local model folder for serving.

    For an alias the version is resolved first and exactly that version is downloaded, so
    the version reported with every answer is the one whose weights answer (an alias moved
    during the download cannot mix them up). Downloads go to a temporary folder that is
    removed once the weights are in memory.
    """
    from ageray.config import DataConfig
    from ageray.model import load_model
    from ageray.tracking import model_info, resolve_model_dir

    reg = dict(registry) if registry is not None else model_info(uri)
    fetch = uri
    if uri.startswith("models:/") and reg.get("name") and reg.get("version"):
        fetch = f"models:/{reg['name']}/{reg['version']}"
    dev = _resolve_device(device)
    tmp = None
    try:
        if "://" in fetch or ":/" in fetch:
            tmp = tempfile.mkdtemp(prefix="ageray-serve-")
            folder = resolve_model_dir(fetch, dst=tmp)
        else:
            folder = resolve_model_dir(fetch)
        model, info = load_model(folder, map_location=dev)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    if channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True  # AgeModel.forward then converts inputs too
    data = info.get("data") or {}
    defaults = DataConfig()
    size = int(data.get("image_size") or info.get("input_size") or defaults.image_size)
    # save_model(cfg=None) writes "normalize": null; the model was then built and evaluated
    # with the DataConfig default, which is what eval_config would fall back to as well.
    normalize = data.get("normalize") or defaults.normalize
    data_cfg = dataclasses.replace(defaults, image_size=size, normalize=normalize)
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
        aligner=_aligner_for(info, size),
        key=f"{reg.get('name')}/{reg.get('version')}|{uri}",
    )


def warmup(
    served: ServedModel, batch_sizes: Sequence[int] = (1,), rule: str | None = None
) -> float:
    """Run the forward once per batch size before the replica reports ready; returns ms.

    Why: the first forward allocates buffers and picks kernels (hundreds of ms on CPU, more
    with cuDNN autotuning); a user request must not pay that.
    """
    import torch

    t0 = time.perf_counter()
    s = served.image_size
    for b in batch_sizes:
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
    """One image's answer as JSON-ready dict.

    ``{"age", "head", "heads": {name: {"age", "kl"}}, "model": {...}, "timing_ms": {...}}``
    plus ``distribution`` (101 probabilities over ages 0..100) on request, ``face`` when
    detection ran, and ``batch_size`` (how many images shared the forward pass).
    """
    out: dict[str, Any] = {
        "age": float(result["age"]),
        "head": result["head"],
        "heads": {
            name: {"age": float(h["age"]), "kl": None if h["kl"] is None else float(h["kl"])}
            for name, h in result["heads"].items()
        },
        "model": served.model_ref(),
    }
    if distribution:
        probs = result.get("probs")
        out["distribution"] = None if probs is None else [float(p) for p in probs.tolist()]
    if face is not None:
        out["face"] = dict(face)
    if timing_ms is not None:
        out["timing_ms"] = {k: round(float(v), 3) for k, v in timing_ms.items()}
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out
