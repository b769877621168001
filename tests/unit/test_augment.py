"""ageray.data.augment: the batched training augmentation against the PIL path it replaces.

Distribution checks are two-sample tests (scipy) between draws of the batched path and of
torchvision's own samplers / the PIL transforms, at a level (p < 1e-4 fails) that a wrong
range, a swapped axis or one draw per batch fails by orders of magnitude (the negative
controls below show it). Seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ageray.config import AugmentConfig, DataConfig
from ageray.data.augment import (
    RANDAUGMENT_OPS,
    BatchAugment,
    augment_generator,
    decode_size,
    randaugment_magnitudes,
)
from ageray.data.transforms import (
    NORMALIZE,
    ToNormalizedTensor,
    build_eval_transform,
    build_train_transform,
)

P_MIN = 1e-4  # two-sample tests fail below this p-value
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def _cfg(size: int = 32, normalize: str = "imagenet", **augment: object) -> DataConfig:
    return DataConfig(image_size=size, normalize=normalize, augment=AugmentConfig(**augment))


def _denormalize(batch: torch.Tensor, normalize: str = "imagenet") -> torch.Tensor:
    mean, std = NORMALIZE[normalize]
    view = (1, 3, 1, 1)
    return batch * torch.tensor(std).view(view) * 255 + torch.tensor(mean).view(view) * 255


def _smooth_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure at several scales (upsampled noise), like faces have."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=generator)
    fine = torch.rand(batch, 3, size, size, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (255 * (0.8 * smooth + 0.2 * fine)).round().to(torch.uint8)


# --------------------------------------------------------------------------------------
# Parameters against torchvision's samplers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "ratio", "size"),
    [((0.8, 1.0), (0.9, 1.1), (40, 40)), ((0.08, 1.0), (3 / 4, 4 / 3), (30, 50))],
)
def test_crop_parameters_follow_torchvision(scale, ratio, size) -> None:
    aug = BatchAugment(_cfg(rrc_scale=scale, rrc_ratio=ratio))
    height, width = size
    ours = aug.sample(3000, size, augment_generator(seed=1, epoch=0, rank=0)).crop
    assert ours is not None
    torch.manual_seed(1)
    image = torch.zeros(3, height, width)
    theirs = torch.tensor(
        [T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(3000)],
        dtype=torch.float64,
    )
    for params in (ours, theirs):  # every crop inside the image
        top, left, crop_h, crop_w = params.unbind(1)
        assert bool(((top >= 0) & (left >= 0) & (top + crop_h <= height)).all())
        assert bool((left + crop_w <= width).all())

    def features(params: torch.Tensor) -> dict[str, np.ndarray]:
        top, left, crop_h, crop_w = params.unbind(1)
        return {
            "scale": (crop_h * crop_w / (height * width)).numpy(),
            "aspect": (crop_w / crop_h).numpy(),
            "top": (top + crop_h / 2).numpy(),
            "left": (left + crop_w / 2).numpy(),
        }

    mine, reference = features(ours), features(theirs)
    for name in mine:
        assert stats.ks_2samp(mine[name], reference[name]).pvalue > P_MIN, name


def test_crop_fallback_is_torchvisions_central_crop() -> None:
    """A ratio range no crop can satisfy: every try fails, torchvision's fallback applies."""
    aug = BatchAugment(_cfg(rrc_scale=(0.9, 1.0), rrc_ratio=(3.0, 4.0)))
    crops = aug.sample(50, (20, 20), augment_generator(seed=0, epoch=0, rank=0)).crop
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(torch.zeros(3, 20, 20), [0.9, 1.0], [3.0, 4.0])
    assert crops is not None and crops.tolist() == [list(map(float, expected))] * 50


def test_flip_rate_and_draws_are_per_sample() -> None:
    for rate in (0.5, 0.2):
        aug = BatchAugment(_cfg(hflip=rate))
        flips = aug.sample(4000, (32, 32), augment_generator(seed=3, epoch=0, rank=0)).flip
        assert stats.binomtest(int(flips.sum()), 4000, rate).pvalue > P_MIN
    # one batch of 64 has both outcomes and 64 different crops: never one draw per batch
    params = BatchAugment(_cfg()).sample(64, (40, 40), augment_generator(seed=0, epoch=0, rank=0))
    assert 0 < int(params.flip.sum()) < 64
    assert params.crop is not None and len({tuple(c) for c in params.crop.tolist()}) > 50
    assert len({tuple(r) for r in params.jitter_order.tolist()}) > 12
    assert params.jitter[:, 0].unique().numel() == 64


def test_jitter_factors_and_order_follow_colorjitter() -> None:
    settings = {"brightness": 0.2, "contrast": 0.3, "saturation": 0.4, "hue": 0.05}
    params = BatchAugment(_cfg(**settings)).sample(
        3000, (32, 32), augment_generator(seed=5, epoch=0, rank=0)
    )
    jitter = T.ColorJitter(**settings)
    torch.manual_seed(5)
    draws = [
        jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for _ in range(3000)
    ]
    theirs = np.array([d[1:] for d in draws], dtype=np.float64)
    for column in range(4):
        assert stats.ks_2samp(params.jitter[:, column].numpy(), theirs[:, column]).pvalue > P_MIN
    # ranges: [1 - v, 1 + v] for the factors, [-h, h] for hue
    low, high = params.jitter.min(0).values, params.jitter.max(0).values
    assert torch.allclose(low, torch.tensor([0.8, 0.7, 0.6, -0.05]), atol=0.01)
    assert torch.allclose(high, torch.tensor([1.2, 1.3, 1.4, 0.05]), atol=0.01)
    # the op order is a uniformly random permutation per sample (24 of them)
    codes = [tuple(r) for r in params.jitter_order.tolist()]
    counts = np.array([codes.count(p) for p in set(codes)])
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > P_MIN
    # disabled ops stay at identity
    off = BatchAugment(_cfg(brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0))
    quiet = off.sample(100, (32, 32), augment_generator(seed=5, epoch=0, rank=0)).jitter
    assert bool((quiet[:, 1:3] == 1).all()) and bool((quiet[:, 3] == 0).all())


def test_randaugment_ops_and_magnitudes_follow_torchvision() -> None:
    aug = BatchAugment(_cfg(size=32, randaugment_n=2, randaugment_m=9))
    params = aug.sample(7000, (32, 32), augment_generator(seed=2, epoch=0, rank=0))
    counts = np.bincount(params.ra_ops.flatten().numpy(), minlength=len(RANDAUGMENT_OPS))
    assert stats.chisquare(counts).pvalue > P_MIN  # uniform over the 14 ops
    # torchvision's RandAugment magnitude table, bin 9 of 31, for a 32 x 32 image
    space = T.RandAugment(num_ops=2, magnitude=9)._augmentation_space(31, (32, 32))
    table = randaugment_magnitudes(9, (32, 32))
    for index, name in enumerate(RANDAUGMENT_OPS):
        values, signed = space[name]
        expected = float(values[9]) if values.ndim > 0 else 0.0
        assert table[name] == pytest.approx(expected, abs=1e-5), name
        drawn = params.ra_magnitudes[params.ra_ops == index]
        assert torch.allclose(drawn.abs(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)
        if signed and expected:
            negative = int((drawn < 0).sum())
            assert stats.binomtest(negative, drawn.numel(), 0.5).pvalue > P_MIN, name
        else:
            assert bool((drawn >= 0).all()), name


# --------------------------------------------------------------------------------------
# Outputs against the PIL path
# --------------------------------------------------------------------------------------


def _ramp_image(size: int) -> np.ndarray:
    """R = 2 x, G = 2 y, B = 128: a crop's box can be read back from its pixels."""
    coords = np.arange(size, dtype=np.float64) * 2
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = coords[None, :]
    image[..., 1] = coords[:, None]
    image[..., 2] = 128
    return image


def _read_boxes(pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Crop width, height, centre and flip from (B, 3, S, S) outputs of the ramp image."""
    out = pixels.double()
    size = out.shape[-1]
    first, last = out[:, 0, size // 2, 0], out[:, 0, size // 2, -1]
    top, bottom = out[:, 1, 0, size // 2], out[:, 1, -1, size // 2]
    span = size / (size - 1) / 2  # pixel centres 0.5 .. S - 0.5 of the output
    width = (last - first).abs() * span
    height = (bottom - top) * span
    # boxes have integer sides and corners: round away the float noise, which would split
    # ties between the two samples at random
    return {
        "scale": np.round((width * height).numpy(), 1),
        "aspect": np.round((width / height).numpy(), 3),
        "center_x": np.round(((first + last) / 4).numpy() * 2) / 2,
        "center_y": np.round(((top + bottom) / 4).numpy() * 2) / 2,
        "flip": (last < first).numpy().astype(np.float64),
    }


def test_crops_and_flips_match_the_pil_path_on_pixels() -> None:
    """End to end through pixels: the boxes read back from the outputs of the batched path
    and of ``build_train_transform`` (PIL) have the same distributions."""
    size = 32
    cfg = _cfg(size=size, rrc_scale=(0.5, 1.0), rrc_ratio=(0.75, 1.33), hflip=0.3, **NO_JITTER)
    source = decode_size(cfg)  # what device-mode workers decode to
    ramp = _ramp_image(source)
    pil_path = build_train_transform(cfg)
    torch.manual_seed(0)
    pil_image = Image.fromarray(ramp)
    theirs = _denormalize(torch.stack([pil_path(pil_image) for _ in range(1500)]))
    images = torch.from_numpy(ramp).permute(2, 0, 1).unsqueeze(0).expand(1500, 3, source, source)
    aug = BatchAugment(cfg)
    ours = _denormalize(aug(images.contiguous(), augment_generator(seed=0, epoch=0, rank=0)))
    mine, reference = _read_boxes(ours), _read_boxes(theirs)
    for name in ("scale", "aspect", "center_x", "center_y"):
        assert stats.ks_2samp(mine[name], reference[name]).pvalue > P_MIN, name
    assert abs(mine["flip"].mean() - 0.3) < 0.05 and abs(reference["flip"].mean() - 0.3) < 0.05
    # negative control: a crop twice as large on one side is told apart
    wrong = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, rrc_ratio=(1.2, 2)))
    skewed = _denormalize(
        BatchAugment(wrong)(images.contiguous(), augment_generator(seed=0, epoch=0, rank=0))
    )
    assert stats.ks_2samp(_read_boxes(skewed)["aspect"], reference["aspect"]).pvalue < P_MIN


def test_color_jitter_matches_the_pil_path_on_pixels() -> None:
    """Two-colour patches through brightness, contrast and saturation in random order:
    per-channel output distributions of the batched and the PIL path agree; a doubled
    saturation range does not. (Hue is checked against torchvision's float op below: PIL
    turns the hue in whole 1/255 steps, a grid the KS test would see.)"""
    cfg = _cfg(
        size=16,
        random_resized_crop=False,
        hflip=0.0,
        brightness=0.2,
        contrast=0.3,
        saturation=0.4,
        hue=0.0,
    )
    patch = np.zeros((16, 16, 3), dtype=np.uint8)
    patch[:8] = (180, 90, 40)  # two colours, so contrast (image mean) differs from saturation
    patch[8:] = (40, 120, 200)
    pil_path = build_train_transform(cfg)
    torch.manual_seed(0)
    theirs = _denormalize(torch.stack([pil_path(Image.fromarray(patch)) for _ in range(1500)]))
    images = torch.from_numpy(patch).permute(2, 0, 1).unsqueeze(0).expand(1500, 3, 16, 16)

    def batched(config: DataConfig) -> torch.Tensor:
        generator = augment_generator(seed=0, epoch=0, rank=0)
        return _denormalize(BatchAugment(config)(images.contiguous(), generator)).round()

    ours = batched(cfg)
    for row, channel in ((0, 0), (0, 1), (0, 2), (12, 0), (12, 1), (12, 2)):
        mine, reference = ours[:, channel, row, 0].numpy(), theirs[:, channel, row, 0].numpy()
        assert stats.ks_2samp(mine, reference).pvalue > P_MIN, (row, channel)
    doubled = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, saturation=0.8))
    wide = batched(doubled)
    assert stats.ks_2samp(wide[:, 0, 0, 0].numpy(), theirs[:, 0, 0, 0].numpy()).pvalue < P_MIN


def test_hue_equals_torchvisions_adjust_hue() -> None:
    cfg = _cfg(size=24, random_resized_crop=False, hflip=0.0, **{**NO_JITTER, "hue": 0.3})
    images = _smooth_images(16, 24)
    images[3, :, :4] = 0  # achromatic pixels keep their value
    images[3, :, 4:8] = 200
    aug = BatchAugment(cfg)
    params = aug.sample(16, (24, 24), augment_generator(seed=4, epoch=0, rank=0))
    ours = _denormalize(aug.apply(images, params))
    for row in range(16):
        shift = float(params.jitter[row, 3])
        expected = TF.adjust_hue(images[row].float() / 255, shift) * 255
        assert torch.allclose(ours[row], expected, atol=0.05), row


def _torchvision_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """torchvision RandAugment's ``_apply_op`` dispatch, written out with public functions."""
    nearest = InterpolationMode.NEAREST
    if name == "ShearX":
        shear = [math.degrees(math.atan(magnitude)), 0.0]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, interpolation=nearest, center=[0, 0])
    if name == "ShearY":
        shear = [0.0, math.degrees(math.atan(magnitude))]
        return TF.affine(image, 0.0, [0, 0], 1.0, shear, interpolation=nearest, center=[0, 0])
    if name == "TranslateX":
        return TF.affine(image, 0.0, [int(magnitude), 0], 1.0, [0.0, 0.0], interpolation=nearest)
    if name == "TranslateY":
        return TF.affine(image, 0.0, [0, int(magnitude)], 1.0, [0.0, 0.0], interpolation=nearest)
    if name == "Rotate":
        return TF.rotate(image, magnitude, interpolation=nearest)
    if name == "Brightness":
        return TF.adjust_brightness(image, 1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(image, 1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(image, 1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(image, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(image, int(magnitude))
    if name == "Solarize":
        return TF.solarize(image, magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(image)
    if name == "Equalize":
        return TF.equalize(image)
    return image


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_randaugment_op_equals_torchvisions(name: str) -> None:
    """Every sample of a batch gets op ``name`` with its own sign; the result equals
    torchvision's op on each image alone (uint8 rounding apart; nearest-neighbour warps may
    differ on a few boundary pixels)."""
    size, batch = 40, 8
    images = _smooth_images(batch, size)
    images[1] = 77  # a flat image: equalize/autocontrast leave it alone
    cfg = _cfg(size=size, normalize="glae", random_resized_crop=False, hflip=0.0, **NO_JITTER)
    cfg = dataclasses.replace(
        cfg, augment=dataclasses.replace(cfg.augment, randaugment_n=1, randaugment_m=9)
    )
    aug = BatchAugment(cfg)
    params = aug.sample(batch, (size, size), augment_generator(seed=0, epoch=0, rank=0))
    params.ra_ops[:] = RANDAUGMENT_OPS.index(name)
    magnitude = randaugment_magnitudes(9, (size, size))[name]
    signs = torch.tensor([1.0, -1.0] * (batch // 2), dtype=torch.float64)
    params.ra_magnitudes[:, 0] = magnitude * (signs if name in _signed() else 1.0)
    ours = _denormalize(aug.apply(images, params), "glae")
    theirs = torch.stack(
        [
            _torchvision_op(images[i], name, float(params.ra_magnitudes[i, 0])).float()
            for i in range(batch)
        ]
    )
    diff = (ours - theirs).abs()
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert float((diff > 1.5).float().mean()) < 0.01, name
    else:
        assert float(diff.max()) <= 1.5, (name, float(diff.max()))
        assert float(diff.mean()) <= 0.6, name


def _signed() -> set[str]:
    space = T.RandAugment()._augmentation_space(31, (32, 32))
    return {name for name, (_, signed) in space.items() if signed}


# --------------------------------------------------------------------------------------
# Determinism, dtypes, evaluation unchanged, errors
# --------------------------------------------------------------------------------------


def test_same_seed_same_batch_ranks_and_epochs_differ() -> None:
    cfg = _cfg(size=24, randaugment_n=2)
    images = _smooth_images(6, decode_size(cfg))
    aug = BatchAugment(cfg)

    def run(**seeds: int) -> torch.Tensor:
        return aug(images, augment_generator(**seeds))

    first = run(seed=7, epoch=1, rank=0)
    assert torch.equal(first, run(seed=7, epoch=1, rank=0))
    assert not torch.equal(first, run(seed=7, epoch=1, rank=1))
    assert not torch.equal(first, run(seed=7, epoch=2, rank=0))
    generator = augment_generator(seed=7, epoch=1, rank=0)
    assert not torch.equal(aug(images, generator), aug(images, generator))  # state advances


def test_shapes_dtypes_and_float_input() -> None:
    cfg = _cfg(size=24)
    images = _smooth_images(5, 30)
    aug = BatchAugment(cfg)
    out = aug(images, augment_generator(seed=0, epoch=0, rank=0))
    assert out.shape == (5, 3, 24, 24) and out.dtype == torch.float32 and out.is_contiguous()
    from_float = aug(images.float() / 255, augment_generator(seed=0, epoch=0, rank=0))
    assert torch.allclose(out, from_float, atol=1e-4)
    assert decode_size(cfg) == math.ceil(24 / math.sqrt(0.8))
    assert decode_size(_cfg(size=24, random_resized_crop=False)) == 24


def test_untouched_images_equal_the_eval_preprocessing_bit_for_bit() -> None:
    """With every op off the batched path is only the normalisation, bit-identical to the
    worker-mode finisher and to ``build_eval_transform`` (which stays what eval uses)."""
    cfg = _cfg(size=20, normalize="glae", random_resized_crop=False, hflip=0.0, **NO_JITTER)
    images = _smooth_images(4, 20)
    out = BatchAugment(cfg)(images, augment_generator(seed=0, epoch=0, rank=0))
    assert torch.equal(out, ToNormalizedTensor("glae").normalize_uint8(images))
    evaluate = build_eval_transform(cfg)
    for row, image in zip(out, images):
        assert torch.equal(row, evaluate(Image.fromarray(image.permute(1, 2, 0).numpy())))
    # flips only: the flipped rows are exact mirror images of the unflipped result
    flipping = _cfg(size=20, random_resized_crop=False, hflip=0.5, **NO_JITTER)
    params = BatchAugment(flipping).sample(4, (20, 20), augment_generator(seed=1, epoch=0, rank=0))
    flipped = BatchAugment(flipping).apply(images, params)
    plain = ToNormalizedTensor("imagenet").normalize_uint8(images)
    for row in range(4):
        expected = plain[row].flip(-1) if params.flip[row] else plain[row]
        assert torch.equal(flipped[row], expected)


def test_bad_input_and_settings_name_the_problem() -> None:
    aug = BatchAugment(_cfg())
    generator = augment_generator(seed=0, epoch=0, rank=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), generator)
    with pytest.raises(ValueError, match="uint8 or float"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int32), generator)
    with pytest.raises(ValueError, match="randaugment_m=40"):
        BatchAugment(_cfg(randaugment_n=2, randaugment_m=40))
    with pytest.raises(ValueError, match="hflip"):
        BatchAugment(_cfg(hflip=1.5))
    with pytest.raises(ValueError, match="rrc_scale"):
        BatchAugment(_cfg(rrc_scale=(0.9, 0.5)))


# --------------------------------------------------------------------------------------
# The loader in device mode
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from datagen import make_records

    from ageray.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards")
    write_shards(
        iter(make_records(48, size=40)),
        out,
        splits={"train": 0.75, "test": 0.25},
        max_count=12,
        workers=1,
        progress=False,
    )
    return str(out)


def _loader_cfg(shards: str, **data: object) -> DataConfig:
    augment = AugmentConfig(randaugment_n=2, hue=0.05)
    return dataclasses.replace(
        _cfg(size=32), shards=shards, batch_size=8, eval_batch_size=5, num_workers=0,
        augment=augment, **data,
    )  # fmt: skip


def test_device_mode_workers_decode_and_the_loader_augments(tiny_shards: str) -> None:
    from ageray.data.loader import train_loader

    cfg = _loader_cfg(tiny_shards, augment_on="device")

    def first_batch(**where: int) -> torch.Tensor:
        loader = train_loader(cfg, "train", multiprocessing_context=None, **where)
        return next(iter(loader))["image"]

    batch = first_batch(epoch=0, rank=0, world_size=1, seed=3)
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch, first_batch(epoch=0, rank=0, world_size=1, seed=3))
    assert not torch.equal(batch, first_batch(epoch=1, rank=0, world_size=1, seed=3))
    # the stream itself (which images, in which order) is the worker-mode stream
    worker = train_loader(
        dataclasses.replace(cfg, augment_on="worker"), "train", multiprocessing_context=None,
        seed=3,
    )  # fmt: skip
    device = train_loader(cfg, "train", multiprocessing_context=None, seed=3)
    assert next(iter(worker))["key"] == next(iter(device))["key"]


def test_eval_batches_are_the_same_in_both_modes(tiny_shards: str) -> None:
    from ageray.data.loader import eval_loader

    def batches(mode: str) -> list[dict]:
        cfg = _loader_cfg(tiny_shards, augment_on=mode)
        return list(eval_loader(cfg, "test", multiprocessing_context=None))

    worker, device = batches("worker"), batches("device")
    assert [b["key"] for b in worker] == [b["key"] for b in device]
    for a, b in zip(worker, device):
        assert torch.equal(a["image"], b["image"])


def test_auto_dataloader_workers_share_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    from ageray.data.loader import dataloader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dataloader_workers("auto") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dataloader_workers("auto") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataloader_workers("auto") == 1
    assert dataloader_workers(0) == 0 and dataloader_workers("2") == 2
