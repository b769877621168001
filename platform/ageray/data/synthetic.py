"""Synthetic face-age data: procedurally drawn faces whose age is visible.

Why: the demo, the tests and CI must run the whole platform (shards -> streams -> training
-> serving) with no dataset download and no licence question, on data that behaves like the
real thing where it matters for this project:

* **Age is learnable from the pixels**, through the cues a real face carries: head
  proportions in children (big cranium and forehead, eyes low in the head and large, round
  face, button nose, small chin; the lower face lengthens through adolescence), wrinkles and
  skin texture in adults (forehead lines, crow's feet, nasolabial folds, under-eye bags,
  marionette lines, age spots — all deepening with age), grey then white and thinning hair
  and receding hairlines in the elderly, bigger ears and nose, thinner lips, hooded eyelids.
  ``benchmarks/synthetic_learnability.py`` checks that a ResNet-18 learns it.
* **The age distribution is long-tailed like MIVIA** (GLAE Fig. 1): a peak at 20-40, few
  children and elderly, yet every age 1-81 present (:func:`age_histogram_weights`), so
  class-balanced sampling, CMAE and the balanced head have something to fix.
* **Identities**: fixed per-person traits (face shape, skin tone within a race palette, eye
  and hair colour, hairstyle, beard, background) and several images per person at different
  ages, for identity pretraining (LAE's AM-softmax stage). Gender and race (5 UTKFace classes)
  labels come with every image, for the multi-task formulations (Xing et al.).
* **Nuisance** per image (pose jitter, rotation, scale, shift, lighting, colour cast,
  noise, blur, background) so that the task is not trivial.

Everything is numpy + Pillow drawing; deterministic for a seed (same seed, same bytes).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ageray.data.records import ImportReport, Record

__all__ = [
    "RACE_WEIGHTS",
    "IdentityTraits",
    "age_histogram_weights",
    "age_params",
    "face_geometry",
    "iter_synthetic",
    "plan_synthetic",
    "random_traits",
    "render_face",
]

RGB = tuple[float, float, float]

# Skin tone palettes (light end, dark end) per UTKFace race code.
SKIN_PALETTES: dict[int, tuple[RGB, RGB]] = {
    0: ((244, 214, 194), (222, 176, 146)),  # white
    1: ((134, 90, 62), (80, 52, 38)),  # black
    2: ((240, 210, 174), (214, 174, 132)),  # asian
    3: ((200, 150, 108), (150, 104, 72)),  # indian
    4: ((218, 170, 128), (178, 128, 92)),  # other
}
RACE_WEIGHTS = (0.42, 0.19, 0.15, 0.16, 0.08)  # roughly UTKFace's race mix

HAIR_COLORS: tuple[RGB, ...] = (
    (28, 22, 20),  # black
    (60, 40, 28),  # dark brown
    (106, 72, 44),  # brown
    (196, 160, 98),  # blond
    (148, 68, 36),  # red
)
HAIR_BY_RACE = {
    0: (0.15, 0.30, 0.30, 0.18, 0.07),
    1: (0.85, 0.15, 0.0, 0.0, 0.0),
    2: (0.90, 0.10, 0.0, 0.0, 0.0),
    3: (0.80, 0.20, 0.0, 0.0, 0.0),
    4: (0.50, 0.35, 0.15, 0.0, 0.0),
}
EYE_COLORS: tuple[RGB, ...] = (
    (58, 38, 24),  # dark brown
    (98, 64, 36),  # brown
    (110, 94, 50),  # hazel
    (70, 110, 68),  # green
    (66, 106, 158),  # blue
    (108, 118, 128),  # grey
)
EYE_BY_RACE = {
    0: (0.22, 0.22, 0.12, 0.12, 0.24, 0.08),
    1: (0.75, 0.25, 0.0, 0.0, 0.0, 0.0),
    2: (0.80, 0.20, 0.0, 0.0, 0.0, 0.0),
    3: (0.70, 0.30, 0.0, 0.0, 0.0, 0.0),
    4: (0.50, 0.35, 0.15, 0.0, 0.0, 0.0),
}
GREY_HAIR: RGB = (168, 168, 172)
WHITE_HAIR: RGB = (236, 236, 236)

SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased lines at no extra code
CANVAS = 1.4  # canvas / output frame: room to rotate and shift without empty corners


# ----------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class IdentityTraits:
    """What stays the same for one synthetic person across all their images and ages."""

    gender: int  # 0 male, 1 female
    race: int  # 0 white, 1 black, 2 asian, 3 indian, 4 other
    skin: RGB
    hair_color: RGB
    eye_color: RGB
    lip_color: RGB
    background: RGB
    clothes: RGB
    hair_style: int  # 0, 1, 2: short/medium/long-ish within a gender's repertoire
    face_width: float  # ~0.92..1.08
    face_length: float  # ~0.95..1.05
    jaw: float  # 0 narrow .. 1 square
    nose_width: float
    brow: float  # eyebrow thickness factor
    eye_spacing: float
    ageing: float  # years: > 0 looks younger than their age (wrinkles come later)
    grey_onset: float  # age at which half the hair is grey
    bald_prone: bool
    beard: bool
    acne: bool


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def random_traits(
    rng: np.random.Generator, gender: int | None = None, race: int | None = None
) -> IdentityTraits:
    """Draw one person's fixed traits (gender and race may be forced)."""
    g = int(rng.integers(2)) if gender is None else int(gender)
    r = int(rng.choice(5, p=RACE_WEIGHTS)) if race is None else int(race)
    light, dark = SKIN_PALETTES[r]
    skin = _mix(light, dark, float(rng.uniform()))
    hair = HAIR_COLORS[int(rng.choice(len(HAIR_COLORS), p=HAIR_BY_RACE[r]))]
    hair = tuple(float(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in hair)
    eye = EYE_COLORS[int(rng.choice(len(EYE_COLORS), p=EYE_BY_RACE[r]))]
    lip_base = (196, 92, 96) if g == 1 else (176, 104, 98)
    lip = _mix(lip_base, (skin[0] * 0.8, skin[1] * 0.55, skin[2] * 0.55), 0.45)
    bg = tuple(float(c) for c in rng.uniform(40, 220, size=3))
    clothes = tuple(float(c) for c in rng.uniform(20, 230, size=3))
    return IdentityTraits(
        gender=g,
        race=r,
        skin=skin,
        hair_color=hair,  # type: ignore[arg-type]
        eye_color=eye,
        lip_color=lip,
        background=bg,  # type: ignore[arg-type]
        clothes=clothes,  # type: ignore[arg-type]
        hair_style=int(rng.integers(3)),
        face_width=float(rng.uniform(0.92, 1.08)),
        face_length=float(rng.uniform(0.95, 1.05)),
        jaw=float(rng.uniform()),
        nose_width=float(rng.uniform(0.85, 1.2)),
        brow=float(rng.uniform(0.7, 1.3)),
        eye_spacing=float(rng.uniform(0.95, 1.05)),
        ageing=float(np.clip(rng.normal(0.0, 2.5), -5, 5)),
        grey_onset=float(np.clip(rng.normal(50.0, 4.0), 40, 60)),
        bald_prone=bool(g == 0 and rng.uniform() < 0.4),
        beard=bool(g == 0 and rng.uniform() < 0.35),
        acne=bool(rng.uniform() < 0.5),
    )


# ----------------------------------------------------------------------------- age cues


def _clip01(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def age_params(age: float, traits: IdentityTraits) -> dict[str, float]:
    """The age cues as numbers in [0, 1] (``growth``: 0 infant .. 1 adult proportions;
    ``wrinkles``: 0 at ~22 .. 1 at ~77; ``old``: 0 at 55 .. 1 at 80; ``grey`` and ``white``
    hair fractions; ``recede``: hairline recession; ``thin``: hair thinning).
    Exposed so tests can check that each cue moves the right way with age."""
    ea = age - traits.ageing  # "effective" age for skin ageing
    growth = _clip01((age - 1.0) / 17.0) ** 0.75
    wrinkles = _clip01((ea - 22.0) / 55.0)
    old = _clip01((ea - 55.0) / 25.0)
    grey = 1.0 / (1.0 + math.exp(-(age - traits.grey_onset) / 5.0)) if age > 25 else 0.0
    white = _clip01((age - 62.0) / 18.0) * grey
    if traits.gender == 0:
        recede = (
            _clip01((ea - 28.0) / 35.0) if traits.bald_prone else 0.3 * _clip01((ea - 45.0) / 30.0)
        )
    else:
        recede = 0.0
    thin = 0.6 * _clip01((ea - 55.0) / 30.0)
    return {
        "growth": growth,
        "wrinkles": wrinkles,
        "old": old,
        "grey": grey,
        "white": white,
        "recede": recede,
        "thin": thin,
        "eff_age": ea,
    }


def _geometry(age: float, t: IdentityTraits, u: float, cx0: float, cy0: float) -> dict[str, float]:
    """Where the parts of the face go (canvas pixels; ``u`` = output frame size, centred at
    ``cx0, cy0``). Children: eyes low in a tall cranium and large, a round face, a short lower
    face; the face lengthens to adult proportions by ~18; nose and ears keep growing, lips
    thin, lids droop with old age."""
    p = age_params(age, t)
    g, old = p["growth"], p["old"]
    male = t.gender == 0
    hw = u * 0.48 * t.face_width * _lerp(1.04, 1.0, g)  # head width
    hh = hw * (_lerp(1.04, 1.30, g) * t.face_length + 0.05 * old)  # head height
    cx, cy = cx0, cy0 + u * 0.03
    top, bottom = cy - hh / 2, cy + hh / 2
    eye_y = top + hh * _lerp(0.58, 0.47, g)
    lower = bottom - eye_y
    ew = hw * _lerp(0.22, 0.155, g)
    eh = ew * _lerp(0.62, 0.44, g) * (1 - 0.18 * old)
    nose_y = eye_y + lower * _lerp(0.36, 0.43, g)
    ear_h = hh * _lerp(0.20, 0.24, g) * (1 + 0.18 * old)
    brow_y = eye_y - eh * 0.55 - hw * _lerp(0.10, 0.075, g)
    f_hl = 0.62 if (t.hair_style == 2 and not male) else _lerp(0.30, 0.42, g)  # 0.62: fringe
    return {
        "hw": hw,
        "hh": hh,
        "cx": cx,
        "cy": cy,
        "top": top,
        "bottom": bottom,
        "eye_y": eye_y,
        "lower": lower,
        "ym": eye_y + 0.05 * lower,  # widest line of the face
        "eye_dx": hw * _lerp(0.23, 0.21, g) * t.eye_spacing,
        "ew": ew,
        "eh": eh,
        "nose_y": nose_y,
        "nw": hw * _lerp(0.12, 0.19, g) * t.nose_width * (1 + 0.15 * old),
        "mouth_y": eye_y + lower * _lerp(0.64, 0.63, g),
        "mw": hw * _lerp(0.28, 0.38, g) * (1.0 if male else 0.93),
        "lip": hw * _lerp(0.045, 0.055, g) * (1 - 0.45 * old) * (1.0 if male else 1.15),
        "brow_y": brow_y,
        "brow_t": hw * 0.032 * t.brow * _lerp(0.45, 1.0, g) * (1.25 if male else 0.9),
        "ear_h": ear_h,
        "ear_y": (eye_y + nose_y) / 2 + 0.1 * ear_h,
        "th": hw * _lerp(0.025, 0.08, g) * (1 - 0.4 * old) * (1.25 if t.hair_style == 1 else 1.0),
        "hl": top + (brow_y - top) * f_hl,  # hairline (before recession)
    }


def face_geometry(age: float, traits: IdentityTraits, size: int = 112) -> dict[str, Any]:
    """Key positions of the face drawn by ``render_face(..., nuisance=False)``, in output
    pixels: ``head_top``, ``chin``, ``head_width``, ``head_height``, ``eye_y``,
    ``eye_width``, ``hair_top`` (outer edge of the hair at the crown), ``hairline_y`` and
    ``landmarks`` (5 x 2: eyes, nose tip, mouth corners — the aligner's five points)."""
    u = float(size * SUPERSAMPLE)
    c0 = round(u * CANVAS) / 2.0
    geo = _geometry(age, traits, u, c0, c0)
    off = c0 - u / 2

    def x(v: float) -> float:
        return (v - off) / SUPERSAMPLE

    y = x
    lm = np.array(
        [
            [x(geo["cx"] - geo["eye_dx"]), y(geo["eye_y"])],
            [x(geo["cx"] + geo["eye_dx"]), y(geo["eye_y"])],
            [x(geo["cx"]), y(geo["nose_y"])],
            [x(geo["cx"] - geo["mw"] / 2), y(geo["mouth_y"])],
            [x(geo["cx"] + geo["mw"] / 2), y(geo["mouth_y"])],
        ]
    )
    return {
        "head_top": y(geo["top"]),
        "chin": y(geo["bottom"]),
        "head_width": geo["hw"] / SUPERSAMPLE,
        "head_height": geo["hh"] / SUPERSAMPLE,
        "eye_y": y(geo["eye_y"]),
        "eye_width": geo["ew"] / SUPERSAMPLE,
        "hair_top": y(geo["top"] - geo["th"]),
        "hairline_y": y(geo["hl"]),
        "landmarks": lm,
    }


# ----------------------------------------------------------------------------- drawing helpers


def _chaikin(points: list[tuple[float, float]], iterations: int = 3) -> list[tuple[float, float]]:
    """Corner-cutting on a closed polygon: a smooth face outline from a few control points."""
    pts = np.asarray(points, dtype=np.float64)
    for _ in range(iterations):
        nxt = np.roll(pts, -1, axis=0)
        q = 0.75 * pts + 0.25 * nxt
        r = 0.25 * pts + 0.75 * nxt
        pts = np.empty((2 * len(q), 2))
        pts[0::2], pts[1::2] = q, r
    return [(float(x), float(y)) for x, y in pts]


def _bezier(
    p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 10
) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t**2 * np.array(p2)
    return [(float(x), float(y)) for x, y in pts]


def _rgba(c: RGB, alpha: float) -> tuple[int, int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]), int(np.clip(alpha, 0, 255)))


def _rgb(c: RGB) -> tuple[int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]))


def _blend_mask(
    arr: np.ndarray, color: np.ndarray | RGB, alpha: np.ndarray, *, inplace: bool = True
) -> np.ndarray:
    """arr (H, W, 3) float <- arr * (1 - alpha) + color * alpha, alpha (H, W) in [0, 1]."""
    a = alpha[..., None]
    col = np.asarray(color, dtype=np.float32)
    out = arr if inplace else arr.copy()
    out *= 1.0 - a
    out += col * a
    return out


def _smooth_noise(
    rng: np.random.Generator, small: tuple[int, int], out: tuple[int, int]
) -> np.ndarray:
    """Noise drawn at ``small`` (rows, cols) and upsampled to ``out`` (rows, cols), in [0, 1]:
    blotches when small is coarse, strands when it is coarse in one direction only."""
    small = (max(2, small[0]), max(2, small[1]))
    noise = (rng.random(small) * 255).astype(np.uint8)
    img = Image.fromarray(noise).resize((out[1], out[0]), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


class _Roi:
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


# ----------------------------------------------------------------------------- the face


def render_face(
    age: float,
    identity_traits: IdentityTraits,
    rng: np.random.Generator,
    size: int = 112,
    *,
    nuisance: bool = True,
) -> Image.Image:
    """Draw one face of ``identity_traits`` at ``age`` years as an RGB ``size`` x ``size`` image.

    ``rng`` drives the per-image variation (pose, expression, lighting, noise...); with
    ``nuisance=False`` the face is drawn upright, centred and evenly lit (cue tests, figures).
    """
    t = identity_traits
    p = age_params(age, t)
    g, w, old = p["growth"], p["wrinkles"], p["old"]
    ea = p["eff_age"]
    male = t.gender == 0
    u = float(size * SUPERSAMPLE)  # the output frame, in canvas pixels
    c = round(u * CANVAS)
    cx0 = cy0 = c / 2.0

    # ---- per-image nuisance draws (always drawn, so the stream of rng calls is stable)
    yaw = float(rng.uniform(-1, 1))
    smile = float(rng.uniform(0, 1))
    angle = float(np.clip(rng.normal(0, 4.0), -10, 10))
    scale = float(rng.uniform(0.92, 1.08))
    shift = rng.uniform(-0.03, 0.03, size=2) * u
    bg_jitter = rng.uniform(-18, 18, size=3)
    if not nuisance:
        yaw, smile, angle, scale, shift = 0.0, 0.3, 0.0, 1.0, np.zeros(2)
        bg_jitter = np.zeros(3)

    # ---- geometry (canvas pixels)
    geo = _geometry(age, t, u, cx0, cy0)
    hw, hh, cx, _cy, top, bottom = (geo[k] for k in ("hw", "hh", "cx", "cy", "top", "bottom"))
    eye_y, lower, ym, eye_dx, ew, eh = (
        geo[k] for k in ("eye_y", "lower", "ym", "eye_dx", "ew", "eh")
    )
    nose_y, nw, mouth_y, mw, lip = (geo[k] for k in ("nose_y", "nw", "mouth_y", "mw", "lip"))
    brow_y, brow_t, ear_h, ear_y = (geo[k] for k in ("brow_y", "brow_t", "ear_h", "ear_y"))
    th, hl = geo["th"], geo["hl"]
    fx = yaw * hw * 0.06  # pseudo-yaw: inner features slide sideways
    skin: RGB = t.skin
    shade: RGB = (skin[0] * 0.55, skin[1] * 0.45, skin[2] * 0.42)  # wrinkle / fold colour

    # ---- hair colour with age: toddlers lighter, grey then white
    hair: RGB = t.hair_color
    if age < 6 and t.race == 0:
        hair = _mix(hair, (205, 170, 110), 0.35 * (1 - age / 6))
    grey_col = _mix(GREY_HAIR, WHITE_HAIR, p["white"])

    # ---- background: colour + vertical gradient + blotches, drawn small and upsampled
    bg = np.clip(np.asarray(t.background) + bg_jitter, 0, 255).astype(np.float32)
    ramp = (np.linspace(-0.5, 0.5, 8, dtype=np.float32)[:, None, None]) * np.float32(
        rng.uniform(-50, 50)
    )
    blot = rng.random((8, 8, 1)).astype(np.float32) * np.float32(rng.uniform(0, 40)) - 20
    small_bg = np.clip(bg + ramp + blot, 0, 255).astype(np.uint8)
    img = Image.fromarray(small_bg, "RGB").resize((c, c), Image.BILINEAR)
    draw = ImageDraw.Draw(img, "RGBA")

    # ---- long hair behind the head (drawn first, the face covers it)
    long_hair = (not male and age >= 4 and t.hair_style != 2) or (
        male and t.hair_style == 2 and 16 <= age <= 45
    )
    hair_len = 0.0
    if long_hair:
        hair_len = _lerp(0.15, 0.45, _clip01((age - 4) / 10)) * (1 - 0.6 * old)
        if male:
            hair_len *= 0.5
        draw.rounded_rectangle(
            (cx - hw * 0.62, ym - hh * 0.2, cx + hw * 0.62, bottom + hh * hair_len),
            radius=hw * 0.3,
            fill=_rgb(_mix(hair, grey_col, p["grey"])),
        )

    # ---- shoulders, neck, ears
    sh_w = hw * (1.9 if male else 1.65) * _lerp(0.8, 1.0, g)
    draw.ellipse(
        (cx - sh_w / 2, bottom + hh * 0.18, cx + sh_w / 2, bottom + hh * 0.95),
        fill=_rgb(t.clothes),
    )
    neck_w = hw * _lerp(0.42, 0.52, g) * (1.1 if male else 0.95)
    neck_col = _mix(skin, shade, 0.25)
    draw.rectangle((cx - neck_w / 2, ym, cx + neck_w / 2, bottom + hh * 0.3), fill=_rgb(neck_col))
    ear_w = ear_h * 0.45
    for sgn in (-1, 1):
        ex = cx + sgn * hw * 0.49
        draw.ellipse(
            (ex - ear_w / 2, ear_y - ear_h / 2, ex + ear_w / 2, ear_y + ear_h / 2),
            fill=_rgb(_mix(skin, shade, 0.12)),
        )
        draw.ellipse(
            (ex - ear_w / 4, ear_y - ear_h / 3, ex + ear_w / 4, ear_y + ear_h / 3),
            fill=_rgba(shade, 90),
        )

    # ---- face outline: round in children, long with a jaw in adults, jowls in the elderly
    cheek = _lerp(1.0, 0.96, g)
    jaw_w = hw * (_lerp(0.86, (0.80 if male else 0.70) + 0.06 * t.jaw, g) + 0.05 * old)
    jaw_y = ym + (bottom - ym) * (_lerp(0.62, 0.70, g) + 0.05 * old)
    chin_w = hw * _lerp(0.50, (0.36 if male else 0.26) + 0.06 * t.jaw, g)
    ry_top = ym - top
    pts: list[tuple[float, float]] = []
    for k in range(13):  # upper half ellipse, left to right
        a = math.pi + math.pi * k / 12
        pts.append((cx + hw / 2 * math.cos(a), ym + ry_top * math.sin(a)))
    right = [
        (cx + hw / 2 * cheek, ym + (bottom - ym) * 0.35),
        (cx + jaw_w / 2, jaw_y),
        (cx + chin_w / 2, bottom - 0.03 * hh),
    ]
    pts += right + [(cx, bottom)] + [(2 * cx - px, py) for px, py in reversed(right)]
    outline = _chaikin(pts, 3)
    draw.polygon(outline, fill=_rgb(skin))
    face_mask_img = Image.new("L", (c, c), 0)
    ImageDraw.Draw(face_mask_img).polygon(outline, fill=255)

    # ---- children: rosy cheeks; teenagers: acne; elderly: age spots
    if age < 12:
        a = 70 * (1 - age / 12)
        for sgn in (-1, 1):
            rx, ry0 = cx + sgn * hw * 0.27 + fx, nose_y + lower * 0.05
            draw.ellipse(
                (rx - hw * 0.1, ry0 - hw * 0.07, rx + hw * 0.1, ry0 + hw * 0.07),
                fill=(230, 110, 110, int(a)),
            )
    if t.acne and 13 <= age <= 19:
        for _ in range(int(rng.integers(3, 9))):
            ax = cx + rng.uniform(-0.35, 0.35) * hw
            ay = rng.uniform(brow_y - lower * 0.25, mouth_y)
            rr = u * 0.006
            draw.ellipse((ax - rr, ay - rr, ax + rr, ay + rr), fill=(190, 70, 60, 150))
    if ea > 52:
        for _ in range(int((ea - 52) / 3.5)):
            ax = cx + rng.uniform(-0.38, 0.38) * hw
            ay = rng.uniform(top + hh * 0.18, mouth_y)
            rr = u * rng.uniform(0.005, 0.012)
            draw.ellipse(
                (ax - rr, ay - rr * 0.8, ax + rr, ay + rr * 0.8),
                fill=_rgba((skin[0] * 0.62, skin[1] * 0.5, skin[2] * 0.38), 130),
            )

    # ---- wrinkles: thicker and darker with age
    lw = max(1, round(u * (0.008 + 0.007 * w)))
    if ea > 27:  # forehead lines
        n_lines = 1 + int(4 * w)
        f_top = top + (brow_y - top) * 0.35
        f_bot = brow_y - brow_t * 2.2
        for k in range(n_lines):
            fy = f_bot - (f_bot - f_top) * (k + 0.5) / max(n_lines, 1) * 0.9
            half = hw * (0.30 - 0.03 * k)
            line = [
                (
                    cx + fx + s * half,
                    fy - abs(s) ** 2 * hw * 0.03 + rng.normal(0, hw * 0.004),
                )
                for s in np.linspace(-1, 1, 7)
            ]
            draw.line(line, fill=_rgba(shade, 70 + 150 * w), width=lw)
    if ea > 42:  # frown lines between the brows
        for sgn in (-1, 1):
            gx = cx + fx + sgn * hw * 0.035
            draw.line(
                [(gx, brow_y - brow_t), (gx + sgn * hw * 0.01, brow_y + eh * 0.6)],
                fill=_rgba(shade, 60 + 120 * w),
                width=lw,
            )
    if ea > 30:  # crow's feet
        n_cf = 2 + int(3 * w)
        length = ew * (0.25 + 0.4 * w)
        for sgn in (-1, 1):
            ox = cx + fx + sgn * (eye_dx + ew * 0.55)
            for k in range(n_cf):
                ang = math.radians(-30 + 60 * (k + 0.5) / n_cf)
                x1 = ox + sgn * length * math.cos(ang)
                y1 = eye_y + length * math.sin(ang)
                draw.line([(ox, eye_y), (x1, y1)], fill=_rgba(shade, 60 + 150 * w), width=lw)
    if ea > 18:  # nasolabial folds, from the nose wings to past the mouth corners
        a = 255 * 0.85 * _clip01((ea - 18) / 50) * (0.8 + 0.4 * smile)
        for sgn in (-1, 1):
            p0 = (cx + fx * 1.5 + sgn * nw * 0.7, nose_y - nw * 0.1)
            p2 = (cx + fx * 1.2 + sgn * mw * 0.62, mouth_y + lip * (1.0 + 2.0 * old))
            p1 = (cx + fx + sgn * (nw * 0.7 + mw * 0.62) * 0.62, (p0[1] + p2[1]) / 2)
            draw.line(_bezier(p0, p1, p2), fill=_rgba(shade, a), width=lw)
    if ea > 30:  # under-eye lines and, later, bags
        a = 50 + 160 * _clip01((ea - 30) / 40)
        for sgn in (-1, 1):
            ex = cx + fx + sgn * eye_dx
            draw.arc(
                (ex - ew * 0.45, eye_y - eh * 0.2, ex + ew * 0.45, eye_y + eh * 1.1),
                20,
                160,
                fill=_rgba(shade, a),
                width=lw,
            )
            if ea > 48:
                draw.arc(
                    (ex - ew * 0.5, eye_y, ex + ew * 0.5, eye_y + eh * 1.7),
                    25,
                    155,
                    fill=_rgba(shade, 80 + 120 * old),
                    width=lw,
                )
    if ea > 50:  # marionette lines
        for sgn in (-1, 1):
            mx = cx + fx * 1.2 + sgn * mw * 0.5
            draw.line(
                [(mx, mouth_y + lip * 0.5), (mx + sgn * mw * 0.06, mouth_y + lower * 0.22)],
                fill=_rgba(shade, 60 + 160 * old),
                width=lw,
            )
    if ea > 45:  # neck lines
        for k in range(1 + int(2 * old)):
            ny = bottom + hh * (0.06 + 0.06 * k)
            draw.arc(
                (cx - neck_w * 0.45, ny - hh * 0.04, cx + neck_w * 0.45, ny + hh * 0.04),
                20,
                160,
                fill=_rgba(shade, 70 + 120 * old),
                width=lw,
            )

    # ---- eyes: large, round and low in infants; hooded in the elderly
    sclera = _mix((248, 248, 244), (226, 220, 196), old)
    iris_r = eh * 0.5 * _lerp(1.08, 0.92, g)
    for sgn in (-1, 1):
        ex = cx + fx + sgn * eye_dx
        box = (ex - ew / 2, eye_y - eh / 2, ex + ew / 2, eye_y + eh / 2)
        draw.ellipse(box, fill=_rgb(sclera))
        ix = ex + fx * 0.3
        draw.ellipse(
            (ix - iris_r, eye_y - iris_r, ix + iris_r, eye_y + iris_r), fill=_rgb(t.eye_color)
        )
        pr = iris_r * 0.45
        draw.ellipse((ix - pr, eye_y - pr, ix + pr, eye_y + pr), fill=(12, 10, 10))
        hr = max(1.0, iris_r * 0.18)
        draw.ellipse(
            (ix + pr * 0.3, eye_y - pr * 1.1, ix + pr * 0.3 + hr * 2, eye_y - pr * 1.1 + hr * 2),
            fill=(255, 255, 255, 220),
        )
        # re-cover the iris outside the eye opening with skin (an almond eye opening)
        draw.chord((ex - ew, eye_y - eh * 1.5, ex + ew, eye_y - eh * 0.46), 0, 180, fill=_rgb(skin))
        draw.chord(
            (ex - ew, eye_y + eh * 0.46, ex + ew, eye_y + eh * 1.5), 180, 360, fill=_rgb(skin)
        )
        lid_w = max(1, round(u * 0.008))
        draw.arc(box, 190, 350, fill=(30, 22, 20), width=lid_w + (1 if not male else 0))
        if old > 0:  # hooded upper lid
            draw.chord(
                (ex - ew * 0.55, eye_y - eh * 0.9, ex + ew * 0.55, eye_y - eh * (0.5 - 0.5 * old)),
                0,
                180,
                fill=_rgb(_mix(skin, shade, 0.1)),
            )
        if g > 0.5:  # lid crease
            draw.arc(
                (ex - ew * 0.5, eye_y - eh * 1.0, ex + ew * 0.5, eye_y + eh * 0.2),
                200,
                340,
                fill=_rgba(shade, 90),
                width=lw,
            )

    # ---- brows (grey with the hair)
    brow_col = _mix(hair, grey_col, p["grey"] * 0.8)
    if age < 4:
        brow_col = _mix(brow_col, skin, 0.5)
    for sgn in (-1, 1):
        bx = cx + fx + sgn * eye_dx
        draw.line(
            [
                (bx - sgn * ew * 0.55, brow_y + brow_t * 0.2),
                (bx, brow_y - brow_t * 0.5),
                (bx + sgn * ew * 0.6, brow_y + brow_t * 0.4),
            ],
            fill=_rgb(brow_col),
            width=max(1, round(brow_t)),
            joint="curve",
        )

    # ---- nose: a button in infants, longer with a bridge in adults
    nx = cx + fx * 1.6
    if g > 0.35:
        for sgn in (-1, 1):
            draw.line(
                [
                    (nx + sgn * nw * 0.22, eye_y + eh * 0.4),
                    (nx + sgn * nw * 0.3, nose_y - nw * 0.35),
                ],
                fill=_rgba(shade, 40 + 60 * g),
                width=lw,
            )
    draw.arc(
        (nx - nw / 2, nose_y - nw * 0.45, nx + nw / 2, nose_y + nw * 0.25),
        10,
        170,
        fill=_rgba(shade, 150),
        width=lw,
    )
    for sgn in (-1, 1):
        ox = nx + sgn * nw * 0.22
        r_ = nw * 0.11
        draw.ellipse(
            (ox - r_, nose_y - r_ * 0.6, ox + r_, nose_y + r_ * 0.6), fill=_rgba(shade, 200)
        )

    # ---- beard / stubble / adolescent moustache (greys with the hair)
    beard_alpha = 0.0
    if male and 14 <= age < 18:
        beard_alpha = 0.18 * (age - 13) / 5
    elif male and age >= 18:
        beard_alpha = (0.8 if t.beard else 0.25) * _clip01((age - 16) / 8)
    mx = cx + fx * 1.2
    if beard_alpha > 0:
        roi = _Roi(img, cx - hw * 0.55, nose_y, cx + hw * 0.55, bottom + 2)
        x, y = roi.x, roi.y
        fm = roi.mask(face_mask_img)
        region = (
            (y > nose_y + (mouth_y - nose_y) * 0.35)
            & ((y > mouth_y + lip * 1.4) | (np.abs(x - mx) > mw * 0.55) | (y < mouth_y - lip * 1.3))
            & ((y > jaw_y - lower * 0.25) | (np.abs(x - mx) < mw * 0.8))
        )
        if not t.beard:  # stubble / moustache only around the mouth
            region &= (np.abs(x - mx) < mw * 0.75) & (y < bottom - hh * 0.02)
        h_, w_ = roi.shape
        tex = _smooth_noise(rng, (h_ // 3, w_ // 3), (h_, w_))
        alpha = fm * region * beard_alpha * (0.6 + 0.4 * tex)
        beard_col = _mix(hair, grey_col, p["grey"])
        _blend_mask(roi.arr, beard_col, alpha)
        roi.paste(img)

    # ---- mouth: thinner, paler lips with age; redder (make-up) lips for adult women
    lip_col = _mix(t.lip_color, skin, 0.35 * old)
    if not male and 16 <= age <= 70:
        lip_col = _mix(lip_col, (190, 50, 70), 0.35)
    corner_up = (smile - 0.3) * lip * 1.2 - old * lip * 0.6
    lx0, lx1 = mx - mw / 2, mx + mw / 2
    upper = (
        [(lx0, mouth_y - corner_up)]
        + [
            (mx + s * mw / 2, mouth_y - lip * (0.9 - 0.3 * abs(s)) * (1 - 0.2 * (abs(s) < 0.2)))
            for s in np.linspace(-0.8, 0.8, 7)
        ]
        + [(lx1, mouth_y - corner_up)]
    )
    lower_lip = (
        [(lx1, mouth_y - corner_up)]
        + [
            (mx + s * mw / 2, mouth_y + lip * (1.1 - 0.5 * abs(s)) + smile * lip * 0.3)
            for s in np.linspace(0.8, -0.8, 7)
        ]
        + [(lx0, mouth_y - corner_up)]
    )
    draw.polygon(upper + lower_lip, fill=_rgb(lip_col))
    draw.line(
        _bezier(
            (lx0, mouth_y - corner_up),
            (mx, mouth_y + smile * lip * 0.8),
            (lx1, mouth_y - corner_up),
        ),
        fill=_rgb(_mix(lip_col, (40, 20, 20), 0.6)),
        width=lw,
    )

    # ---- hair on the head: hairline, volume, recession, thinning, grey strands
    rec = p["recede"]
    ear_top = ear_y - ear_h * 0.5
    roi = _Roi(img, cx - hw / 2 - th - 2, top - th - 2, cx + hw / 2 + th + 2, ear_top + 2)
    x, y = roi.x, roi.y
    h_, w_ = roi.shape
    adx = np.abs(x - cx) / (hw / 2)
    hairline = hl - rec * (hl - top) * (0.55 + 0.35 * np.exp(-(((adx - 0.45) / 0.2) ** 2)))
    side = np.clip((adx - 0.72) / 0.26, 0, 1)
    hairline = hairline + (ear_top - hairline) * (side * side * (3 - 2 * side))
    cap = ((x - cx) ** 2 / (hw / 2 + th) ** 2 + (y - ym) ** 2 / (ry_top + th) ** 2 <= 1.0) & (
        y < hairline
    )
    if rec > 0.6:  # bald crown, hair kept on the sides
        b = (rec - 0.6) / 0.4
        crown = ((x - cx) / (hw * 0.42)) ** 2 + ((y - top) / (hh * 0.34)) ** 2 < 0.4 + 0.8 * b
        cap &= ~crown
    strands = _smooth_noise(rng, (h_ // 24, w_ // 2), (h_, w_))
    hair_alpha = cap * (1.0 - p["thin"] * (0.4 + 0.6 * strands))
    if age < 2:
        hair_alpha *= _lerp(0.45, 0.9, age / 2)
    mix = _smooth_noise(rng, (h_ // 8, w_ // 2), (h_, w_))
    grey_px = (mix < p["grey"]).astype(np.float32)[..., None]
    base = np.asarray(hair, np.float32) * (0.8 + 0.4 * strands[..., None])
    hair_px = base * (1 - grey_px) + np.asarray(grey_col, np.float32) * grey_px
    a = hair_alpha[..., None]
    roi.arr = roi.arr * (1 - a) + hair_px * a
    roi.paste(img)

    # ---- skin texture: rougher with age
    xs = [q[0] for q in outline]
    roi = _Roi(img, min(xs), top, max(xs) + 1, bottom + 1)
    h_, w_ = roi.shape
    fm = roi.mask(face_mask_img)[..., None]
    tex = _smooth_noise(rng, (h_ // 3, w_ // 3), (h_, w_))[..., None] - 0.5
    roi.arr += fm * tex * (4.0 + 20.0 * w)
    roi.paste(img)

    # ---- pose: rotation, scale, shift; then downsample to the output size
    # one affine warp to the 2x output, then a 2x box reduction (anti-aliasing)
    ccx, ccy = cx0 + shift[0], cy0 + shift[1]
    th_ = math.radians(angle)
    ca, sa = math.cos(th_) / scale, math.sin(th_) / scale
    s2 = u / 2
    coeffs = (ca, sa, ccx - ca * s2 - sa * s2, -sa, ca, ccy + sa * s2 - ca * s2)
    img = img.transform(
        (int(u), int(u)), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_rgb(bg)
    )
    img = img.reduce(SUPERSAMPLE)

    if not nuisance:
        return img
    # ---- lighting, colour cast, blur, sensor noise
    out = np.asarray(img, np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    phi = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0, 0.3) * (math.cos(phi) * xx + math.sin(phi) * yy) * 2
    contrast = rng.uniform(0.85, 1.15)
    mean = out.mean()
    out = (out - mean) * contrast + mean
    out = out * light[..., None] * rng.uniform(0.85, 1.12) * rng.uniform(0.95, 1.05, size=3)
    blur = rng.uniform() < 0.3
    radius = rng.uniform(0.3, 0.8)
    sigma = rng.uniform(1.0, 5.0)
    img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(radius * size / 112))
    out = np.asarray(img, np.float32) + rng.normal(0, sigma, size=(size, size, 3))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- the dataset


def age_histogram_weights(age_min: int = 1, age_max: int = 81) -> np.ndarray:
    """Target age distribution over ``age_min..age_max`` (sums to 1), shaped like MIVIA's
    (GLAE Fig. 1): a skewed peak at 29 (steep on the young side, a long right shoulder),
    over a floor of 2% of the peak so that every age has some samples. With the defaults:
    ~3% children (< 13), ~2% elderly (> 65), ~60% between 20 and 40.
    """
    if age_max < age_min:
        raise ValueError(f"age_max={age_max} is below age_min={age_min}")
    ages = np.arange(age_min, age_max + 1, dtype=np.float64)
    peak = 29.0
    left = np.exp(-0.5 * ((ages - peak) / 8.5) ** 2)
    right = np.exp(-0.5 * ((ages - peak) / 14.0) ** 2)
    w = np.where(ages < peak, left, right) + 0.02
    return w / w.sum()


def _quota(n: int, weights: np.ndarray, at_least_one: bool) -> np.ndarray:
    """Integer counts summing to ``n`` proportional to ``weights`` (largest remainder), with
    one of each first when ``at_least_one``: the histogram is exactly the target."""
    base = np.ones(len(weights), np.int64) if at_least_one else np.zeros(len(weights), np.int64)
    rest = n - int(base.sum())
    raw = weights * rest
    counts = np.floor(raw).astype(np.int64)
    short = rest - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:short]] += 1
    return base + counts


def plan_synthetic(
    num_samples: int = 4000,
    images_per_identity: int = 8,
    seed: int = 0,
    age_min: int = 1,
    age_max: int = 81,
) -> list[tuple[int, int, int]]:
    """``(identity, image_index, age)`` for every sample, sorted, without drawing anything.

    Ages follow :func:`age_histogram_weights` exactly; every age is present when
    ``num_samples >= 4 * (age_max - age_min + 1)`` (>= 324 for 1..81). A person's images
    span ages around a centre (sorted by age plus N(0, 8) noise, then cut into groups), so
    identities carry several ages, as people photographed over years do.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity={images_per_identity} must be >= 1")
    n_ages = age_max - age_min + 1
    weights = age_histogram_weights(age_min, age_max)
    counts = _quota(num_samples, weights, at_least_one=num_samples >= 4 * n_ages)
    ages = np.repeat(np.arange(age_min, age_max + 1), counts)
    rng = np.random.default_rng([seed, 7])
    order = np.argsort(ages + rng.normal(0, 8.0, size=len(ages)), kind="stable")
    ages = ages[order]
    groups = [ages[i : i + images_per_identity] for i in range(0, len(ages), images_per_identity)]
    ids = rng.permutation(len(groups))
    plan = []
    for gi, group in enumerate(groups):
        group = np.sort(rng.permutation(group)) if len(group) > 1 else group
        for j, a in enumerate(group):
            plan.append((int(ids[gi]), j, int(a)))
    plan.sort()
    return plan


def iter_synthetic(
    path_or_none: str | os.PathLike[str] | None = None,
    report: ImportReport | None = None,
    *,
    num_samples: int = 4000,
    image_size: int = 112,
    images_per_identity: int = 8,
    seed: int = 0,
    age_std: bool = False,
    age_min: int = 1,
    age_max: int = 81,
    jpeg_quality: int = 92,
    progress: bool = False,
) -> Iterator[Record]:
    """Yield ``num_samples`` synthetic face records (JPEG bytes), deterministic for ``seed``.

    ``path_or_none`` is ignored (the importer interface passes an input path). Keys are
    ``syn_<identity>_<image>``; identity names ``syn_<identity>``; gender and race labels come
    from the person's traits. ``age_std=True`` adds an apparent-age style standard deviation
    that grows with age (about 1 year for a child, 4-5 for the elderly).
    """
    del path_or_none
    if report is None:
        report = ImportReport(source="synthetic")
    report.source = report.source or "synthetic"
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw a face (use >= 16)")
    plan = plan_synthetic(num_samples, images_per_identity, seed, age_min, age_max)
    traits: dict[int, IdentityTraits] = {}
    items: Any = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc="synthetic", unit="img", mininterval=1.0)
    for ident, j, age in items:
        if ident not in traits:
            traits = {ident: random_traits(np.random.default_rng([seed, 1, ident]))}
        tr = traits[ident]
        rng = np.random.default_rng([seed, 2, ident, j])
        img = render_face(float(age), tr, rng, image_size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
        std = None
        if age_std:
            std = round(0.8 + 0.05 * age + float(rng.uniform(0.0, 0.8)), 2)
        key = f"syn_{ident:05d}_{j:02d}"
        report.ok()
        yield Record(
            key=key,
            image=buf.getvalue(),
            age=float(age),
            age_std=std,
            gender=tr.gender,
            race=tr.race,
            identity=f"syn_{ident:05d}",
            source=f"synthetic:seed={seed}:{key}",
        )
