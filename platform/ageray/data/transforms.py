"""Image decoding and the train / eval transforms: the only place pixels are prepared.

Why one module: a model is only as good as the agreement between what it saw in training
and what it is shown in serving. The shard streams (train and eval) and the Ray Serve app
all call :func:`decode_image`, :func:`build_eval_transform` / :func:`preprocess_for_eval`
from here, so evaluation and serving preprocessing are the same code, not a copy.

* :func:`decode_image` turns encoded bytes into an RGB ``PIL.Image``. For JPEG it asks the
  decoder for a reduced-size draft (``Image.draft``) when the image is much larger than the
  target: libjpeg then decodes at 1/2, 1/4 or 1/8 scale, several times faster, and the result
  is still at least ``target_size`` on both sides. Corrupt input raises
  :class:`CorruptImageError` with a machine-readable ``reason`` (``not_image``,
  ``truncated``, ``too_large``) that the streams count. ``PIL.ImageFile.
  LOAD_TRUNCATED_IMAGES`` is left False on purpose: a truncated JPEG must be an error, not a
  half-grey face.
* EXIF orientation is applied (phone photos arrive rotated), as the aligner does.
* Any mode becomes RGB: L/1/P/CMYK/YCbCr via Pillow; modes with alpha are composited on
  white; 16-bit and float greyscale (``I;16``, ``I``, ``F``) are scaled to 8 bits, not
  clipped.
* Training (LAE 2.3, GLAE V-A): RandomResizedCrop (scale/ratio from ``AugmentConfig``),
  horizontal flip, ColorJitter, optional RandAugment(N, M), then tensor + normalisation.
* Evaluation / serving: resize to ``image_size`` x ``image_size``, tensor + normalisation.
* Normalisation ``imagenet`` (mean/std of ImageNet, LAE) or ``glae`` (``(x*255-127.5)/128``).
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

    from ageray.config import DataConfig

__all__ = [
    "NORMALIZE",
    "CorruptImageError",
    "ToNormalizedTensor",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "preprocess_for_eval",
    "split_finisher",
    "to_rgb",
    "train_draft_size",
]

# mean, std on the 0..1 scale. glae: (x*255 - 127.5) / 128 == (x - 0.5) / (128/255).
NORMALIZE: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "glae": ((127.5 / 255,) * 3, (128 / 255,) * 3),
}

# Signatures of formats Pillow reads: bytes that start like an image but fail to decode are
# "truncated" (or otherwise corrupt) images, anything else is "not_image".
_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF
    b"MM\x00*",
)

_EXIF_ORIENTATION = 0x0112

# Pillow's decoders signal corrupt data with a variety of exception types.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)


class CorruptImageError(ValueError):
    """Bytes that are not a usable image. ``reason`` is what the streams count by:
    ``not_image`` (not an image format at all), ``truncated`` (an image whose data ends early
    or is corrupt), ``too_large`` (refused by Pillow's decompression-bomb guard)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def decode_image(
    data: bytes, target_size: int | None = None, *, name: str = "image"
) -> Image.Image:
    """Decode encoded image bytes into an RGB ``PIL.Image``.

    ``target_size``: the side the caller will resize to. For JPEG the decoder then produces a
    draft at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides >= ``target_size``
    (never smaller), which is what makes decoding large photos cheap. ``name`` only appears
    in error messages (a sample key or file name).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process; truncated "
            "images would be silently padded with grey. Leave it False."
        )
    if not data:
        raise CorruptImageError("not_image", f"{name}: empty image data")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise CorruptImageError("too_large", f"{name}: {exc}") from exc
    except (UnidentifiedImageError, *_DECODE_ERRORS) as exc:
        reason = "truncated" if _looks_like_image(data) else "not_image"
        raise CorruptImageError(
            reason, f"{name}: cannot identify image ({describe_decode_error(exc)})"
        ) from exc
    try:
        if target_size and img.format == "JPEG":
            img.draft("RGB", (target_size, target_size))
        img.load()
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in img.info else 1
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise CorruptImageError("too_large", f"{name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(
            "truncated", f"{name}: {img.format} data is truncated or corrupt ({exc})"
        ) from exc
    return to_rgb(img)


def describe_decode_error(exc: BaseException) -> str:
    """Pillow's error as a client may read it: ``UnidentifiedImageError`` names the in-memory
    buffer (``cannot identify image file <_io.BytesIO object at 0x7f...>``), which tells a
    user nothing and leaks a process address into HTTP answers."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a format Pillow recognises"
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(exc))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB (alpha composited on white; 16-bit/float scaled)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        if mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0:
            # 16-bit data (I;16 or I from a 16-bit PNG): map 0..65535 to 0..255
            arr = arr * (255.0 / (65535.0 if hi <= 65535.0 else hi))
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ToNormalizedTensor:
    """PIL RGB image -> normalised float32 tensor (3, H, W) in one pass.

    Equal to ``ToTensor()`` followed by ``Normalize(mean, std)`` — ``(x/255 - m)/s`` is
    computed as ``(x - 255 m) / (255 s)`` on the uint8 data — with one float allocation
    instead of three. A plain callable (not an ``nn.Module``) so that this module, and the
    shard writer that decodes with it, do not import torch until a tensor is made.
    """

    def __init__(self, normalize: str = "imagenet") -> None:
        if normalize not in NORMALIZE:
            raise ValueError(
                f"data.normalize={normalize!r} is not one of {sorted(NORMALIZE)}; "
                "use imagenet (LAE) or glae ((x*255-127.5)/128)"
            )
        self.normalize = normalize
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"normalize": self.normalize, "_stats": None}

    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self._stats is None:
            mean, std = NORMALIZE[self.normalize]
            self._stats = (
                torch.tensor(mean).mul(255.0).view(3, 1, 1),
                torch.tensor(std).mul(255.0).view(3, 1, 1),
            )
        return self._stats

    @staticmethod
    def _hwc(img: Image.Image) -> torch.Tensor:
        import torch

        if img.mode != "RGB":
            img = to_rgb(img)
        # np.array copies (37 kB at 112 px): torch warns on the read-only view np.asarray gives
        return torch.from_numpy(np.array(img, dtype=np.uint8))

    def __call__(self, img: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised (3, H, W) float32 tensor of ``img``; written into ``out`` when
        given (e.g. one row of a batch)."""
        import torch

        chw = self._hwc(img).permute(2, 0, 1)
        if out is None:
            out = torch.empty(chw.shape, dtype=torch.float32)
        out.copy_(chw)
        mean, std = self._mean_std()
        return out.sub_(mean).div_(std)

    def to_uint8(self, img: Image.Image, out: torch.Tensor) -> torch.Tensor:
        """The image's pixels as (3, H, W) uint8 in ``out``; :meth:`normalize_uint8` then
        gives exactly what ``__call__`` gives. Lets a pipeline move 4x fewer bytes between
        processes and normalise a whole batch at once."""
        return out.copy_(self._hwc(img).permute(2, 0, 1))

    def normalize_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> normalised float32, on ``x``'s device. Same elementwise
        operations as ``__call__`` (float conversion, subtract, divide): identical output."""
        import torch

        mean, std = self._mean_std()
        return x.to(torch.float32).sub_(mean.to(x.device)).div_(std.to(x.device))

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(normalize={self.normalize!r})"


class _ResizeSquare:
    """Resize to ``size`` x ``size`` (bilinear, antialiased); a no-op when already there."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.Resampling.BILINEAR, reducing_gap=None)

    def __repr__(self) -> str:
        return f"ResizeSquare(size={self.size})"


def split_finisher(
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[Callable[[Image.Image], Image.Image], ToNormalizedTensor | None]:
    """``(image ops, finisher)`` of a transform built here: the PIL-to-PIL part and its final
    :class:`ToNormalizedTensor`. A batching pipeline runs the image ops per sample and lets
    the finisher write each result straight into its row of the batch tensor (no per-image
    tensor, no stacking copy). Same operations, same output. ``(transform, None)`` when the
    transform does not end in a ToNormalizedTensor."""
    ops = getattr(transform, "transforms", None)
    if ops and isinstance(ops[-1], ToNormalizedTensor):
        from torchvision import transforms as T

        return T.Compose(list(ops[:-1])), ops[-1]
    return transform, None  # type: ignore[return-value]


def train_draft_size(cfg: DataConfig) -> int:
    """The JPEG draft size for training: large enough that the smallest RandomResizedCrop
    (area ``rrc_scale[0]``) is still not upsampled."""
    aug = cfg.augment
    if aug.random_resized_crop:
        return math.ceil(cfg.image_size / math.sqrt(max(1e-3, aug.rrc_scale[0])))
    return cfg.image_size


def build_train_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised (3, S, S) float32 tensor with the training augmentation."""
    from torchvision import transforms as T

    aug = cfg.augment
    size = cfg.image_size
    ops: list[Callable] = []
    if aug.random_resized_crop:
        ops.append(
            T.RandomResizedCrop(
                size,
                scale=tuple(aug.rrc_scale),
                ratio=tuple(aug.rrc_ratio),
                interpolation=T.InterpolationMode.BILINEAR,
                antialias=True,
            )
        )
    else:
        ops.append(_ResizeSquare(size))
    if aug.hflip > 0:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if max(aug.brightness, aug.contrast, aug.saturation, aug.hue) > 0:
        ops.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    if aug.randaugment_n > 0:
        ops.append(T.RandAugment(num_ops=aug.randaugment_n, magnitude=aug.randaugment_m))
    ops.append(ToNormalizedTensor(cfg.normalize))
    return T.Compose(ops)


def build_eval_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """RGB PIL image -> normalised (3, S, S) float32 tensor; what evaluation AND Serve use."""
    from torchvision import transforms as T

    return T.Compose([_ResizeSquare(cfg.image_size), ToNormalizedTensor(cfg.normalize)])


def preprocess_for_eval(images: Sequence[Image.Image], cfg: DataConfig) -> torch.Tensor:
    """A batch of PIL images (any mode) -> (B, 3, S, S) float32, exactly as eval streams do.

    Serve decodes request bytes with ``decode_image(data, target_size=cfg.image_size)`` and
    calls this, so a served image is prepared by the same code as a test-set image.
    """
    import torch

    if len(images) == 0:
        raise ValueError("preprocess_for_eval: no images given")
    transform = build_eval_transform(cfg)
    return torch.stack([transform(to_rgb(img)) for img in images])
