"""Feature Rearrangement (GLAE III-B): pixel shuffle by r, then a conv with one output
channel per age.

``F (B, C, H, W) -> pixel_shuffle(r) -> (B, C/r^2, Hr, Wr) -> Conv2d(k, s) -> F' (B, K, H', W')``.
The r^2 channels at one location become an r x r patch, so a kernel of r (or 2r) sees all of
them at once (and stride r/2 or 2r-kernels also see the neighbours). GLAE Table III tries
(k, s) in {(r, r/2), (r, r), (2r, r/2), (2r, r)} with r = 16 on ResNet-18.

Padding rule (``fr_padding``), per axis of length ``L = H * r`` (or ``W * r``):

    total padding P = the smallest P >= 0 with (L + P - k) % s == 0;
    P // 2 zeros before, P - P // 2 after;   output  n = (L + P - k) / s + 1.

Why: PyTorch's conv silently drops the trailing ``(L - k) % s`` rows/columns when windows do
not tile the input. With this P the first window starts at or before pixel 0, the last one
ends at ``L - 1 + (P - P // 2) >= L - 1``, and ``stride <= kernel_size`` (enforced) leaves no
gaps between windows, so every pixel of the rearranged map is read by at least one window.
Since ``P < s <= k`` no window lies entirely in the padding. For all four Table III pairs L and
k are multiples of r and s divides r, so P = 0: the paper's shapes are reproduced exactly
(7x7 -> 112x112 -> H' = 13, 7, 11, 6 for (16,8), (16,16), (32,8), (32,16)). Padding only
appears for other (k, s) choices, and may then be asymmetric (odd P), which is why it is
applied with ``F.pad`` in ``forward`` rather than as the conv's own (symmetric) padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureRearrangement", "fr_output_size", "fr_padding", "table_iii_pairs"]


def _as_int(value: int | float, what: str, hint: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"FeatureRearrangement: {what}={value!r} is not an integer; {hint}")
    return int(value)


def table_iii_pairs(r: int) -> list[tuple[int, int]]:
    """GLAE Table III's (kernel_size, stride) pairs: (r, r/2), (r, r), (2r, r/2), (2r, r)."""
    if r < 2 or r % 2:
        raise ValueError(
            f"FeatureRearrangement: r={r} gives a stride r/2={r / 2} that is not an integer "
            "(Table III's (r, r/2) and (2r, r/2) pairs); use an even r such as 16"
        )
    return [(r, r // 2), (r, r), (2 * r, r // 2), (2 * r, r)]


def fr_padding(length: int, *, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding along one axis of the rearranged map (module docstring)."""
    if length < kernel_size:
        raise ValueError(
            f"FeatureRearrangement: the rearranged map is {length} pixels wide, smaller than "
            f"kernel_size={kernel_size}: the conv would have no full window (empty output). Use a "
            "larger input image (a bigger backbone feature map) or kernel_size=r"
        )
    total = (-(length - kernel_size)) % stride
    return total // 2, total - total // 2


def fr_output_size(length: int, *, kernel_size: int, stride: int) -> int:
    """Output length along one axis for a rearranged axis of ``length`` pixels."""
    before, after = fr_padding(length, kernel_size=kernel_size, stride=stride)
    return (length + before + after - kernel_size) // stride + 1


class FeatureRearrangement(nn.Module):
    """Pixel shuffle by ``r`` then ``Conv2d(C / r^2 -> num_classes, kernel_size, stride)``.

    Args:
        in_channels: C of the backbone map; must be divisible by ``r ** 2``.
        r: rearrangement factor (16 in GLAE: 512 x 7 x 7 -> 2 x 112 x 112).
        kernel_size, stride: the conv's; integers with ``stride <= kernel_size`` (a bigger
            stride would skip pixels). A float stride such as ``r / 2`` with odd ``r`` fails.
        num_classes: output channels, one per age (101 for ages 0..100).
        in_size: (H, W) of the backbone map when known; validates the output is not empty and
            sets ``out_size`` (the holistic projection needs ``num_classes * H' * W'``).

    Shapes: (B, C, H, W) -> (B, num_classes, H', W'); padding rule in the module docstring.

    The positional order ``(in_channels, r, kernel_size, stride, num_classes)`` is a published
    signature (GLAE's notation), so it stays; inside ageray it is called with keywords,
    because a swapped kernel_size and stride of equal type would still build.
    """

    def __init__(
        self,
        in_channels: int,
        r: int,
        kernel_size: int | float,
        stride: int | float,
        num_classes: int = 101,
        in_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        r = _as_int(r, "r", "use a positive integer such as 16")
        if r < 1:
            raise ValueError(f"FeatureRearrangement: r={r} must be at least 1")
        hint = "use an even r so that r/2 is an integer, or an integer stride"
        kernel_size = _as_int(kernel_size, "kernel_size", "use r or 2r with an integer r")
        stride = _as_int(stride, "stride", hint)
        if kernel_size < 1 or stride < 1:
            raise ValueError(
                f"FeatureRearrangement: kernel_size={kernel_size} and stride={stride} must be >= 1"
            )
        if stride > kernel_size:
            raise ValueError(
                f"FeatureRearrangement: stride={stride} > kernel_size={kernel_size} would skip "
                "pixels between windows; use stride <= kernel_size (Table III: r or r/2)"
            )
        if in_channels % (r * r):
            raise ValueError(
                f"FeatureRearrangement: in_channels={in_channels} is not divisible by "
                f"r^2={r * r} (r={r}); pick r with r^2 dividing the backbone's channels "
                f"(e.g. r={_largest_r(in_channels)} for {in_channels} channels)"
            )
        if num_classes < 1:
            raise ValueError(f"FeatureRearrangement: num_classes={num_classes} must be >= 1")
        self.in_channels = in_channels
        self.r = r
        self.kernel_size = kernel_size
        self.stride = stride
        self.num_classes = num_classes
        self.shuffle = nn.PixelShuffle(r)
        self.conv = nn.Conv2d(in_channels // (r * r), num_classes, kernel_size, stride)
        self.in_size: tuple[int, int] | None = None
        self.out_size: tuple[int, int] | None = None
        if in_size is not None:
            h, w = (in_size, in_size) if isinstance(in_size, int) else tuple(in_size)
            self.in_size = (int(h), int(w))
            self.out_size = self.output_size(*self.in_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') for a backbone map of ``height`` x ``width``."""
        sizes = {"kernel_size": self.kernel_size, "stride": self.stride}
        return fr_output_size(height * self.r, **sizes), fr_output_size(width * self.r, **sizes)

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``F.pad`` order (left, right, top, bottom) for a backbone map of that size."""
        sizes = {"kernel_size": self.kernel_size, "stride": self.stride}
        top, bottom = fr_padding(height * self.r, **sizes)
        left, right = fr_padding(width * self.r, **sizes)
        return left, right, top, bottom

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureRearrangement expects (B, {self.in_channels}, H, W), got "
                f"{tuple(features.shape)}"
            )
        pad = self.padding(features.shape[-2], features.shape[-1])
        rearranged = self.shuffle(features)
        if any(pad):
            rearranged = F.pad(rearranged, pad)
        return self.conv(rearranged)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, r={self.r}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, num_classes={self.num_classes}, in_size={self.in_size}, "
            f"out_size={self.out_size}"
        )


def _largest_r(channels: int) -> int:
    return max(r for r in range(1, math.isqrt(channels) + 1) if channels % (r * r) == 0)
