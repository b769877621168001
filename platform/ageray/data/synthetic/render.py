"""Drawing one synthetic face at a given age: Pillow shapes at 2x (anti-aliased), the age
cues of :mod:`ageray.data.synthetic.people`, then per-image nuisance (pose, light, noise).

One long function on purpose: the face is drawn back to front (background, hair, head,
ears, features, wrinkles, beard, hair in front, nuisance) and each layer reads the same
geometry; split into pieces it would pass a dozen values between them. Deterministic for
its ``rng`` (same seed, same bytes), which the tests check.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ageray.data.synthetic.people import (
    CANVAS,
    GREY_HAIR,
    RGB,
    SUPERSAMPLE,
    WHITE_HAIR,
    IdentityTraits,
    age_params,
    clip01,
    geometry_at,
    lerp,
    mix_rgb,
)

__all__ = ["render_face"]

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
    geo = geometry_at(age, t, u, cx0, cy0)
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
        hair = mix_rgb(hair, (205, 170, 110), 0.35 * (1 - age / 6))
    grey_col = mix_rgb(GREY_HAIR, WHITE_HAIR, p["white"])

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
        hair_len = lerp(0.15, 0.45, clip01((age - 4) / 10)) * (1 - 0.6 * old)
        if male:
            hair_len *= 0.5
        draw.rounded_rectangle(
            (cx - hw * 0.62, ym - hh * 0.2, cx + hw * 0.62, bottom + hh * hair_len),
            radius=hw * 0.3,
            fill=_rgb(mix_rgb(hair, grey_col, p["grey"])),
        )

    # ---- shoulders, neck, ears
    sh_w = hw * (1.9 if male else 1.65) * lerp(0.8, 1.0, g)
    draw.ellipse(
        (cx - sh_w / 2, bottom + hh * 0.18, cx + sh_w / 2, bottom + hh * 0.95),
        fill=_rgb(t.clothes),
    )
    neck_w = hw * lerp(0.42, 0.52, g) * (1.1 if male else 0.95)
    neck_col = mix_rgb(skin, shade, 0.25)
    draw.rectangle((cx - neck_w / 2, ym, cx + neck_w / 2, bottom + hh * 0.3), fill=_rgb(neck_col))
    ear_w = ear_h * 0.45
    for sgn in (-1, 1):
        ex = cx + sgn * hw * 0.49
        draw.ellipse(
            (ex - ear_w / 2, ear_y - ear_h / 2, ex + ear_w / 2, ear_y + ear_h / 2),
            fill=_rgb(mix_rgb(skin, shade, 0.12)),
        )
        draw.ellipse(
            (ex - ear_w / 4, ear_y - ear_h / 3, ex + ear_w / 4, ear_y + ear_h / 3),
            fill=_rgba(shade, 90),
        )

    # ---- face outline: round in children, long with a jaw in adults, jowls in the elderly
    cheek = lerp(1.0, 0.96, g)
    jaw_w = hw * (lerp(0.86, (0.80 if male else 0.70) + 0.06 * t.jaw, g) + 0.05 * old)
    jaw_y = ym + (bottom - ym) * (lerp(0.62, 0.70, g) + 0.05 * old)
    chin_w = hw * lerp(0.50, (0.36 if male else 0.26) + 0.06 * t.jaw, g)
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
        a = 255 * 0.85 * clip01((ea - 18) / 50) * (0.8 + 0.4 * smile)
        for sgn in (-1, 1):
            p0 = (cx + fx * 1.5 + sgn * nw * 0.7, nose_y - nw * 0.1)
            p2 = (cx + fx * 1.2 + sgn * mw * 0.62, mouth_y + lip * (1.0 + 2.0 * old))
            p1 = (cx + fx + sgn * (nw * 0.7 + mw * 0.62) * 0.62, (p0[1] + p2[1]) / 2)
            draw.line(_bezier(p0, p1, p2), fill=_rgba(shade, a), width=lw)
    if ea > 30:  # under-eye lines and, later, bags
        a = 50 + 160 * clip01((ea - 30) / 40)
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
    sclera = mix_rgb((248, 248, 244), (226, 220, 196), old)
    iris_r = eh * 0.5 * lerp(1.08, 0.92, g)
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
                fill=_rgb(mix_rgb(skin, shade, 0.1)),
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
    brow_col = mix_rgb(hair, grey_col, p["grey"] * 0.8)
    if age < 4:
        brow_col = mix_rgb(brow_col, skin, 0.5)
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
        beard_alpha = (0.8 if t.beard else 0.25) * clip01((age - 16) / 8)
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
        beard_col = mix_rgb(hair, grey_col, p["grey"])
        _blend_mask(roi.arr, beard_col, alpha)
        roi.paste(img)

    # ---- mouth: thinner, paler lips with age; redder (make-up) lips for adult women
    lip_col = mix_rgb(t.lip_color, skin, 0.35 * old)
    if not male and 16 <= age <= 70:
        lip_col = mix_rgb(lip_col, (190, 50, 70), 0.35)
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
        fill=_rgb(mix_rgb(lip_col, (40, 20, 20), 0.6)),
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
        hair_alpha *= lerp(0.45, 0.9, age / 2)
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
