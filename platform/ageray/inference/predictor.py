"""The one inference path: image bytes -> answer rows.

    predictor = load_predictor("runs/demo/stage2/model")      # or models:/ageray@prod
    rows = predictor.predict([jpeg_bytes, ...], keys=["a.jpg", ...], distribution=False)

Steps (each a function of its own module, so the callers that start in the middle share
everything after): :func:`~ageray.inference.inputs.prepare_image` (alignment as trained,
JPEG draft decode, eval preprocessing) -> a backend's forward
(:class:`~ageray.inference.backends.TorchBackend` or ``OnnxBackend``: image + flip, both
heads, the model's routing rule) -> :func:`~ageray.inference.answers.answer_rows`.

Who calls what: Serve checks the header first and passes its own decoder, batches the
prepared tensors across requests, then calls :meth:`ImagePredictor.forward` and
:meth:`ImagePredictor.rows`; the pyfunc model and ``jobs.predict`` call
:meth:`ImagePredictor.predict`; evaluation and training's validation start from decoded
tensors of the shard stream (the same decoder and transform) and call the backend
(``collect_predictions``). Images that cannot be used become error rows, never exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .answers import answer_rows, error_row
from .inputs import InputSpec, Prepared, make_aligner, prepare_image

__all__ = ["ImagePredictor"]


@dataclass
class ImagePredictor:
    """A loaded model (``backend``), how its inputs are made (``spec``, ``aligner``) and its
    ``model.json`` (``info``). Load one with :func:`ageray.inference.load_predictor`."""

    backend: Any  # TorchBackend | OnnxBackend
    spec: InputSpec
    info: dict[str, Any] = field(default_factory=dict)
    aligner: Any | None = None
    model: Any | None = None  # the AgeModel (torch backend; None when ONNX Runtime answers)
    source: str = ""  # where it was loaded from (a folder, s3:// or MLflow URI)
    registry: dict[str, Any] = field(default_factory=dict)  # name, version, alias, run id

    def __post_init__(self) -> None:
        self._data_cfg = self.spec.data_config()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        model: Any,
        info: dict[str, Any],
        *,
        align: bool | str = "auto",
        flip: bool = True,
        device: str | None = None,
    ) -> ImagePredictor:
        """The path around a model already in memory (training's validation, tests). Loading
        one from a folder, ``s3://`` or MLflow URI is :func:`ageray.inference.load_predictor`."""
        from .backends import TorchBackend

        model.eval()
        spec = InputSpec.from_info(info)
        return cls(
            backend=TorchBackend(model, flip=flip, device=device),
            spec=spec,
            info=dict(info),
            aligner=make_aligner(spec, align),
            model=model,
        )

    # ------------------------------------------------------------------ steps
    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def rule(self) -> str:
        """The routing rule this path answers with by default."""
        return self.backend.rule

    def prepare(
        self,
        data: bytes,
        name: str = "image",
        *,
        decode: Callable[[bytes, str, int], Any] | None = None,
    ) -> Prepared:
        """Step 1: bytes -> (3, S, S) tensor (+ face). Raises on unusable bytes."""
        return prepare_image(
            data,
            self.spec,
            name=name,
            aligner=self.aligner,
            decode=decode,
            data_cfg=self._data_cfg,
        )

    def forward(self, x: Any, rule: str | None = None) -> dict[str, np.ndarray]:
        """Step 2: a (B, 3, S, S) batch -> named outputs (numpy)."""
        return self.backend(x, rule)

    def rows(
        self,
        outputs: dict[str, np.ndarray],
        *,
        rule: str | None = None,
        keys: Sequence[str] | None = None,
        sources: Sequence[str | None] | None = None,
        faces: Sequence[dict[str, Any] | None] | None = None,
        distribution: bool = False,
    ) -> list[dict[str, Any]]:
        """Step 3: named outputs -> answer rows (``ageray.inference.answers``)."""
        return answer_rows(
            outputs,
            rule=self.backend.rule_name(rule),
            keys=keys,
            sources=sources,
            faces=faces,
            distribution=distribution,
        )

    # ------------------------------------------------------------------ all of it
    def predict(
        self,
        images: Sequence[bytes | None],
        *,
        keys: Sequence[str] | None = None,
        sources: Sequence[str | None] | None = None,
        errors: Sequence[str | None] | None = None,
        rule: str | None = None,
        distribution: bool = False,
        batch_size: int = 64,
    ) -> list[dict[str, Any]]:
        """Bytes -> one row per image, in order. An image that cannot be decoded (or whose
        ``errors`` entry is already set, e.g. an unreadable file) becomes an error row."""
        import torch

        n = len(images)
        keys = list(keys) if keys is not None else [f"image-{i}" for i in range(n)]
        srcs = list(sources) if sources is not None else [None] * n
        out: list[dict[str, Any] | None] = [None] * n
        good: list[int] = []
        prepared: dict[int, Prepared] = {}
        for i, data in enumerate(images):
            err = errors[i] if errors is not None else None
            if err is None and not data:
                err = "empty: no image data"
            if err is None:
                try:
                    prepared[i] = self.prepare(bytes(data), keys[i])  # type: ignore[arg-type]
                    good.append(i)
                    continue
                except Exception as exc:  # any unusable image is a row, never a crash
                    err = describe_error(exc)
            out[i] = error_row(keys[i], err, source=srcs[i])
        for start in range(0, len(good), max(1, int(batch_size))):
            idx = good[start : start + batch_size]
            x = torch.stack([prepared[i].tensor for i in idx])
            outputs = self.forward(x, rule)
            rows = self.rows(
                outputs,
                rule=rule,
                keys=[keys[i] for i in idx],
                sources=[srcs[i] for i in idx],
                faces=[prepared[i].face for i in idx],
                distribution=distribution,
            )
            for i, row in zip(idx, rows):
                out[i] = row
        return out  # type: ignore[return-value]


def describe_error(exc: BaseException) -> str:
    """``reason: message`` for the error column (the streams' skip reasons for decoding)."""
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return f"{reason}: {exc}"
