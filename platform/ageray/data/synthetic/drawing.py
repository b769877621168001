"""Drawing helpers of the synthetic faces: smooth outlines and curves, colours for Pillow,
masked blends and upsampled noise in numpy, and ``Roi``, a rectangle of the canvas edited
in numpy (``render`` draws the layers with them)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ageray.data.synthetic.people import RGB

__all__ = ["Roi", "bezier", "blend_mask", "chaikin", "rgb", "rgba", "smooth_noise"]


def chaikin(points: list[tuple[float, float]], iterations: int = 3) -> list[tuple[float, float]]:
    """Corner-cutting on a closed polygon: a smooth face outline from a few control points."""
    pts = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0)
        q = 0.75 * pts + 0.25 * nxt
        r = 0.25 * pts + 0.75 * nxt
        pts = np.empty((2 * len(q), 2))
        pts[0::2], pts[1::2] = q, r
    return [(float(x), float(y)) for x, y in pts]


def bezier(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 10
) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def rgba(c: RGB, alpha: float) -> tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), int(np.clip(alpha, 0, 255)))


def rgb(c: RGB) -> tuple[int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]))


def blend_mask(
    arr: np.ndarray, color: np.ndarray | RGB, alpha: np.ndarray, *, inplace: bool = True
) -> np.ndarray:
    """arr (H, W, 3) float <- arr * (1 - alpha) + color * alpha, alpha (H, W) in [0, 1]."""
    a = alpha[..., None]
    col = np.asarray(color, dtype=np.float32)
    out = arr if inplace else arr.copy()
    out *= 1.0 - a
    out += col * a
    return out


def smooth_noise(
    rng: np.random.Generator, small: tuple[int, int], out: tuple[int, int]
) -> np.ndarray:
    """Noise drawn at ``small`` (rows, cols) and upsampled to ``out`` (rows, cols), in [0, 1]:
    blotches when small is coarse, strands when it is coarse in one direction only."""
    small = (max(2, small[0]), max(2, small[1]))
    noise = (rng.random(small) * 255).astype(np.uint8)
    img = Image.fromarray(noise).resize((out[1], out[0]), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


class Roi:
    """A rectangle of the canvas edited in numpy: per-pixel work (hair, beard, skin texture)
    touches only the part of the canvas where it can land, which keeps a face at ~5 ms."""

    def __init__(self, img: Image.Image, x0: float, y0: float, x1: float, y1: float) -> None:
        c = img.size[0]
        self.x0, self.y0 = max(0, int(x0)), max(0, int(y0))
        self.x1, self.y1 = min(c, math.ceil(x1)), min(c, math.ceil(y1))
        self.x1, self.y1 = max(self.x1, self.x0 + 1), max(self.y1, self.y0 + 1)
        self.box = (self.x0, self.y0, self.x1, self.y1)
        yy, xx = np.mgrid[self.y0 : self.y1, self.x0 : self.x1]
        self.x, self.y = xx.astype(np.float32), yy.astype(np.float32)
        self.arr = np.array(img.crop(self.box), np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.arr.shape[0], self.arr.shape[1]

    def mask(self, mask_img: Image.Image) -> np.ndarray:
        return np.asarray(mask_img.crop(self.box), np.float32) / 255.0

    def paste(self, img: Image.Image) -> None:
        out = Image.fromarray(np.clip(self.arr, 0, 255).astype(np.uint8), "RGB")
        img.paste(out, (self.x0, self.y0))
