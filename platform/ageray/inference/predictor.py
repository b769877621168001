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

from .answers import ImageAnswer, answer_rows, error_row, no_face_row
from .inputs import (
    InputSpec,
    Prepared,
    PreparedImage,
    make_aligner,
    make_face_aligner,
    prepare_faces,
    prepare_image,
)

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
    load_ms: dict[str, float] = field(default_factory=dict)  # load_predictor's phases

    def __post_init__(self) -> None:
        self._data_cfg = self.spec.data_config()
        self._face_aligner: Any | None = None

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

    def prepare_faces(
        self,
        data: bytes,
        name: str = "image",
        *,
        faces: str = "largest",
        decode: Callable[[bytes, str, int], Any] | None = None,
    ) -> PreparedImage:
        """Step 1 per face: every face's tensor (``faces="all"``: detected, cropped as
        :mod:`ageray.inference.inputs` says) or the one image's (``"largest"``, exactly
        :meth:`prepare`). Raises on unusable bytes; a photo without a face is no error."""
        return prepare_faces(
            data,
            self.spec,
            mode=faces,  # type: ignore[arg-type]
            name=name,
            aligner=self.aligner,
            face_aligner=self.face_aligner if faces == "all" else None,
            decode=decode,
            data_cfg=self._data_cfg,
        )

    @property
    def face_aligner(self) -> Any:
        """The detector and crop of ``faces=all`` (built on first use: the detector loads
        lazily per thread, so this is cheap and safe to share)."""
        if self._face_aligner is None:
            self._face_aligner = make_face_aligner(self.spec)
        return self._face_aligner

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
        qualities: Sequence[str | None] | None = None,
        distribution: bool = False,
    ) -> list[dict[str, Any]]:
        """Step 3: named outputs -> answer rows (``ageray.inference.answers``)."""
        return answer_rows(
            outputs,
            rule=self.backend.rule_name(rule),
            keys=keys,
            sources=sources,
            faces=faces,
            qualities=qualities,
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
        faces: str = "largest",
    ) -> list[dict[str, Any]]:
        """Bytes -> answer rows, in order: one per image (``faces="largest"``), or one per
        face and one ``no_face`` row per photo without a face (``faces="all"``). An image
        that cannot be decoded (or whose ``errors`` entry is already set, e.g. an
        unreadable file) becomes an error row."""
        answers = self.predict_images(
            images,
            keys=keys,
            sources=sources,
            errors=errors,
            rule=rule,
            distribution=distribution,
            batch_size=batch_size,
            faces=faces,
        )
        return [row for answer in answers for row in answer.rows]

    def predict_images(
        self,
        images: Sequence[bytes | None],
        *,
        keys: Sequence[str] | None = None,
        sources: Sequence[str | None] | None = None,
        errors: Sequence[str | None] | None = None,
        rule: str | None = None,
        distribution: bool = False,
        batch_size: int = 64,
        faces: str = "largest",
    ) -> list[ImageAnswer]:
        """Bytes -> one :class:`~ageray.inference.answers.ImageAnswer` per image. Every face
        of every image goes into the same forward batches (``batch_size`` faces each), so a
        group photo costs one detection and one batched forward, not one per face."""
        import torch

        n = len(images)
        keys = list(keys) if keys is not None else [f"image-{i}" for i in range(n)]
        srcs = list(sources) if sources is not None else [None] * n
        answers: list[ImageAnswer] = []
        todo: list[tuple[int, int, Prepared]] = []  # (image, face, prepared) to forward
        for i, data in enumerate(images):
            err = errors[i] if errors is not None else None
            if err is None and not data:
                err = "empty: no image data"
            prep = None
            if err is None:
                try:
                    prep = self.prepare_faces(bytes(data), keys[i], faces=faces)  # type: ignore[arg-type]
                except Exception as exc:  # any unusable image is a row, never a crash
                    err = describe_error(exc)
            if prep is None:
                row = error_row(keys[i], err or "error", source=srcs[i])
                answers.append(ImageAnswer(keys[i], faces, [row], error=row["error"]))
                continue
            answer = ImageAnswer(
                keys[i],
                faces,
                [None] * len(prep.faces),  # type: ignore[list-item]
                faces=[p.face for p in prep.faces],
                width=prep.width,
                height=prep.height,
                reason=prep.reason,
                quality=prep.quality,
            )
            if not prep.faces:
                reason = prep.reason or "no face found"
                answer.rows = [no_face_row(keys[i], reason, source=srcs[i], quality=prep.quality)]
            answers.append(answer)
            todo.extend((len(answers) - 1, j, p) for j, p in enumerate(prep.faces))
        step = max(1, int(batch_size))
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            outputs = self.forward(torch.stack([p.tensor for _, _, p in chunk]), rule)
            rows = self.rows(
                outputs,
                rule=rule,
                keys=[answers[i].key for i, _, _ in chunk],
                sources=[srcs[i] for i, _, _ in chunk],
                faces=[p.face for _, _, p in chunk],
                qualities=[p.quality for _, _, p in chunk],
                distribution=distribution,
            )
            for (i, j, _), row in zip(chunk, rows):
                answers[i].rows[j] = row
        return answers


def describe_error(exc: BaseException) -> str:
    """``reason: message`` for the error column (the streams' skip reasons for decoding)."""
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return f"{reason}: {exc}"
