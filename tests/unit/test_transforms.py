"""Decoding and train/eval transforms (ageray.data.transforms): every mode becomes RGB,
corrupt bytes fail with a reason, JPEG drafts shrink big images, normalisations are exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datagen import encode, jpeg
from PIL import Image, ImageFile

from ageray.config import AugmentConfig, DataConfig
from ageray.data.transforms import (
    CorruptImageError,
    ToNormalizedTensor,
    build_eval_transform,
    build_train_transform,
    decode_image,
    preprocess_for_eval,
    to_rgb,
    train_draft_size,
)


def test_truncated_images_are_not_loaded_silently() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("L", "PNG", 100, (100, 100, 100)),
        ("L", "JPEG", 100, None),
        ("CMYK", "JPEG", (0, 0, 0, 0), None),
        ("RGBA", "PNG", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", "PNG", (10, 20, 30, 0), (255, 255, 255)),  # transparent -> white
        ("P", "PNG", 3, None),
        ("I;16", "PNG", 65535, (255, 255, 255)),  # 16-bit scaled, not clipped
        ("I;16", "PNG", 32896, (128, 128, 128)),
        ("1", "PNG", 1, (255, 255, 255)),
    ],
)
def test_decode_any_mode_to_rgb(mode: str, fmt: str, value, expected) -> None:
    img = Image.new(mode, (20, 12), value)
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (20, 12)
    if expected is not None:
        assert out.getpixel((5, 5)) == expected


def test_to_rgb_float_and_int_modes() -> None:
    f = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert to_rgb(f).getpixel((0, 0)) == (128, 128, 128)
    i = Image.fromarray(np.full((4, 4), 200, dtype=np.int32), mode="I")
    assert to_rgb(i).getpixel((0, 0)) == (200, 200, 200)


def test_jpeg_draft_shrinks_large_images_but_never_below_target() -> None:
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 640, 3), np.uint8))
    data = encode(big, "JPEG", quality=90)
    full = decode_image(data)
    small = decode_image(data, target_size=112)
    assert full.size == (640, 800)
    assert small.size == (160, 200)  # 1/4 scale: both sides still >= 112
    assert min(decode_image(data, target_size=300).size) >= 300
    # PNG has no draft mode: full size regardless
    assert decode_image(encode(big.resize((64, 80)), "PNG"), target_size=16).size == (64, 80)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_image"),
        (b"hello, this is not an image at all", "not_image"),
        (b'{"age": 3}', "not_image"),
        (jpeg(1, 64)[:200], "truncated"),
        (jpeg(2, 64)[:-30], "truncated"),
        (jpeg(3, 64)[:12], "truncated"),
        (encode(Image.new("RGB", (64, 64), 5), "PNG")[:60], "truncated"),
    ],
)
def test_corrupt_bytes_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptImageError) as err:
        decode_image(data, name="sample_7")
    assert err.value.reason == reason
    assert "sample_7" in str(err.value)


def test_to_normalized_tensor_matches_totensor_normalize() -> None:
    from torchvision import transforms as T

    img = decode_image(jpeg(5, 32))
    for name, (mean, std) in (
        ("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("glae", ((0.5,) * 3, (128 / 255,) * 3)),
    ):
        ref = T.Normalize(mean, std)(T.ToTensor()(img))
        out = ToNormalizedTensor(name)(img)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_glae_normalisation_is_x255_minus_127_5_over_128() -> None:
    cfg = DataConfig(image_size=8, normalize="glae")
    for v in (0, 255, 100):
        x = build_eval_transform(cfg)(Image.new("RGB", (8, 8), (v, v, v)))
        assert math.isclose(float(x[0, 0, 0]), (v - 127.5) / 128, abs_tol=1e-6)


def test_unknown_normalisation_fails_with_the_choices() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        ToNormalizedTensor("zscore")


def test_train_transform_shapes_and_randomness() -> None:
    cfg = DataConfig(image_size=32, augment=AugmentConfig(randaugment_n=2, randaugment_m=9))
    t = build_train_transform(cfg)
    img = decode_image(jpeg(9, 48))
    torch.manual_seed(0)
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 32, 32)
    assert a.dtype == torch.float32
    assert not torch.equal(a, b)  # augmented differently


def test_train_transform_without_crop_or_jitter_is_resize() -> None:
    aug = AugmentConfig(
        random_resized_crop=False, hflip=0, brightness=0, contrast=0, saturation=0, hue=0
    )
    cfg = DataConfig(image_size=16, augment=aug)
    img = decode_image(jpeg(4, 40))
    torch.testing.assert_close(build_train_transform(cfg)(img), build_eval_transform(cfg)(img))


def test_train_draft_size_keeps_smallest_crop_at_full_resolution() -> None:
    cfg = DataConfig(image_size=112, augment=AugmentConfig(rrc_scale=(0.64, 1.0)))
    assert train_draft_size(cfg) == 140
    cfg.augment.random_resized_crop = False
    assert train_draft_size(cfg) == 112


def test_preprocess_for_eval_is_the_eval_transform() -> None:
    cfg = DataConfig(image_size=24)
    imgs = [decode_image(jpeg(i, 30 + i)) for i in range(3)] + [Image.new("L", (40, 20), 90)]
    batch = preprocess_for_eval(imgs, cfg)
    assert batch.shape == (4, 3, 24, 24)
    t = build_eval_transform(cfg)
    for i, img in enumerate(imgs):
        torch.testing.assert_close(batch[i], t(to_rgb(img)))
    with pytest.raises(ValueError, match="no images"):
        preprocess_for_eval([], cfg)
