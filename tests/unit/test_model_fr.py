"""Feature Rearrangement: the paper's shapes (GLAE III-B, Table III), padding, bad configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ageray.model import FeatureRearrangement, fr_output_size, fr_padding, table_iii_pairs

# H' for a 7x7 map rearranged by r = 16 (112x112), per Table III pair (kernel, stride).
PAPER_OUT_7X7 = {(16, 8): 13, (16, 16): 7, (32, 8): 11, (32, 16): 6}


def test_table_iii_pairs() -> None:
    assert table_iii_pairs(16) == [(16, 8), (16, 16), (32, 8), (32, 16)]
    with pytest.raises(ValueError, match=r"r=3 .*r/2=1.5.*not an integer.*even r"):
        table_iii_pairs(3)


@pytest.mark.parametrize(("channels", "rearranged"), [(512, 2), (2048, 8)])  # ResNet-18 / -50
@pytest.mark.parametrize(("kernel", "stride"), list(PAPER_OUT_7X7))
def test_paper_shapes_at_224(channels: int, rearranged: int, kernel: int, stride: int) -> None:
    """512x7x7 -> 2x112x112 and 2048x7x7 -> 8x112x112, then the conv, for all four pairs."""
    fr = FeatureRearrangement(channels, 16, kernel, stride, in_size=(7, 7))
    x = torch.randn(2, channels, 7, 7)
    assert fr.shuffle(x).shape == (2, rearranged, 112, 112)
    assert fr.conv.in_channels == rearranged and fr.conv.out_channels == 101
    out = fr(x)
    h = PAPER_OUT_7X7[(kernel, stride)]
    assert out.shape == (2, 101, h, h)
    assert fr.out_size == (h, h)
    assert fr.padding(7, 7) == (0, 0, 0, 0)  # Table III pairs tile 112 exactly


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (4, {(16, 8): 7, (16, 16): 4, (32, 8): 5, (32, 16): 3}),  # 112 px input
        (2, {(16, 8): 3, (16, 16): 2, (32, 8): 1, (32, 16): 1}),  # 64 px input
    ],
)
def test_small_maps(size: int, expected: dict[tuple[int, int], int]) -> None:
    x = torch.randn(2, 512, size, size)
    for (k, s), h in expected.items():
        fr = FeatureRearrangement(512, 16, k, s, in_size=size)
        assert fr(x).shape == (2, 101, h, h)
        assert fr.out_size == (h, h)


def _covered(fr: FeatureRearrangement, h: int, w: int) -> torch.Tensor:
    """Which backbone-map elements reach the output: gradient of the output sum with
    all-positive conv weights (pixel shuffle is a permutation, so element <-> F' pixel)."""
    with torch.no_grad():
        fr.conv.weight.fill_(1.0)
    x = torch.zeros(1, fr.in_channels, h, w, requires_grad=True)
    fr(x).sum().backward()
    assert x.grad is not None
    return x.grad != 0


@pytest.mark.parametrize(("kernel", "stride"), list(PAPER_OUT_7X7))
@pytest.mark.parametrize("size", [7, 4, 2, 3])
def test_every_pixel_covered_table_iii(kernel: int, stride: int, size: int) -> None:
    fr = FeatureRearrangement(512, 16, kernel, stride)
    assert bool(_covered(fr, size, size).all())


@pytest.mark.parametrize(("r", "kernel", "stride", "h", "w"), [(4, 6, 4, 7, 5), (4, 5, 2, 7, 7)])
def test_padding_needed_and_covers(r: int, kernel: int, stride: int, h: int, w: int) -> None:
    """Off-paper (k, s): a plain conv would drop the last rows; FR pads and reads them."""
    fr = FeatureRearrangement(r * r, r, kernel, stride)
    length = h * r
    plain = nn.Conv2d(1, 1, kernel, stride)
    x = torch.zeros(1, 1, length, length, requires_grad=True)
    with torch.no_grad():
        plain.weight.fill_(1.0)
    plain(x).sum().backward()
    assert x.grad is not None and not bool((x.grad != 0).all())  # the silent drop
    assert any(fr.padding(h, w))
    assert bool(_covered(fr, h, w).all())
    out = fr(torch.randn(1, fr.in_channels, h, w))
    assert out.shape[-2:] == fr.output_size(h, w)


def test_padding_rule_arithmetic() -> None:
    """First window starts at or before 0, last ends at or after L - 1, P < s, n matches."""
    for length in range(1, 40):
        for kernel in range(1, 12):
            for stride in range(1, kernel + 1):
                if length < kernel:
                    with pytest.raises(ValueError, match="empty output"):
                        fr_padding(length, kernel_size=kernel, stride=stride)
                    continue
                before, after = fr_padding(length, kernel_size=kernel, stride=stride)
                total = before + after
                assert 0 <= total < stride and 0 <= after - before <= 1
                assert (length + total - kernel) % stride == 0
                n = fr_output_size(length, kernel_size=kernel, stride=stride)
                assert -before + (n - 1) * stride + kernel - 1 >= length - 1
                conv = nn.Conv1d(1, 1, kernel, stride)
                out = conv(nn.functional.pad(torch.zeros(1, 1, length), (before, after)))
                assert out.shape[-1] == n


def test_invalid_configs_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"in_channels=500 .*r\^2=256 \(r=16\)"):
        FeatureRearrangement(500, 16, 16, 16)
    with pytest.raises(ValueError, match=r"stride=1.5 is not an integer.*even r"):
        FeatureRearrangement(9 * 4, 3, 3, 3 / 2)
    with pytest.raises(ValueError, match=r"stride=32 > kernel_size=16"):
        FeatureRearrangement(512, 16, 16, 32)
    with pytest.raises(ValueError, match=r"16 pixels wide, smaller than kernel_size=32.*empty"):
        FeatureRearrangement(512, 16, 32, 16, in_size=(1, 1))
    with pytest.raises(ValueError, match=r"kernel_size=0"):
        FeatureRearrangement(512, 16, 0, 1)


def test_forward_checks_channels() -> None:
    fr = FeatureRearrangement(512, 16, 16, 16)
    with pytest.raises(ValueError, match=r"expects \(B, 512, H, W\)"):
        fr(torch.randn(1, 256, 7, 7))
