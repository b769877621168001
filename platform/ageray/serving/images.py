"""Encoded image bytes -> a checked RGB image: the byte and pixel limits, then evaluation's
decoder.

Why the header first: a 50 kB PNG can declare 100,000 x 100,000 pixels (a decompression
bomb); its header says so before a single pixel is inflated, so the pixel limit is enforced
from the header, independent of ``PIL.Image.MAX_IMAGE_PIXELS``. Pillow's own guard stays on
as a second net and maps to the same 413. Decoding itself is
:func:`ageray.data.transforms.decode_image` (JPEG draft mode at the model's input size, any
mode to RGB), so a served image is decoded exactly as a test-set image is.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ageray.serving.errors import ServeError
from ageray.serving.requests import check_image_bytes
from ageray.serving.settings import Limits

__all__ = ["check_image_header", "decode_checked"]

_HINTS = {
    "too_many_pixels": "downscale it",
    "truncated_image": "re-send the complete file",
    "not_an_image": "send a JPEG, PNG, WebP, BMP, GIF or TIFF file",
}


def check_image_header(data: bytes, name: str, limits: Limits) -> tuple[int, int]:
    """Read only the header and enforce the byte and pixel limits; returns (width, height)."""
    if not data:
        raise ServeError.bad_request(
            "empty_image", f"image {name!r} is empty (0 bytes); send an image"
        )
    check_image_bytes(len(data), name, limits)
    try:
        with warnings.catch_warnings():
            # DecompressionBombWarning would only repeat what the explicit check below says.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        what = f"declares a decompression-bomb size ({str(exc).rstrip('.')})"
        raise ServeError.too_many_pixels(name, what, limits.max_pixels) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _classify_unreadable(data, name, exc) from exc
    if width < 1 or height < 1:
        raise ServeError.bad_request(
            "not_an_image", f"image {name!r} has no pixels ({width}x{height})"
        )
    if width * height > limits.max_pixels:
        what = f"is {width}x{height} = {width * height} pixels"
        raise ServeError.too_many_pixels(name, what, limits.max_pixels)
    return width, height


def _classify_unreadable(data: bytes, name: str, exc: BaseException) -> ServeError:
    """Not an image at all, or an image cut short? Asks evaluation's decoder, whose
    ``CorruptImageError.reason`` the shard streams count by, so both agree."""
    from ageray.data.transforms import CorruptImageError, decode_image, describe_decode_error

    reason = "not_image"
    try:
        decode_image(data, name=name)
    except CorruptImageError as err:
        reason = err.reason
    except Image.DecompressionBombError:
        reason = "too_large"
    if reason == "truncated":
        return ServeError.bad_request(
            "truncated_image",
            f"image {name!r} starts like an image file but is corrupt or cut short "
            f"({describe_decode_error(exc)}); "
            f"{_HINTS['truncated_image']}",
        )
    return ServeError.bad_request(
        "not_an_image",
        f"image {name!r} is not an image Pillow can read ({describe_decode_error(exc)}); "
        f"{_HINTS['not_an_image']}",
    )


def decode_checked(data: bytes, name: str, limits: Limits, target_size: int | None) -> Image.Image:
    """Header check, then :func:`ageray.data.transforms.decode_image` (evaluation's decoder,
    JPEG draft at ``target_size``); any mode (L, CMYK, alpha, 16-bit) comes back RGB."""
    from ageray.data.transforms import CorruptImageError, decode_image

    check_image_header(data, name, limits)
    try:
        return decode_image(data, target_size=target_size, name=name)
    except CorruptImageError as exc:
        status, code = {
            "too_large": (413, "too_many_pixels"),
            "truncated": (400, "truncated_image"),
        }.get(exc.reason, (400, "not_an_image"))
        raise ServeError(status, code, f"{exc}; {_HINTS[code]}") from exc
