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

Faces (``faces=all``, :func:`prepare_faces`): a photo holds several people, so the image is
decoded once at full size, every face above the detector's score and size limits is found in
one detector call and each is cropped and then goes through steps 2-3 like a single image;
the forward then runs them all in one batch. ``faces=largest`` is exactly the single-image
path above (chips and datasets answer as they always did). How a face is cropped:

* a model trained on aligned faces: the shard writer's aligner (its stored settings, the
  ArcFace template), only searching smaller faces (``min_face_frac``), so every face of a
  group photo gets the crop its training faces got;
* a model trained on dataset chips without alignment (``align: false``, e.g. UTKFace as it
  ships): the face is warped by the same 5-point similarity onto where the chips themselves
  have those points (:func:`ageray.data.align.chip_template`, measured on UTKFace), at the
  chips' 200 px, then JPEG-encoded and decoded like a chip. Why not a box crop with some
  margin: the chips are tighter than any detector box plus margin and put the eyes at 29% of
  the height; warping onto their own landmarks reproduces that framing, and it also undoes
  the head's roll, as the chips' own alignment did.

The evaluation stream decodes shard members with the same ``decode_image`` (draft at the
input size) and the same eval transform, so a face in a shard and the same bytes sent to
Serve become the same tensor. Serve passes its own ``decode`` (the header check for pixel
bombs, then this decoder) so it can answer 4xx with its own codes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

__all__ = [
    "FACE_MODES",
    "InputSpec",
    "Prepared",
    "PreparedImage",
    "face_fields",
    "make_aligner",
    "make_face_aligner",
    "prepare_faces",
    "prepare_image",
    "quality_note",
]

FaceMode = Literal["all", "largest"]
#: ``all``: an answer per detected face; ``largest``: one answer per image, as always.
FACE_MODES = ("all", "largest")
#: The side of the chip crop for models trained on chips (UTKFace's chips are 200 px).
CHIP_SIZE = 200
#: Smallest face searched in ``faces=all``, as a fraction of the padded image's shorter
#: side (FaceAligner's ``min_face_frac``; its 0.1 default suits one main face per image).
GROUP_MIN_FACE_FRAC = 0.04
#: The face dict of ``faces=largest`` (what single-image answers have always reported).
LARGEST_FACE_KEYS = ("found", "box", "score", "detector")
#: An image whose shorter side is below this cannot hold a face that can be read.
MIN_READABLE_PX = 16

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
    quality: str | None = None


@dataclass
class PreparedImage:
    """One image's faces ready for the forward: one :class:`Prepared` per face, largest
    first (``faces=all``), or exactly one (``faces=largest``). ``reason`` says why a photo
    in ``faces=all`` has no face (then ``faces`` is empty); ``width``/``height`` are the
    original image's (the frame of every box)."""

    faces: list[Prepared] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    quality: str | None = None
    decode_ms: float = 0.0


def quality_note(width: int, height: int, spec: InputSpec) -> str | None:
    """A short note when the image cannot hold a usable face (None when it can): a face
    needs at least :data:`MIN_READABLE_PX` pixels a side, so a 1x1 or 10000x1 image gets an
    age only as a guess, and the answer must say so."""
    if min(width, height) >= MIN_READABLE_PX:
        return None
    return (
        f"image {width}x{height} px is smaller than the model's {spec.image_size} px input "
        f"(a face needs at least {MIN_READABLE_PX} px a side): no face can be read"
    )


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, after EXIF orientation (as the decoder turns it)."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if "exif" in im.info else 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def face_fields(res: Any) -> dict[str, Any]:
    """An :class:`~ageray.data.align.AlignResult` as the face dict rows and answers carry:
    found, index, box (original pixels), landmarks (5 x [x, y]), score, detector."""
    return {
        "found": bool(res.found),
        "index": res.index,
        "box": [round(float(v), 2) for v in res.box] if res.box is not None else None,
        "landmarks": None
        if res.landmarks is None
        else [[round(float(x), 2), round(float(y), 2)] for x, y in res.landmarks],
        "score": None if res.score is None else float(res.score),
        "detector": res.detector,
    }


def make_face_aligner(spec: InputSpec) -> Any:
    """The detector and crop of ``faces=all`` (module docstring): the trained aligner's
    settings for an aligned model, the chip crop otherwise; small faces searched."""
    from ageray.data.align import FaceAligner

    if spec.align:
        opts = dict(spec.align_options)
    else:
        opts = {"output_size": CHIP_SIZE, "crop": "chip"}
    opts["on_no_face"] = "keep"
    opts["min_face_frac"] = min(float(opts.get("min_face_frac", 0.1)), GROUP_MIN_FACE_FRAC)
    return FaceAligner(**opts)


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
        # faces=largest keeps the face it always reported (no index or landmarks: that is
        # the faces=all answer's)
        face = {k: v for k, v in face_fields(res).items() if k in LARGEST_FACE_KEYS}
    img = decode(data, name, spec.image_size)
    x = preprocess_for_eval([img], data_cfg if data_cfg is not None else spec.data_config())[0]
    quality = quality_note(*img.size, spec) if aligner is None else None
    return Prepared(x, face, (time.perf_counter() - t0) * 1000.0, quality)


def prepare_faces(
    data: bytes,
    spec: InputSpec,
    *,
    mode: FaceMode = "largest",
    name: str = "image",
    aligner: Any | None = None,
    face_aligner: Any | None = None,
    decode: Decoder | None = None,
    data_cfg: Any | None = None,
) -> PreparedImage:
    """Encoded bytes -> every face's :class:`Prepared` (``mode="all"``: ``face_aligner``
    detects and crops, :func:`make_face_aligner`), or the one image exactly as
    :func:`prepare_image` makes it (``mode="largest"``, with ``aligner`` as trained). Bad
    bytes raise as in :func:`prepare_image`; a photo without a face is no error: ``faces``
    is empty and ``reason`` says why."""
    from ageray.data.align import decode_image as decode_full
    from ageray.data.transforms import preprocess_for_eval

    if mode not in FACE_MODES:
        raise ValueError(f"faces={mode!r}: use one of {list(FACE_MODES)}")
    t0 = time.perf_counter()
    if mode == "largest":
        one = prepare_image(
            data, spec, name=name, aligner=aligner, decode=decode, data_cfg=data_cfg
        )
        width, height = image_size_of(data)
        quality = one.quality or quality_note(width, height, spec)
        one.quality = quality
        return PreparedImage([one], width, height, None, quality, one.decode_ms)
    decode = decode or _decode
    decode(data, name, spec.image_size)  # the original must be a usable image first
    full = decode_full(data)
    width, height = full.size
    quality = quality_note(width, height, spec)
    fa = face_aligner if face_aligner is not None else make_face_aligner(spec)
    if quality is not None:
        return PreparedImage([], width, height, quality, quality, _ms(t0))
    cfg = data_cfg if data_cfg is not None else spec.data_config()
    faces: list[Prepared] = []
    for res in fa.align_all(full):
        buf = io.BytesIO()
        res.image.save(buf, format="JPEG", quality=95)  # as align_bytes: a chip's JPEG
        img = decode(buf.getvalue(), name, spec.image_size)
        faces.append(Prepared(preprocess_for_eval([img], cfg)[0], face_fields(res), 0.0))
    reason = None
    if not faces:
        reason = f"no face with score >= {fa.min_score:g} and size >= {fa.min_face_px:g} px found"
    ms = _ms(t0)
    for f in faces:
        f.decode_ms = ms / len(faces)
    return PreparedImage(faces, width, height, reason, None, ms)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
