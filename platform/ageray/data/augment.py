"""The recipes' training augmentation as batched tensor ops, on any device.

Why: with ``data.augment_on: device`` the DataLoader workers only decode (uint8, one fixed
size) and the augmentation runs here on the whole batch, on the training device. On a GPU
node that frees the CPU cores that otherwise cap the images/s; on a CPU it replaces ~10 PIL
calls per image by a few vectorised passes per batch.

The ops and their parameter distributions are those of the PIL path
(``ageray.data.transforms.build_train_transform``, torchvision's transforms):

1. ``RandomResizedCrop(image_size, scale=rrc_scale, ratio=rrc_ratio)``: torchvision's
   sampler (10 tries of area and log-aspect, then the central fallback), vectorised. The
   crop, its resize and the horizontal flip are ONE affine ``grid_sample`` for the whole
   batch (bilinear, edge-replicating like ``F.interpolate``). Without RRC: a square resize
   (done by the worker, which decodes at ``decode_size``) and the flip.
2. ``RandomHorizontalFlip(hflip)``.
3. ``ColorJitter(brightness, contrast, saturation, hue)``: factors from the same ranges and a
   random order of the four ops, per sample. Brightness, contrast and saturation are blends
   (``clamp(a * x + d * gray + c)`` with per-sample a, c, d), so one fused pass per order
   slot covers every sample, whatever op it drew there; hue (an HSV rotation that keeps
   max and min of each pixel) runs on the samples that drew it.
4. ``RandAugment(num_ops=randaugment_n, magnitude=randaugment_m)``: torchvision's 14 ops
   with its magnitude bins (31) and random signs; shear/translate/rotate as one nearest
   ``grid_sample`` per op slot (zero fill, torchvision's tensor geometry), the colour ops as
   in torchvision's tensor functional, Equalize with batched 256-bin histograms.
5. Normalisation, ``(x - 255 mean) / (255 std)`` on 0..255 values: the exact operations of
   ``ToNormalizedTensor.normalize_uint8``, so an image no op touched is bit-identical to
   what worker mode and evaluation give.

Randomness: every parameter is drawn per sample (never one draw per batch) on the CPU from a
``torch.Generator`` the caller owns (``augment_generator(seed=, epoch=, rank=)``: one per
rank and epoch, so a resumed epoch repeats its draws), then moved to the images' device.
Drawing on the CPU makes the parameters independent of the device (CPU and GPU give the
same crops for the same seed) and lets the per-op sample subsets be chosen without a device
sync. Work is in float32 on the 0..255 scale; the PIL path rounds to uint8 after each op,
this one does not (differences of at most about one grey level per op).

Input: uint8 (B, 3, H, W), or float in [0, 1] (torchvision's convention), square images of
one size (``decode_size(cfg)``). Output: normalised float32 (B, 3, S, S). Evaluation never
comes here: it keeps ``build_eval_transform`` (resize + normalise), unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .transforms import NORMALIZE, ToNormalizedTensor, train_draft_size

if TYPE_CHECKING:
    from PIL import Image

    from ageray.config import AugmentConfig, DataConfig

__all__ = [
    "RANDAUGMENT_OPS",
    "AugmentParams",
    "BatchAugment",
    "DeviceAugmenter",
    "augment_generator",
    "build_decode_transform",
    "decode_size",
    "randaugment_magnitudes",
]

#: torchvision.transforms.RandAugment's op space, in its order (the op index is drawn
#: uniformly over this list, as torchvision does).
RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
_SIGNED = frozenset(RANDAUGMENT_OPS[1:10])
_GEOMETRIC = frozenset(RANDAUGMENT_OPS[1:6])
_NUM_BINS = 31  # torchvision's num_magnitude_bins default
_RRC_TRIES = 10  # torchvision's RandomResizedCrop.get_params
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, PIL's convert("L") (ImageEnhance)
# ColorJitter op order indices (torchvision's fn_idx)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def decode_size(cfg: DataConfig) -> int:
    """The square size DataLoader workers decode training images to in device mode.

    With RandomResizedCrop it is ``train_draft_size``: the smallest crop (area
    ``rrc_scale[0]``) is then still about ``image_size`` pixels wide, so crops are resized by
    at most ~1/sqrt(scale) and bilinear sampling needs no antialiasing. Without RRC the
    worker resizes straight to ``image_size``, as the PIL path does.
    """
    if cfg.augment.random_resized_crop:
        return train_draft_size(cfg)
    return int(cfg.image_size)


def build_decode_transform(cfg: DataConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Device mode's per-image work in a DataLoader worker: a square resize to
    ``decode_size(cfg)`` and the normalising finisher, whose uint8 half
    (``ToNormalizedTensor.to_uint8``) is what the batching stage writes; the augmentation
    runs later on the batch (:class:`DeviceAugmenter`)."""
    from torchvision import transforms as T

    size = decode_size(cfg)
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return T.Compose([resize, ToNormalizedTensor(cfg.normalize)])


def augment_generator(*, seed: int, epoch: int, rank: int) -> torch.Generator:
    """The CPU generator of one rank's device augmentation for one epoch.

    Seeded from (seed, epoch, rank) only, so ranks draw different crops, a resumed epoch
    draws the same ones again, and DataLoader worker counts do not matter.
    """
    generator = torch.Generator(device="cpu")
    mixed = (int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(rank)
    generator.manual_seed(mixed % (2**63 - 1))
    return generator


def randaugment_magnitudes(magnitude: int, size: tuple[int, int]) -> dict[str, float]:
    """``{op: |magnitude|}`` of torchvision's RandAugment for bin ``magnitude`` of 31 and an
    image of ``size`` = (height, width) (translations scale with the image)."""
    if not 0 <= magnitude < _NUM_BINS:
        raise ValueError(
            f"data.augment.randaugment_m={magnitude} must be in 0..{_NUM_BINS - 1} "
            "(torchvision's 31 magnitude bins)"
        )
    height, width = size
    frac = magnitude / (_NUM_BINS - 1)
    return {
        "Identity": 0.0,
        "ShearX": 0.3 * frac,
        "ShearY": 0.3 * frac,
        "TranslateX": 150.0 / 331.0 * width * frac,
        "TranslateY": 150.0 / 331.0 * height * frac,
        "Rotate": 30.0 * frac,
        "Brightness": 0.9 * frac,
        "Color": 0.9 * frac,
        "Contrast": 0.9 * frac,
        "Sharpness": 0.9 * frac,
        "Posterize": float(8 - round(magnitude / ((_NUM_BINS - 1) / 4))),
        "Solarize": 255.0 * (1.0 - frac),
        "AutoContrast": 0.0,
        "Equalize": 0.0,
    }


@dataclass
class AugmentParams:
    """Per-sample random parameters of one batch (CPU tensors, B rows).

    ``crop`` (B, 4) float64 ``top, left, height, width`` in input pixels (None without
    RRC); ``flip`` (B,) bool; ``jitter`` (B, 4) brightness, contrast, saturation and hue
    factors (identity values for disabled ops) and ``jitter_order`` (B, 4) the op index at
    each slot; ``ra_ops`` (B, N) indices into ``RANDAUGMENT_OPS`` and ``ra_magnitudes``
    (B, N) signed magnitudes.
    """

    crop: torch.Tensor | None
    flip: torch.Tensor
    jitter: torch.Tensor
    jitter_order: torch.Tensor
    ra_ops: torch.Tensor
    ra_magnitudes: torch.Tensor


def _range(value: float, *, center: float, name: str) -> tuple[float, float] | None:
    """ColorJitter's ``_check_input`` for a number: [center - v, center + v] (clipped at 0
    for the multiplicative factors), None when it is the identity."""
    if value < 0:
        raise ValueError(f"data.augment.{name}={value} must be >= 0")
    if name == "hue":
        if value > 0.5:
            raise ValueError(f"data.augment.hue={value} must be in [0, 0.5]")
        return None if value == 0 else (-value, value)
    low, high = max(0.0, center - value), center + value
    return None if low == high == center else (low, high)


class BatchAugment:
    """``augment(images, generator) -> normalised (B, 3, S, S) float32`` for one recipe.

    ``cfg`` is the run's ``DataConfig`` (``image_size``, ``normalize``, ``augment``).
    ``sample(batch, size, generator)`` draws the parameters and ``apply(images, params)``
    runs them; ``__call__`` does both. Stateless between batches.
    """

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.normalize not in NORMALIZE:
            raise ValueError(f"data.normalize={cfg.normalize!r} is not one of {sorted(NORMALIZE)}")
        aug: AugmentConfig = cfg.augment
        self.size = int(cfg.image_size)
        self.input_size = decode_size(cfg)
        self.rrc = bool(aug.random_resized_crop)
        scale, ratio = tuple(map(float, aug.rrc_scale)), tuple(map(float, aug.rrc_ratio))
        if self.rrc and not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(
                f"data.augment.rrc_scale={list(scale)} / rrc_ratio={list(ratio)}: need "
                "0 < scale_min <= scale_max <= 1 and 0 < ratio_min <= ratio_max"
            )
        self.scale, self.ratio = scale, ratio
        if not 0.0 <= aug.hflip <= 1.0:
            raise ValueError(f"data.augment.hflip={aug.hflip} must be a probability in [0, 1]")
        self.hflip = float(aug.hflip)
        self.jitter_ranges = (
            _range(aug.brightness, center=1.0, name="brightness"),
            _range(aug.contrast, center=1.0, name="contrast"),
            _range(aug.saturation, center=1.0, name="saturation"),
            _range(aug.hue, center=0.0, name="hue"),
        )
        self.jitter = any(r is not None for r in self.jitter_ranges)
        if aug.randaugment_n < 0:
            raise ValueError(f"data.augment.randaugment_n={aug.randaugment_n} must be >= 0")
        self.ra_num_ops = int(aug.randaugment_n)
        self.ra_magnitude = int(aug.randaugment_m)
        if self.ra_num_ops:
            randaugment_magnitudes(self.ra_magnitude, (self.size, self.size))  # validates m
        mean, std = NORMALIZE[cfg.normalize]
        self._mean255 = torch.tensor(mean, dtype=torch.float32).mul(255.0).view(1, 3, 1, 1)
        self._std255 = torch.tensor(std, dtype=torch.float32).mul(255.0).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"BatchAugment(size={self.size}, input_size={self.input_size}, rrc={self.rrc}, "
            f"scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"jitter={self.jitter_ranges}, randaugment=({self.ra_num_ops}, {self.ra_magnitude}))"
        )

    # ------------------------------------------------------------------ parameters

    def sample(
        self, batch: int, size: tuple[int, int], generator: torch.Generator
    ) -> AugmentParams:
        """Per-sample parameters for ``batch`` images of ``size`` = (height, width)."""
        crop = self._sample_crops(batch, size, generator) if self.rrc else None
        flip = torch.rand(batch, generator=generator) < self.hflip
        jitter = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(batch, 1)
        order = torch.arange(4).repeat(batch, 1)
        if self.jitter:
            order = torch.rand(batch, 4, generator=generator).argsort(dim=1)
            draws = torch.rand(batch, 4, generator=generator)
            for column, bounds in enumerate(self.jitter_ranges):
                if bounds is not None:
                    jitter[:, column] = bounds[0] + (bounds[1] - bounds[0]) * draws[:, column]
        ops = torch.zeros(batch, self.ra_num_ops, dtype=torch.long)
        mags = torch.zeros(batch, self.ra_num_ops, dtype=torch.float64)
        if self.ra_num_ops:
            ops = torch.randint(len(RANDAUGMENT_OPS), (batch, self.ra_num_ops), generator=generator)
            signs = torch.randint(2, (batch, self.ra_num_ops), generator=generator)
            table = randaugment_magnitudes(self.ra_magnitude, (self.size, self.size))
            values = torch.tensor([table[name] for name in RANDAUGMENT_OPS], dtype=torch.float64)
            signed = torch.tensor([name in _SIGNED for name in RANDAUGMENT_OPS])
            mags = values[ops]
            mags = torch.where(signed[ops] & (signs == 1), -mags, mags)
        return AugmentParams(crop, flip, jitter, order, ops, mags)

    def _sample_crops(
        self, batch: int, size: tuple[int, int], generator: torch.Generator
    ) -> torch.Tensor:
        """torchvision's ``RandomResizedCrop.get_params`` for every row at once: up to 10
        (area, log-aspect) tries, the first that fits wins; otherwise the central crop with
        the aspect ratio clamped into ``ratio``."""
        height, width = size
        area = float(height * width)
        tries = (batch, _RRC_TRIES)
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(
            tries, generator=generator, dtype=torch.float64
        )
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(
            log_lo + (log_hi - log_lo) * torch.rand(tries, generator=generator, dtype=torch.float64)
        )
        target = area * scale
        crop_w = torch.round(torch.sqrt(target * aspect))
        crop_h = torch.round(torch.sqrt(target / aspect))
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
        any_fit = fits.any(dim=1)
        crop_w = crop_w.gather(1, first).squeeze(1)
        crop_h = crop_h.gather(1, first).squeeze(1)
        # the fallback: whole image, aspect clamped into the ratio range, centred
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fallback_w, fallback_h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fallback_w, fallback_h = round(height * self.ratio[1]), height
        else:
            fallback_w, fallback_h = width, height
        crop_w = torch.where(any_fit, crop_w, float(fallback_w))
        crop_h = torch.where(any_fit, crop_h, float(fallback_h))
        offsets = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
        top = torch.floor(offsets[:, 0] * (height - crop_h + 1))
        left = torch.floor(offsets[:, 1] * (width - crop_w + 1))
        top = torch.where(any_fit, top, float((height - fallback_h) // 2))
        left = torch.where(any_fit, left, float((width - fallback_w) // 2))
        return torch.stack([top, left, crop_h, crop_w], dim=1)

    # ------------------------------------------------------------------ applying

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        params = self.sample(images.shape[0], (images.shape[-2], images.shape[-1]), generator)
        return self.apply(images, params)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment and normalise ``images`` (uint8, or float in [0, 1]) with ``params``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"BatchAugment expects images of shape (B, 3, H, W), got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            pixels = images.to(torch.float32)
        elif images.is_floating_point():
            pixels = images.to(torch.float32).mul(255.0)
        else:
            raise ValueError(f"BatchAugment: images must be uint8 or float, got {images.dtype}")
        device = pixels.device
        pixels = self._geometry(pixels, params, device)
        if self.jitter:
            pixels = self._color_jitter(pixels, params, device)
        for slot in range(self.ra_num_ops):
            pixels = self._randaugment_slot(pixels, params, slot, device)
        return pixels.sub_(self._mean255.to(device)).div_(self._std255.to(device))

    def _geometry(
        self, pixels: torch.Tensor, params: AugmentParams, device: torch.device
    ) -> torch.Tensor:
        """Crop + resize + flip as one bilinear ``grid_sample``; without RRC a resize (only
        if the input is not already ``image_size``) and a flip of the drawn rows."""
        batch, _, height, width = pixels.shape
        if params.crop is not None:
            top, left, crop_h, crop_w = params.crop.unbind(1)
            # output pixel centre u in [0, S) samples input x = left + (u + 0.5) w / S - 0.5,
            # F.interpolate's (align_corners=False) rule; in grid_sample's normalised
            # coordinates that is x_n = (w / W) u_n + (2 left + w) / W - 1.
            # The map is axis-aligned, so the grid is built from two (B, S) coordinate rows
            # (F.affine_grid's general 3x3 product costs ~10x more on a CPU).
            scale_x = torch.where(params.flip, -crop_w, crop_w) / width
            shift_x = (2 * left + crop_w) / width - 1
            scale_y = crop_h / height
            shift_y = (2 * top + crop_h) / height - 1
            base = (torch.arange(self.size, dtype=torch.float64) * 2 + 1) / self.size - 1
            grid_x = (scale_x[:, None] * base + shift_x[:, None]).to(device, torch.float32)
            grid_y = (scale_y[:, None] * base + shift_y[:, None]).to(device, torch.float32)
            grid = torch.empty(batch, self.size, self.size, 2, device=device)
            grid[..., 0] = grid_x[:, None, :]
            grid[..., 1] = grid_y[:, :, None]
            return F.grid_sample(
                pixels, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
        if (height, width) != (self.size, self.size):
            pixels = F.interpolate(
                pixels, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        rows = params.flip.nonzero().squeeze(1)
        if rows.numel():
            rows = rows.to(device)
            pixels.index_copy_(0, rows, pixels.index_select(0, rows).flip(-1))
        return pixels

    def _color_jitter(
        self, pixels: torch.Tensor, params: AugmentParams, device: torch.device
    ) -> torch.Tensor:
        """ColorJitter's four ops in each sample's own order.

        At order slot k every sample applies the op it drew there. Brightness (f x),
        contrast (f x + (1 - f) mean(gray)) and saturation (f x + (1 - f) gray) are all
        ``clamp(a x + d gray + c)`` with per-sample scalars, so one fused pass applies
        whichever of the three each sample drew (a = 1, c = d = 0 for the others); hue then
        runs on the rows that drew it at this slot.
        """
        factors = params.jitter.to(torch.float32)
        enabled = [bounds is not None for bounds in self.jitter_ranges]
        for slot in range(4):
            op = params.jitter_order[:, slot]
            rows = [(op == index) & enabled[index] for index in range(4)]
            if bool(rows[_BRIGHTNESS].any() | rows[_CONTRAST].any() | rows[_SATURATION].any()):
                pixels = _blend_slot(pixels, factors, rows, device)
            if rows[_HUE].any():
                pixels = self._on_rows(pixels, rows[_HUE], factors[:, _HUE], _adjust_hue, device)
        return pixels

    def _on_rows(
        self,
        pixels: torch.Tensor,
        rows: torch.Tensor,
        values: torch.Tensor,
        op: object,
        device: torch.device,
    ) -> torch.Tensor:
        """Apply ``op(pixels[rows], values[rows])`` to the chosen rows only."""
        index = rows.nonzero().squeeze(1)
        if index.numel() == pixels.shape[0]:
            return op(pixels, values.to(device))  # type: ignore[operator]
        on_device = index.to(device)
        part = op(pixels.index_select(0, on_device), values[index].to(device))  # type: ignore[operator]
        return pixels.index_copy_(0, on_device, part)

    def _randaugment_slot(
        self, pixels: torch.Tensor, params: AugmentParams, slot: int, device: torch.device
    ) -> torch.Tensor:
        """One of RandAugment's N ops for every sample: geometric ones in one nearest
        ``grid_sample``, each colour op on the rows that drew it."""
        ops = params.ra_ops[:, slot]
        mags = params.ra_magnitudes[:, slot]
        geometric = torch.zeros_like(ops, dtype=torch.bool)
        for name in _GEOMETRIC:
            geometric |= ops == RANDAUGMENT_OPS.index(name)
        if geometric.any():
            theta = _randaugment_theta(ops, mags, pixels.shape[-2], pixels.shape[-1])
            pixels = self._on_rows(pixels, geometric, theta, _warp_nearest, device)
        for index, name in enumerate(RANDAUGMENT_OPS):
            if name in _GEOMETRIC or name == "Identity":
                continue
            rows = ops == index
            if rows.any():
                pixels = self._on_rows(
                    pixels, rows, mags.to(torch.float32), _COLOR_OPS[name], device
                )
        return pixels


# --------------------------------------------------------------------------------------
# Ops on float 0..255 batches (B, 3, H, W); ``values`` is (B,) on the same device
# --------------------------------------------------------------------------------------


def _gray(pixels: torch.Tensor, weights: Sequence[float] = _GRAY) -> torch.Tensor:
    """(B, 1, H, W) weighted sum of the channels."""
    red, green, blue = pixels.unbind(1)
    gray = red * weights[0]
    gray.add_(green, alpha=weights[1]).add_(blue, alpha=weights[2])
    return gray.unsqueeze(1)


def _blend_slot(
    pixels: torch.Tensor, factors: torch.Tensor, rows: list[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """One ColorJitter slot's brightness / contrast / saturation rows in one pass:
    ``clamp(a x + d gray + c)``; the gray image and its mean are those of the input."""
    view = (-1, 1, 1, 1)
    bright, contrast, saturation = rows[_BRIGHTNESS], rows[_CONTRAST], rows[_SATURATION]
    scale = torch.ones(factors.shape[0])
    for index, chosen in ((_BRIGHTNESS, bright), (_CONTRAST, contrast), (_SATURATION, saturation)):
        scale = torch.where(chosen, factors[:, index], scale)
    has_contrast, has_saturation = bool(contrast.any()), bool(saturation.any())
    gray = _gray(pixels) if has_contrast or has_saturation else None
    offset = None
    if has_contrast and gray is not None:
        weight = torch.where(contrast, 1.0 - factors[:, _CONTRAST], 0.0)
        offset = gray.mean(dim=(-2, -1), keepdim=True).mul_(weight.to(device).view(view))
    pixels = pixels.mul_(scale.to(device).view(view))
    if has_saturation and gray is not None:
        weight = torch.where(saturation, 1.0 - factors[:, _SATURATION], 0.0)
        pixels.add_(gray.mul_(weight.to(device).view(view)))
    if offset is not None:
        pixels.add_(offset)
    return pixels.clamp_(0.0, 255.0)


def _scalar_blend(pixels: torch.Tensor, factor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: clamp(f x + (1 - f) other) per sample."""
    view = (-1, 1, 1, 1)
    factor = factor.view(view)
    return (pixels * factor).add_(other * (1.0 - factor)).clamp_(0.0, 255.0)


def _adjust_hue(pixels: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn), per sample.

    A hue rotation keeps each pixel's max (V) and min, so with chroma c = max - min and
    h6 = 6 h' in [0, 6) the new channel n in (r=5, g=3, b=1) is ``max - c w``,
    ``w = clamp(2 - |((n + h6) mod 6) - 2|, 0, 1)`` (the closed form of HSV -> RGB, equal to
    torchvision's sector table). Written as in-place passes over one reused plane: this op
    is the costliest of ColorJitter on a CPU.
    """
    red, green, blue = pixels.unbind(1)
    high = pixels.amax(dim=1)
    chroma = high - pixels.amin(dim=1)
    # 6h relative to the max channel: one numerator per sector, one division
    numerator = torch.where(
        high == red,
        green - blue,
        torch.where(
            high == green,
            (blue - red).add_(chroma, alpha=2.0),
            (red - green).add_(chroma, alpha=4.0),
        ),
    )
    hue6 = numerator.div_(chroma.clamp(min=1e-6)).add_(6.0 * shift.view(-1, 1, 1))
    out = torch.empty_like(pixels)
    weight = torch.empty_like(hue6)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        torch.add(hue6, offset, out=weight).remainder_(6.0).sub_(2.0).abs_()
        weight.neg_().add_(2.0).clamp_(0.0, 1.0)
        out[:, channel].copy_(high).addcmul_(chroma, weight, value=-1.0)
    return out


def _brightness(pixels: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return pixels.mul_((1.0 + magnitude).view(-1, 1, 1, 1)).clamp_(0.0, 255.0)


def _color(pixels: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    return _scalar_blend(pixels, 1.0 + magnitude, _gray(pixels, _GRAY))


def _contrast(pixels: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    mean = _gray(pixels, _GRAY).mean(dim=(-3, -2, -1), keepdim=True)
    return _scalar_blend(pixels, 1.0 + magnitude, mean)


def _sharpness(pixels: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_sharpness``: blend with a 3x3 smoothed copy (centre weight 5
    of 13) whose one-pixel border is the original."""
    channels, height, width = pixels.shape[1:]
    if height <= 2 or width <= 2:
        return pixels
    kernel = torch.ones(3, 3, dtype=pixels.dtype, device=pixels.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    degenerate = pixels.clone()
    degenerate[..., 1:-1, 1:-1] = F.conv2d(pixels, kernel, groups=channels)
    return _scalar_blend(pixels, 1.0 + magnitude, degenerate)


def _posterize(pixels: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = torch.pow(2.0, 8.0 - bits).view(-1, 1, 1, 1)
    return pixels.div_(step).floor_().mul_(step)


def _solarize(pixels: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(pixels >= threshold.view(-1, 1, 1, 1), 255.0 - pixels, pixels)


def _autocontrast(pixels: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    low = pixels.amin(dim=(-2, -1), keepdim=True)
    high = pixels.amax(dim=(-2, -1), keepdim=True)
    flat = high <= low
    scale = torch.where(flat, torch.ones_like(high), 255.0 / (high - low).clamp_min(1e-12))
    low = torch.where(flat, torch.zeros_like(low), low)
    return pixels.sub_(low).mul_(scale).clamp_(0.0, 255.0)


def _equalize(pixels: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """PIL's / torchvision's equalize per image and channel, batched: 256-bin histograms by
    scatter_add, the step from all but the last non-empty bin, the shifted cumulative LUT;
    channels with step 0 are left as they are."""
    batch, channels, height, width = pixels.shape
    levels = pixels.round().clamp_(0, 255).to(torch.int64).view(batch * channels, -1)
    hist = torch.zeros(batch * channels, 256, dtype=torch.int64, device=pixels.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    last = 255 - (hist.flip(1) > 0).to(torch.int8).argmax(dim=1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    safe = step.clamp_min(1)
    lut = (hist.cumsum(1) + step // 2) // safe
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    identity = torch.arange(256, device=pixels.device).expand_as(lut)
    lut = torch.where(step > 0, lut, identity)
    out = lut.gather(1, levels).to(pixels.dtype)
    return out.view(batch, channels, height, width)


_COLOR_OPS = {
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}


def _randaugment_theta(
    ops: torch.Tensor, magnitudes: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(B, 6) ``grid_sample`` matrices of torchvision's tensor ``affine`` / ``rotate`` for
    the geometric RandAugment ops (identity rows for the others).

    torchvision maps output pixel centres, taken relative to the image centre, through the
    inverse affine matrix of ``_get_inverse_affine_matrix(center, angle, translate, 1,
    shear)``: shears about the top-left corner, translations by ``int(magnitude)`` pixels,
    rotations by ``-magnitude`` degrees (``rotate`` flips the sign) about the centre.
    """
    mags = magnitudes.to(torch.float64)
    zero = torch.zeros_like(mags)

    def drew(name: str) -> torch.Tensor:
        return ops == RANDAUGMENT_OPS.index(name)

    shear_x = torch.where(drew("ShearX"), torch.atan(mags), zero)
    shear_y = torch.where(drew("ShearY"), torch.atan(mags), zero)
    move_x = torch.where(drew("TranslateX"), torch.trunc(mags), zero)
    move_y = torch.where(drew("TranslateY"), torch.trunc(mags), zero)
    angle = torch.where(drew("Rotate"), -mags, zero)
    corner = drew("ShearX") | drew("ShearY")  # shears turn about the top-left corner
    center_x = torch.where(corner, -width * 0.5, 0.0).to(torch.float64)
    center_y = torch.where(corner, -height * 0.5, 0.0).to(torch.float64)
    rot, sx, sy = torch.deg2rad(angle), shear_x, shear_y
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-center_x - move_x) + m1 * (-center_y - move_y) + center_x
    m5 = m3 * (-center_x - move_x) + m4 * (-center_y - move_y) + center_y
    # pixel coordinates about the centre -> grid_sample's normalised ones
    return torch.stack(
        [m0, m1 * height / width, m2 * 2 / width, m3 * width / height, m4, m5 * 2 / height],
        dim=1,
    )


def _warp_nearest(pixels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` (nearest, zero fill) through per-sample 2x3 maps ``theta`` (B, 6) in
    normalised coordinates; the grid is two broadcast sums (cheaper than F.affine_grid's
    batched matrix product on a CPU, same values)."""
    height, width = pixels.shape[-2:]
    t = theta.to(device=pixels.device, dtype=torch.float32).view(-1, 6, 1, 1)
    xs = ((torch.arange(width, device=pixels.device) * 2 + 1) / width - 1).view(1, 1, width)
    ys = ((torch.arange(height, device=pixels.device) * 2 + 1) / height - 1).view(1, height, 1)
    grid = torch.empty(pixels.shape[0], height, width, 2, device=pixels.device)
    grid[..., 0] = t[:, 0] * xs + (t[:, 1] * ys + t[:, 2])
    grid[..., 1] = t[:, 3] * xs + (t[:, 4] * ys + t[:, 5])
    return F.grid_sample(pixels, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class DeviceAugmenter:
    """The training loader's last step in device mode: a uint8 batch already on the
    training device -> augmented, normalised float32, with this rank's generator for this
    epoch (``augment_generator``); one per loader iteration."""

    def __init__(self, cfg: DataConfig, *, seed: int, epoch: int, rank: int) -> None:
        self.augment = BatchAugment(cfg)
        self.generator = augment_generator(seed=seed, epoch=epoch, rank=rank)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.augment(images, self.generator)
