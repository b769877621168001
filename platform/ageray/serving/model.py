"""The served model: the one predictor plus the registry facts every answer names, its
warm-up, turning image bytes into its input, the batched forward and the JSON answer.

Why these rules: every step is the one inference path's (:class:`ageray.inference.
ImagePredictor`, loaded by :func:`ageray.inference.load_predictor`): alignment as trained,
the JPEG draft decode and evaluation's preprocessing (:meth:`~ageray.inference.
ImagePredictor.prepare`, with Serve's header check for pixel bombs in front), GLAE's test
protocol in one forward (image and flip, both heads, the model's routing rule) and the
answer row, so the endpoint answers exactly what ``jobs.evaluate`` measured and
``jobs.predict`` writes. ``backend`` picks who runs the forward: eager PyTorch (``torch``)
or the ONNX export in ONNX Runtime (``onnxruntime``: the export ``jobs.export`` logged with
the model, or one made when the replica loads it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ageray.inference import ImagePredictor, Prepared, PreparedImage, flat_json, image_json
from ageray.inference.answers import face_columns
from ageray.serving.images import decode_checked
from ageray.serving.settings import Limits

__all__ = [
    "ServedModel",
    "batch_buckets",
    "build_answers",
    "build_faces_answer",
    "build_prediction",
    "load_served_model",
    "warmup",
]


@dataclass
class ServedModel:
    """The one predictor (:func:`ageray.inference.load_predictor`) with what serving keeps
    next to it: the registry facts every answer names, when it loaded, the identity used for
    swap decisions and the GPU batch buckets.

    Immutable once built: the replica swaps the whole object on reconfigure, so an in-flight
    batch keeps using the object (and weights) it started with.
    """

    predictor: ImagePredictor
    registry: dict[str, Any]  # name, version, alias, run_id, metrics, uri
    loaded_at: float = field(default_factory=time.time)
    key: str = ""  # identity of the loaded weights (uri + version + backend)
    # Sizes a batch is padded up to before the forward (on a GPU; empty: no padding). cuDNN
    # picks kernels per input shape (benchmark mode): a handful of fixed shapes, each warmed
    # up at load, means no request pays an autotuning step.
    buckets: tuple[int, ...] = ()
    warmup_ms: float | None = None  # set by the replica once warm (``warmup``)

    @property
    def info(self) -> dict[str, Any]:
        return self.predictor.info

    @property
    def image_size(self) -> int:
        return int(self.predictor.spec.image_size)

    @property
    def head_names(self) -> list[str]:
        return list(self.info.get("heads") or ["vanilla"])

    @property
    def backend(self) -> str:
        return str(self.predictor.backend.name)

    @property
    def device(self) -> Any:
        import torch

        return getattr(self.predictor.backend, "device", None) or torch.device("cpu")

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
        spec = self.predictor.spec
        return {
            **self.model_ref(),
            "run_id": self.registry.get("run_id"),
            "aliases": self.registry.get("aliases", []),
            "metrics": self.registry.get("metrics", {}),
            "config": {
                "model": self.info.get("model"),
                "data": {"image_size": spec.image_size, "normalize": spec.normalize},
                "align": bool(self.info.get("align", False)),
                "heads": self.head_names,
                # rule served, fitted rules, fit reports (model.json: no weights needed)
                "routing": self.info.get("routing") or {"rule": "smaller", "rules": {}},
                "format": self.info.get("format"),
            },
            "meta": self.info.get("meta", {}),
            "device": str(self.device),
            "backend": self.backend,
            "loaded_at": self.loaded_at,
            # where this replica's start went (ms): the loader's phases and the warm-up
            "load_ms": {**self.predictor.load_ms, "warmup": self.warmup_ms},
        }

    # ---------------------------------------------------------------- preprocessing
    def model_input(self, data: bytes, name: str, limits: Limits) -> Prepared:
        """Encoded bytes -> (3, S, S) tensor by the one path's ``prepare`` (alignment as
        trained, draft decode, evaluation's preprocessing), with Serve's header check and
        error codes in its decoder."""
        return self.predictor.prepare(data, name, decode=_checked_decoder(limits))

    def model_faces(
        self, data: bytes, name: str, limits: Limits, faces: str = "all"
    ) -> PreparedImage:
        """Encoded bytes -> a (3, S, S) tensor per face (``faces="all"``: every detected
        face, cropped as the one path crops it) or the one image's (``"largest"``: exactly
        :meth:`model_input`), by the one path's ``prepare_faces`` with Serve's decoder."""
        return self.predictor.prepare_faces(
            data, name, faces=faces, decode=_checked_decoder(limits)
        )

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
        n = int(x.shape[0])
        size = padded_size(n, self.buckets)
        if size > n:  # zero images fill the bucket; their rows are dropped below
            x = torch_cat_zeros(x, size - n)
        # The backend directly (ImagePredictor.forward is this same call): a request crosses
        # three layers to the model, ServedModel -> backend -> RoutedGraph (PyTorch) or the
        # ONNX Runtime session, and changes form twice: named arrays -> rows -> JSON.
        outputs = self.predictor.backend(x, rule)
        return self.predictor.rows(outputs, rule=rule, distribution=True)[:n]


def _checked_decoder(limits: Limits) -> Any:
    """Evaluation's decoder behind Serve's header check (byte and pixel limits, 4xx codes)."""

    def decode(raw: bytes, what: str, size: int) -> Image.Image:
        return decode_checked(raw, what, limits, size)

    return decode


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
    """The model behind ``uri`` for serving, loaded once by the one loader
    (:func:`ageray.inference.load_predictor`: an alias pinned to its version before the
    download, only a model folder accepted, nothing left in the temp folder; with
    ``backend="onnxruntime"``/``auto`` on a CPU, the ONNX session straight from the logged
    export and no PyTorch model). On a GPU with ``max_batch_size`` batches are padded to
    :func:`batch_buckets`."""
    from ageray.inference import load_predictor

    predictor = load_predictor(
        uri,
        backend=backend,
        device=device,
        threads=threads,
        channels_last=channels_last,
        registry=registry,
    )
    reg = dict(predictor.registry)
    reg.setdefault("uri", uri)
    if "name" not in reg:
        reg["name"] = (predictor.info.get("meta") or {}).get("name") or Path(uri).name
        reg.setdefault("version", None)
        reg.setdefault("alias", None)
    served = ServedModel(
        predictor=predictor,
        registry=reg,
        key=f"{reg.get('name')}/{reg.get('version')}|{uri}|{predictor.backend.name}",
    )
    if served.device.type == "cuda" and max_batch_size:
        served.buckets = batch_buckets(max_batch_size)
    return served


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
    if served.predictor.aligner is not None:  # build the detector now, not on first request
        served.predictor.aligner.align(Image.new("RGB", (s, s), (128, 128, 128)))
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
    quality: str | None = None,
) -> dict[str, Any]:
    """One image's answer row (``ServedModel.forward``) as the ``faces=largest`` JSON.

    ``{"age", "head", "heads": {name: {"age", "kl"}}, "interval": {"level", "low", "high"},
    "rule", "model": {...}, "timing_ms": {...}}`` plus ``distribution`` (101 probabilities
    over ages 0..100) on request, ``gender`` / ``race`` (``{"label", "index", "probs"}``)
    for multi-task models, ``face`` when detection ran, ``quality`` when the image cannot
    hold a usable face, and ``batch_size`` (how many images shared the forward pass). The
    fields are :func:`ageray.inference.flat_json`'s, the rendering every path shares.
    """
    out = flat_json(result, face=face, quality=quality, distribution=distribution)
    return _with_meta(out, served, timing_ms, batch_size)


def build_faces_answer(
    prepared: PreparedImage,
    results: Sequence[Mapping[str, Any]],
    served: ServedModel,
    *,
    distribution: bool = False,
    timing_ms: Mapping[str, float] | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One photo's ``faces=all`` JSON: ``{"faces": [{"index", "box", "landmarks", "score",
    "age", ...}], "reason", "image": {"width", "height"}, "model", "timing_ms",
    "batch_size"}`` (:func:`ageray.inference.image_json`); ``results`` are the forward's
    rows of ``prepared.faces``, in order."""
    rows = [
        {**row, **face_columns(p.face), "quality": p.quality}
        for p, row in zip(prepared.faces, results)
    ]
    out = image_json(
        rows,
        width=prepared.width,
        height=prepared.height,
        reason=prepared.reason,
        distribution=distribution,
    )
    return _with_meta(out, served, timing_ms, batch_size)


def _with_meta(
    out: dict[str, Any],
    served: ServedModel,
    timing_ms: Mapping[str, float] | None,
    batch_size: int | None,
) -> dict[str, Any]:
    out["model"] = served.model_ref()
    if timing_ms is not None:
        out["timing_ms"] = {k: round(float(v), 3) for k, v in timing_ms.items()}
    if batch_size is not None:
        out["batch_size"] = int(batch_size)
    return out


def build_answers(
    inputs: Sequence[PreparedImage],
    results: Sequence[tuple[Mapping[str, Any], Mapping[str, float]]],
    served: ServedModel,
    *,
    faces: str,
    distribution: bool,
    read_ms: float,
    total_ms: float,
) -> list[dict[str, Any]]:
    """A request's answers, one per image: ``results`` are the forward's ``(row, meta)``
    for every face of every image, in order (all of a request's faces go through the batch
    queue together). Timing per image: its decode, the longest queue wait and forward of
    its faces; ``batch_size`` the largest batch one of its faces shared (0: no face)."""
    answers: list[dict[str, Any]] = []
    at = 0
    for prep in inputs:
        mine = results[at : at + len(prep.faces)]
        at += len(prep.faces)
        metas = [m for _, m in mine]
        timing = {
            "read": read_ms,
            "decode": prep.decode_ms,
            "queue": max((m["queue_ms"] for m in metas), default=0.0),
            "forward": max((m["forward_ms"] for m in metas), default=0.0),
            "total": total_ms,
        }
        batch = int(max((m["batch_size"] for m in metas), default=0))
        if faces == "largest":
            answers.append(
                build_prediction(
                    mine[0][0],
                    served,
                    distribution=distribution,
                    face=prep.faces[0].face,
                    timing_ms=timing,
                    batch_size=batch,
                    quality=prep.quality,
                )
            )
        else:
            answers.append(
                build_faces_answer(
                    prep,
                    [row for row, _ in mine],
                    served,
                    distribution=distribution,
                    timing_ms=timing,
                    batch_size=batch,
                )
            )
    return answers
