"""Synthetic people: what stays fixed for a person (race palettes, face shape, colours,
hair and beard) and how a face changes with age (proportions, wrinkles, grey hair); pure
numbers, no drawing (``render`` draws them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CANVAS",
    "GREY_HAIR",
    "RACE_WEIGHTS",
    "RGB",
    "SUPERSAMPLE",
    "WHITE_HAIR",
    "IdentityTraits",
    "age_params",
    "clip01",
    "face_geometry",
    "geometry_at",
    "lerp",
    "mix_rgb",
    "random_traits",
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


def mix_rgb(a: RGB, b: RGB, t: float) -> RGB:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def random_traits(
    rng: np.random.Generator, gender: int | None = None, race: int | None = None
) -> IdentityTraits:
    """Draw one person's fixed traits (gender and race may be forced)."""
    g = int(rng.integers(2)) if gender is None else int(gender)
    r = int(rng.choice(5, p=RACE_WEIGHTS)) if race is None else int(race)
    light, dark = SKIN_PALETTES[r]
    skin = mix_rgb(light, dark, float(rng.uniform()))
    hair = HAIR_COLORS[int(rng.choice(len(HAIR_COLORS), p=HAIR_BY_RACE[r]))]
    hair = tuple(float(np.clip(c * rng.uniform(0.85, 1.15), 0, 255)) for c in hair)
    eye = EYE_COLORS[int(rng.choice(len(EYE_COLORS), p=EYE_BY_RACE[r]))]
    lip_base = (196, 92, 96) if g == 1 else (176, 104, 98)
    lip = mix_rgb(lip_base, (skin[0] * 0.8, skin[1] * 0.55, skin[2] * 0.55), 0.45)
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


def clip01(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def age_params(age: float, traits: IdentityTraits) -> dict[str, float]:
    """The age cues as numbers in [0, 1] (``growth``: 0 infant .. 1 adult proportions;
    ``wrinkles``: 0 at ~22 .. 1 at ~77; ``old``: 0 at 55 .. 1 at 80; ``grey`` and ``white``
    hair fractions; ``recede``: hairline recession; ``thin``: hair thinning).
    Exposed so tests can check that each cue moves the right way with age."""
    ea = age - traits.ageing  # "effective" age for skin ageing
    growth = clip01((age - 1.0) / 17.0) ** 0.75
    wrinkles = clip01((ea - 22.0) / 55.0)
    old = clip01((ea - 55.0) / 25.0)
    grey = 1.0 / (1.0 + math.exp(-(age - traits.grey_onset) / 5.0)) if age > 25 else 0.0
    white = clip01((age - 62.0) / 18.0) * grey
    if traits.gender == 0:
        recede = (
            clip01((ea - 28.0) / 35.0) if traits.bald_prone else 0.3 * clip01((ea - 45.0) / 30.0)
        )
    else:
        recede = 0.0
    thin = 0.6 * clip01((ea - 55.0) / 30.0)
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


def geometry_at(
    age: float, t: IdentityTraits, u: float, cx0: float, cy0: float
) -> dict[str, float]:
    """Where the parts of the face go (canvas pixels; ``u`` = output frame size, centred at
    ``cx0, cy0``). Children: eyes low in a tall cranium and large, a round face, a short lower
    face; the face lengthens to adult proportions by ~18; nose and ears keep growing, lips
    thin, lids droop with old age."""
    p = age_params(age, t)
    g, old = p["growth"], p["old"]
    male = t.gender == 0
    hw = u * 0.48 * t.face_width * lerp(1.04, 1.0, g)  # head width
    hh = hw * (lerp(1.04, 1.30, g) * t.face_length + 0.05 * old)  # head height
    cx, cy = cx0, cy0 + u * 0.03
    top, bottom = cy - hh / 2, cy + hh / 2
    eye_y = top + hh * lerp(0.58, 0.47, g)
    lower = bottom - eye_y
    ew = hw * lerp(0.22, 0.155, g)
    eh = ew * lerp(0.62, 0.44, g) * (1 - 0.18 * old)
    nose_y = eye_y + lower * lerp(0.36, 0.43, g)
    ear_h = hh * lerp(0.20, 0.24, g) * (1 + 0.18 * old)
    brow_y = eye_y - eh * 0.55 - hw * lerp(0.10, 0.075, g)
    f_hl = 0.62 if (t.hair_style == 2 and not male) else lerp(0.30, 0.42, g)  # 0.62: fringe
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
        "eye_dx": hw * lerp(0.23, 0.21, g) * t.eye_spacing,
        "ew": ew,
        "eh": eh,
        "nose_y": nose_y,
        "nw": hw * lerp(0.12, 0.19, g) * t.nose_width * (1 + 0.15 * old),
        "mouth_y": eye_y + lower * lerp(0.64, 0.63, g),
        "mw": hw * lerp(0.28, 0.38, g) * (1.0 if male else 0.93),
        "lip": hw * lerp(0.045, 0.055, g) * (1 - 0.45 * old) * (1.0 if male else 1.15),
        "brow_y": brow_y,
        "brow_t": hw * 0.032 * t.brow * lerp(0.45, 1.0, g) * (1.25 if male else 0.9),
        "ear_h": ear_h,
        "ear_y": (eye_y + nose_y) / 2 + 0.1 * ear_h,
        "th": hw * lerp(0.025, 0.08, g) * (1 - 0.4 * old) * (1.25 if t.hair_style == 1 else 1.0),
        "hl": top + (brow_y - top) * f_hl,  # hairline (before recession)
    }


def face_geometry(age: float, traits: IdentityTraits, size: int = 112) -> dict[str, Any]:
    """Key positions of the face drawn by ``render_face(..., nuisance=False)``, in output
    pixels: ``head_top``, ``chin``, ``head_width``, ``head_height``, ``eye_y``,
    ``eye_width``, ``hair_top`` (outer edge of the hair at the crown), ``hairline_y`` and
    ``landmarks`` (5 x 2: eyes, nose tip, mouth corners — the aligner's five points)."""
    u = float(size * SUPERSAMPLE)
    c0 = round(u * CANVAS) / 2.0
    geo = geometry_at(age, traits, u, c0, c0)
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
