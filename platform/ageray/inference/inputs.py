"""Image bytes -> the model's input tensor, exactly as the model was trained and evaluated.

Why one function: a served, batch-predicted or pyfunc-predicted image must be prepared by the
same steps as a test-set image, or the answers drift from the numbers the evaluation
reported. The steps, in order:

1. alignment, when the model was trained on aligned faces (``model.json`` ``"align": true``):
   the shard writer's :class:`ageray.data.align.FaceAligner` path (detect, 5-point warp,
   JPEG re-encode of the crop), with ``on_no_face="keep"`` so every image gets an answer;
2. :func:`ageray.data.transforms.decode_image` with JPEG draft mode at the model's input
   size (large photos decode at 1/2, 1/4 or 1/8 scale), any mode to RGB;
3. :func:`ageray.data.transforms.preprocess_for_eval`: resize to the input size and
   normalise with the model's ``data.normalize``.

The evaluation stream decodes shard members with the same ``decode_image`` (draft at the
input size) and the same eval transform, so a face in a shard and the same bytes sent to
Serve become the same tensor. Serve passes its own ``decode`` (the header check for pixel
bombs, then this decoder) so it can answer 4xx with its own codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

__all__ = ["InputSpec", "Prepared", "make_aligner", "prepare_image"]

#: ``decode(data, name, target_size) -> RGB image``; the default is ``decode_image``.
Decoder = Callable[[bytes, str, int], Image.Image]


@dataclass(frozen=True)
class InputSpec:
    """How images become this model's input: its ``data`` section and alignment flag."""

    image_size: int
    normalize: str
    align: bool = False
    align_options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> InputSpec:
        """From ``model.json``. ``normalize: null`` (a model saved without a config) means the
        DataConfig default, as the model was then built and evaluated with it."""
        from ageray.config import DataConfig

        defaults = DataConfig()
        data = info.get("data") or {}
        size = int(data.get("image_size") or info.get("input_size") or defaults.image_size)
        meta = info.get("meta") or {}
        opts = dict(info.get("align_options") or meta.get("align_options") or {})
        return cls(
            image_size=size,
            normalize=data.get("normalize") or defaults.normalize,
            align=bool(info.get("align", False)),
            align_options=tuple(sorted(opts.items())),
        )

    def data_config(self) -> Any:
        """The ``DataConfig`` that ``preprocess_for_eval`` reads (size, normalisation)."""
        import dataclasses

        from ageray.config import DataConfig

        return dataclasses.replace(
            DataConfig(), image_size=self.image_size, normalize=self.normalize
        )


@dataclass
class Prepared:
    """One image ready for the batched forward: (3, S, S) float32, the face found on the way
    (alignment only) and how long decoding took."""

    tensor: Any
    face: dict[str, Any] | None
    decode_ms: float


def make_aligner(spec: InputSpec, align: bool | str = "auto") -> Any | None:
    """The FaceAligner the shard writer used, or None.

    ``align``: ``"auto"`` (as the model was trained: ``spec.align``), True or False. The
    aligner settings are the ones the training job stored (``align_options``), else
    FaceAligner's defaults; ``on_no_face`` is forced to ``keep``: an answer for every image.
    """
    use = spec.align if align == "auto" else bool(align)
    if not use:
        return None
    from ageray.data.align import FaceAligner

    opts = dict(spec.align_options)
    opts["on_no_face"] = "keep"
    return FaceAligner(**opts)


def _decode(data: bytes, name: str, size: int) -> Image.Image:
    from ageray.data.transforms import decode_image

    return decode_image(data, target_size=size, name=name)


def prepare_image(
    data: bytes,
    spec: InputSpec,
    *,
    name: str = "image",
    aligner: Any | None = None,
    decode: Decoder | None = None,
    data_cfg: Any | None = None,
) -> Prepared:
    """Encoded bytes -> :class:`Prepared` (module docstring for the steps).

    Bad bytes raise :class:`ageray.data.transforms.CorruptImageError` (``reason``:
    ``not_image``, ``truncated``, ``too_large``) from the default decoder, or whatever
    ``decode`` raises. ``data_cfg`` (``spec.data_config()``) may be passed to save building
    it per image.
    """
    from ageray.data.transforms import preprocess_for_eval

    t0 = time.perf_counter()
    decode = decode or _decode
    face = None
    if aligner is not None:
        decode(data, name, spec.image_size)  # the original must be a usable image first
        crop, res = aligner.align_bytes(data)
        if crop is None:  # cannot happen with on_no_face="keep" (make_aligner forces it)
            raise ValueError(f"no face was found in image {name!r}")
        data = crop
        face = {
            "found": bool(res.found),
            "box": [round(float(v), 2) for v in res.box] if res.box is not None else None,
            "score": None if res.score is None else float(res.score),
            "detector": res.detector,
        }
    img = decode(data, name, spec.image_size)
    x = preprocess_for_eval([img], data_cfg if data_cfg is not None else spec.data_config())[0]
    return Prepared(x, face, (time.perf_counter() - t0) * 1000.0)
