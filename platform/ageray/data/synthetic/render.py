"""Drawing one synthetic face at a given age: Pillow shapes at 2x (anti-aliased), the age
cues of :mod:`ageray.data.synthetic.people`, then per-image nuisance (pose, light, noise).

The face is drawn back to front, one named layer at a time (``_LAYERS``: background, long
hair, shoulders and ears, outline, skin marks, wrinkles, eyes and brows, nose, beard, mouth,
hair on the head, skin texture), then posed and, with nuisance, lit and noised. Every layer
reads the same geometry, held with the canvas in one ``_Face``. Deterministic for its
``rng`` (same seed, same bytes; layers draw from it in this fixed order), which the tests
check, down to the pixels of 72 faces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ageray.data.synthetic.drawing import Roi, bezier, blend_mask, chaikin, rgb, rgba, smooth_noise
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

# ----------------------------------------------------------------------------- the face


@dataclass
class _Face:
    """One face being drawn: the age cues, the geometry every layer reads (canvas pixels),
    the per-image nuisance draws, the canvas and what earlier layers leave for later ones
    (the outline and its mask, the jaw line, the neck, the line width, the mouth's centre)."""

    age: float
    t: IdentityTraits
    p: dict[str, float]  # age_params: growth, wrinkles, old, eff_age, grey, white, ...
    rng: np.random.Generator
    u: float  # the output frame, in canvas pixels
    c: int  # canvas side
    centre: float  # the canvas centre (x and y)
    geo: dict[str, float]  # geometry_at
    yaw: float
    smile: float
    angle: float
    scale: float
    shift: np.ndarray
    bg_jitter: np.ndarray
    skin: RGB
    shade: RGB  # wrinkle / fold colour
    hair: RGB
    grey_col: RGB
    img: Image.Image = field(init=False)
    draw: ImageDraw.ImageDraw = field(init=False)
    bg: np.ndarray = field(init=False)
    neck_w: float = 0.0
    jaw_y: float = 0.0
    ry_top: float = 0.0
    outline: list[tuple[float, float]] = field(default_factory=list)
    face_mask: Image.Image | None = None
    lw: int = 1
    mx: float = 0.0

    @property
    def male(self) -> bool:
        return self.t.gender == 0

    @property
    def fx(self) -> float:
        """Pseudo-yaw: inner features slide sideways."""
        return self.yaw * self.geo["hw"] * 0.06

    def __getattr__(self, name: str) -> float:
        # the geometry's names (hw, hh, cx, top, bottom, eye_y, ...) read as attributes
        geo = self.__dict__.get("geo")
        if geo is not None and name in geo:
            return geo[name]
        raise AttributeError(name)


def _start_face(
    age: float, identity_traits: IdentityTraits, rng: np.random.Generator, size: int, *,
    nuisance: bool,
) -> _Face:  # fmt: skip
    """Age cues, the per-image nuisance draws (always drawn, so the stream of rng calls is
    stable), the geometry, and the skin and hair colours (toddlers lighter, grey then
    white)."""
    t = identity_traits
    p = age_params(age, t)
    u = float(size * SUPERSAMPLE)
    c = round(u * CANVAS)
    cx0 = cy0 = c / 2.0
    yaw = float(rng.uniform(-1, 1))
    smile = float(rng.uniform(0, 1))
    angle = float(np.clip(rng.normal(0, 4.0), -10, 10))
    scale = float(rng.uniform(0.92, 1.08))
    shift = rng.uniform(-0.03, 0.03, size=2) * u
    bg_jitter = rng.uniform(-18, 18, size=3)
    if not nuisance:
        yaw, smile, angle, scale, shift = 0.0, 0.3, 0.0, 1.0, np.zeros(2)
        bg_jitter = np.zeros(3)
    geo = geometry_at(age, t, u, cx0, cy0)
    skin: RGB = t.skin
    shade: RGB = (skin[0] * 0.55, skin[1] * 0.45, skin[2] * 0.42)
    hair: RGB = t.hair_color
    if age < 6 and t.race == 0:
        hair = mix_rgb(hair, (205, 170, 110), 0.35 * (1 - age / 6))
    grey_col = mix_rgb(GREY_HAIR, WHITE_HAIR, p["white"])
    return _Face(
        age, t, p, rng, u, c, cx0, geo, yaw, smile, angle, scale, shift, bg_jitter,
        skin, shade, hair, grey_col,
    )  # fmt: skip


def _draw_background(f: _Face) -> None:
    """Colour + vertical gradient + blotches, drawn small and upsampled: the canvas."""
    rng = f.rng
    bg = np.clip(np.asarray(f.t.background) + f.bg_jitter, 0, 255).astype(np.float32)
    ramp = (np.linspace(-0.5, 0.5, 8, dtype=np.float32)[:, None, None]) * np.float32(
        rng.uniform(-50, 50)
    )
    blot = rng.random((8, 8, 1)).astype(np.float32) * np.float32(rng.uniform(0, 40)) - 20
    small_bg = np.clip(bg + ramp + blot, 0, 255).astype(np.uint8)
    f.bg = bg
    f.img = Image.fromarray(small_bg, "RGB").resize((f.c, f.c), Image.BILINEAR)
    f.draw = ImageDraw.Draw(f.img, "RGBA")


def _draw_long_hair(f: _Face) -> None:
    """Long hair behind the head (drawn first, the face covers it)."""
    t, age, male, p = f.t, f.age, f.male, f.p
    hw, hh, cx, ym, bottom = f.hw, f.hh, f.cx, f.ym, f.bottom
    long_hair = (not male and age >= 4 and t.hair_style != 2) or (
        male and t.hair_style == 2 and 16 <= age <= 45
    )
    if not long_hair:
        return
    hair_len = lerp(0.15, 0.45, clip01((age - 4) / 10)) * (1 - 0.6 * p["old"])
    if male:
        hair_len *= 0.5
    f.draw.rounded_rectangle(
        (cx - hw * 0.62, ym - hh * 0.2, cx + hw * 0.62, bottom + hh * hair_len),
        radius=hw * 0.3,
        fill=rgb(mix_rgb(f.hair, f.grey_col, p["grey"])),
    )


def _draw_shoulders_neck_ears(f: _Face) -> None:
    t, male, g, draw, skin, shade = f.t, f.male, f.p["growth"], f.draw, f.skin, f.shade
    hw, hh, cx, ym, bottom = f.hw, f.hh, f.cx, f.ym, f.bottom
    ear_h, ear_y = f.ear_h, f.ear_y
    sh_w = hw * (1.9 if male else 1.65) * lerp(0.8, 1.0, g)
    draw.ellipse(
        (cx - sh_w / 2, bottom + hh * 0.18, cx + sh_w / 2, bottom + hh * 0.95),
        fill=rgb(t.clothes),
    )
    neck_w = hw * lerp(0.42, 0.52, g) * (1.1 if male else 0.95)
    neck_col = mix_rgb(skin, shade, 0.25)
    draw.rectangle((cx - neck_w / 2, ym, cx + neck_w / 2, bottom + hh * 0.3), fill=rgb(neck_col))
    f.neck_w = neck_w
    ear_w = ear_h * 0.45
    for sgn in (-1, 1):
        ex = cx + sgn * hw * 0.49
        draw.ellipse(
            (ex - ear_w / 2, ear_y - ear_h / 2, ex + ear_w / 2, ear_y + ear_h / 2),
            fill=rgb(mix_rgb(skin, shade, 0.12)),
        )
        draw.ellipse(
            (ex - ear_w / 4, ear_y - ear_h / 3, ex + ear_w / 4, ear_y + ear_h / 3),
            fill=rgba(shade, 90),
        )


def _draw_face_outline(f: _Face) -> None:
    """Round in children, long with a jaw in adults, jowls in the elderly; also the face
    mask later layers (beard, skin texture) stay inside."""
    t, male, g, old = f.t, f.male, f.p["growth"], f.p["old"]
    hw, hh, cx, ym, top, bottom = f.hw, f.hh, f.cx, f.ym, f.top, f.bottom
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
    outline = chaikin(pts, 3)
    f.draw.polygon(outline, fill=rgb(f.skin))
    face_mask_img = Image.new("L", (f.c, f.c), 0)
    ImageDraw.Draw(face_mask_img).polygon(outline, fill=255)
    f.jaw_y, f.ry_top, f.outline, f.face_mask = jaw_y, ry_top, outline, face_mask_img


def _draw_skin_marks(f: _Face) -> None:
    """Children: rosy cheeks; teenagers: acne; elderly: age spots."""
    t, age, ea, rng, draw, skin = f.t, f.age, f.p["eff_age"], f.rng, f.draw, f.skin
    u, fx = f.u, f.fx
    hw, hh, cx, top = f.hw, f.hh, f.cx, f.top
    nose_y, lower, brow_y, mouth_y = f.nose_y, f.lower, f.brow_y, f.mouth_y
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
                fill=rgba((skin[0] * 0.62, skin[1] * 0.5, skin[2] * 0.38), 130),
            )


def _draw_upper_wrinkles(f: _Face) -> None:
    """Forehead lines, frown lines between the brows, crow's feet: thicker and darker with
    age (also sets the line width every later feature uses)."""
    ea, w, rng, draw, shade = f.p["eff_age"], f.p["wrinkles"], f.rng, f.draw, f.shade
    u, fx = f.u, f.fx
    hw, cx, top, brow_y, brow_t = f.hw, f.cx, f.top, f.brow_y, f.brow_t
    eye_y, eye_dx, ew, eh = f.eye_y, f.eye_dx, f.ew, f.eh
    lw = f.lw = max(1, round(u * (0.008 + 0.007 * w)))
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
            draw.line(line, fill=rgba(shade, 70 + 150 * w), width=lw)
    if ea > 42:  # frown lines between the brows
        for sgn in (-1, 1):
            gx = cx + fx + sgn * hw * 0.035
            draw.line(
                [(gx, brow_y - brow_t), (gx + sgn * hw * 0.01, brow_y + eh * 0.6)],
                fill=rgba(shade, 60 + 120 * w),
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
                draw.line([(ox, eye_y), (x1, y1)], fill=rgba(shade, 60 + 150 * w), width=lw)


def _draw_folds_and_eye_lines(f: _Face) -> None:
    """Nasolabial folds (from the nose wings to past the mouth corners), under-eye lines
    and, later, bags."""
    ea, old, draw, shade, lw, fx = f.p["eff_age"], f.p["old"], f.draw, f.shade, f.lw, f.fx
    cx, eye_y, eye_dx, ew, eh, smile = f.cx, f.eye_y, f.eye_dx, f.ew, f.eh, f.smile
    nose_y, nw, mouth_y, mw, lip = f.nose_y, f.nw, f.mouth_y, f.mw, f.lip
    if ea > 18:  # nasolabial folds, from the nose wings to past the mouth corners
        a = 255 * 0.85 * clip01((ea - 18) / 50) * (0.8 + 0.4 * smile)
        for sgn in (-1, 1):
            p0 = (cx + fx * 1.5 + sgn * nw * 0.7, nose_y - nw * 0.1)
            p2 = (cx + fx * 1.2 + sgn * mw * 0.62, mouth_y + lip * (1.0 + 2.0 * old))
            p1 = (cx + fx + sgn * (nw * 0.7 + mw * 0.62) * 0.62, (p0[1] + p2[1]) / 2)
            draw.line(bezier(p0, p1, p2), fill=rgba(shade, a), width=lw)
    if ea > 30:  # under-eye lines and, later, bags
        a = 50 + 160 * clip01((ea - 30) / 40)
        for sgn in (-1, 1):
            ex = cx + fx + sgn * eye_dx
            draw.arc(
                (ex - ew * 0.45, eye_y - eh * 0.2, ex + ew * 0.45, eye_y + eh * 1.1),
                20,
                160,
                fill=rgba(shade, a),
                width=lw,
            )
            if ea > 48:
                draw.arc(
                    (ex - ew * 0.5, eye_y, ex + ew * 0.5, eye_y + eh * 1.7),
                    25,
                    155,
                    fill=rgba(shade, 80 + 120 * old),
                    width=lw,
                )


def _draw_jowl_and_neck_lines(f: _Face) -> None:
    """Marionette lines from the mouth corners and neck lines, late in life."""
    ea, old, draw, shade, lw, fx = f.p["eff_age"], f.p["old"], f.draw, f.shade, f.lw, f.fx
    hh, cx, bottom, lower = f.hh, f.cx, f.bottom, f.lower
    mouth_y, mw, lip, neck_w = f.mouth_y, f.mw, f.lip, f.neck_w
    if ea > 50:  # marionette lines
        for sgn in (-1, 1):
            mx = cx + fx * 1.2 + sgn * mw * 0.5
            draw.line(
                [(mx, mouth_y + lip * 0.5), (mx + sgn * mw * 0.06, mouth_y + lower * 0.22)],
                fill=rgba(shade, 60 + 160 * old),
                width=lw,
            )
    if ea > 45:  # neck lines
        for k in range(1 + int(2 * old)):
            ny = bottom + hh * (0.06 + 0.06 * k)
            draw.arc(
                (cx - neck_w * 0.45, ny - hh * 0.04, cx + neck_w * 0.45, ny + hh * 0.04),
                20,
                160,
                fill=rgba(shade, 70 + 120 * old),
                width=lw,
            )


def _draw_eye(f: _Face, sgn: int, sclera: RGB, iris_r: float) -> None:
    """One eye: sclera, iris, pupil, highlight, the almond opening, lids and crease."""
    t, male, g, old, draw = f.t, f.male, f.p["growth"], f.p["old"], f.draw
    skin, shade, lw, u, fx = f.skin, f.shade, f.lw, f.u, f.fx
    cx, eye_y, eye_dx, ew, eh = f.cx, f.eye_y, f.eye_dx, f.ew, f.eh
    ex = cx + fx + sgn * eye_dx
    box = (ex - ew / 2, eye_y - eh / 2, ex + ew / 2, eye_y + eh / 2)
    draw.ellipse(box, fill=rgb(sclera))
    ix = ex + fx * 0.3
    draw.ellipse((ix - iris_r, eye_y - iris_r, ix + iris_r, eye_y + iris_r), fill=rgb(t.eye_color))
    pr = iris_r * 0.45
    draw.ellipse((ix - pr, eye_y - pr, ix + pr, eye_y + pr), fill=(12, 10, 10))
    hr = max(1.0, iris_r * 0.18)
    draw.ellipse(
        (ix + pr * 0.3, eye_y - pr * 1.1, ix + pr * 0.3 + hr * 2, eye_y - pr * 1.1 + hr * 2),
        fill=(255, 255, 255, 220),
    )
    # re-cover the iris outside the eye opening with skin (an almond eye opening)
    draw.chord((ex - ew, eye_y - eh * 1.5, ex + ew, eye_y - eh * 0.46), 0, 180, fill=rgb(skin))
    draw.chord((ex - ew, eye_y + eh * 0.46, ex + ew, eye_y + eh * 1.5), 180, 360, fill=rgb(skin))
    lid_w = max(1, round(u * 0.008))
    draw.arc(box, 190, 350, fill=(30, 22, 20), width=lid_w + (1 if not male else 0))
    if old > 0:  # hooded upper lid
        draw.chord(
            (ex - ew * 0.55, eye_y - eh * 0.9, ex + ew * 0.55, eye_y - eh * (0.5 - 0.5 * old)),
            0,
            180,
            fill=rgb(mix_rgb(skin, shade, 0.1)),
        )
    if g > 0.5:  # lid crease
        draw.arc(
            (ex - ew * 0.5, eye_y - eh * 1.0, ex + ew * 0.5, eye_y + eh * 0.2),
            200,
            340,
            fill=rgba(shade, 90),
            width=lw,
        )


def _draw_eyes_and_brows(f: _Face) -> None:
    """Eyes large, round and low in infants, hooded in the elderly; brows grey with the
    hair."""
    g, old, age, draw = f.p["growth"], f.p["old"], f.age, f.draw
    sclera = mix_rgb((248, 248, 244), (226, 220, 196), old)
    iris_r = f.eh * 0.5 * lerp(1.08, 0.92, g)
    for sgn in (-1, 1):
        _draw_eye(f, sgn, sclera, iris_r)
    brow_col = mix_rgb(f.hair, f.grey_col, f.p["grey"] * 0.8)
    if age < 4:
        brow_col = mix_rgb(brow_col, f.skin, 0.5)
    brow_y, brow_t, ew = f.brow_y, f.brow_t, f.ew
    for sgn in (-1, 1):
        bx = f.cx + f.fx + sgn * f.eye_dx
        draw.line(
            [
                (bx - sgn * ew * 0.55, brow_y + brow_t * 0.2),
                (bx, brow_y - brow_t * 0.5),
                (bx + sgn * ew * 0.6, brow_y + brow_t * 0.4),
            ],
            fill=rgb(brow_col),
            width=max(1, round(brow_t)),
            joint="curve",
        )


def _draw_nose(f: _Face) -> None:
    """A button in infants, longer with a bridge in adults."""
    g, draw, shade, lw = f.p["growth"], f.draw, f.shade, f.lw
    nose_y, nw, eye_y, eh = f.nose_y, f.nw, f.eye_y, f.eh
    nx = f.cx + f.fx * 1.6
    if g > 0.35:
        for sgn in (-1, 1):
            draw.line(
                [
                    (nx + sgn * nw * 0.22, eye_y + eh * 0.4),
                    (nx + sgn * nw * 0.3, nose_y - nw * 0.35),
                ],
                fill=rgba(shade, 40 + 60 * g),
                width=lw,
            )
    draw.arc(
        (nx - nw / 2, nose_y - nw * 0.45, nx + nw / 2, nose_y + nw * 0.25),
        10,
        170,
        fill=rgba(shade, 150),
        width=lw,
    )
    for sgn in (-1, 1):
        ox = nx + sgn * nw * 0.22
        r_ = nw * 0.11
        draw.ellipse(
            (ox - r_, nose_y - r_ * 0.6, ox + r_, nose_y + r_ * 0.6), fill=rgba(shade, 200)
        )


def _draw_beard(f: _Face) -> None:
    """Beard, stubble or an adolescent moustache (greys with the hair), in numpy on the
    part of the canvas around the mouth and jaw."""
    t, age, male, img, rng = f.t, f.age, f.male, f.img, f.rng
    hw, hh, cx, bottom, lower = f.hw, f.hh, f.cx, f.bottom, f.lower
    nose_y, mouth_y, mw, lip, jaw_y = f.nose_y, f.mouth_y, f.mw, f.lip, f.jaw_y
    beard_alpha = 0.0
    if male and 14 <= age < 18:
        beard_alpha = 0.18 * (age - 13) / 5
    elif male and age >= 18:
        beard_alpha = (0.8 if t.beard else 0.25) * clip01((age - 16) / 8)
    mx = f.mx = cx + f.fx * 1.2
    if beard_alpha <= 0:
        return
    roi = Roi(img, cx - hw * 0.55, nose_y, cx + hw * 0.55, bottom + 2)
    x, y = roi.x, roi.y
    fm = roi.mask(f.face_mask)
    region = (
        (y > nose_y + (mouth_y - nose_y) * 0.35)
        & ((y > mouth_y + lip * 1.4) | (np.abs(x - mx) > mw * 0.55) | (y < mouth_y - lip * 1.3))
        & ((y > jaw_y - lower * 0.25) | (np.abs(x - mx) < mw * 0.8))
    )
    if not t.beard:  # stubble / moustache only around the mouth
        region &= (np.abs(x - mx) < mw * 0.75) & (y < bottom - hh * 0.02)
    h_, w_ = roi.shape
    tex = smooth_noise(rng, (h_ // 3, w_ // 3), (h_, w_))
    alpha = fm * region * beard_alpha * (0.6 + 0.4 * tex)
    beard_col = mix_rgb(f.hair, f.grey_col, f.p["grey"])
    blend_mask(roi.arr, beard_col, alpha)
    roi.paste(img)


def _draw_mouth(f: _Face) -> None:
    """Thinner, paler lips with age; redder (make-up) lips for adult women."""
    t, age, male, old, smile = f.t, f.age, f.male, f.p["old"], f.smile
    draw, skin, lw = f.draw, f.skin, f.lw
    mx, mouth_y, mw, lip = f.mx, f.mouth_y, f.mw, f.lip
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
    draw.polygon(upper + lower_lip, fill=rgb(lip_col))
    draw.line(
        bezier(
            (lx0, mouth_y - corner_up),
            (mx, mouth_y + smile * lip * 0.8),
            (lx1, mouth_y - corner_up),
        ),
        fill=rgb(mix_rgb(lip_col, (40, 20, 20), 0.6)),
        width=lw,
    )


def _draw_head_hair(f: _Face) -> None:
    """Hair on the head: hairline, volume, recession, thinning, grey strands."""
    age, p, img, rng, hair, grey_col = f.age, f.p, f.img, f.rng, f.hair, f.grey_col
    hw, hh, cx, ym, top, th, hl, ry_top = f.hw, f.hh, f.cx, f.ym, f.top, f.th, f.hl, f.ry_top
    rec = p["recede"]
    ear_top = f.ear_y - f.ear_h * 0.5
    roi = Roi(img, cx - hw / 2 - th - 2, top - th - 2, cx + hw / 2 + th + 2, ear_top + 2)
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
    strands = smooth_noise(rng, (h_ // 24, w_ // 2), (h_, w_))
    hair_alpha = cap * (1.0 - p["thin"] * (0.4 + 0.6 * strands))
    if age < 2:
        hair_alpha *= lerp(0.45, 0.9, age / 2)
    mix = smooth_noise(rng, (h_ // 8, w_ // 2), (h_, w_))
    grey_px = (mix < p["grey"]).astype(np.float32)[..., None]
    base = np.asarray(hair, np.float32) * (0.8 + 0.4 * strands[..., None])
    hair_px = base * (1 - grey_px) + np.asarray(grey_col, np.float32) * grey_px
    a = hair_alpha[..., None]
    roi.arr = roi.arr * (1 - a) + hair_px * a
    roi.paste(img)


def _add_skin_texture(f: _Face) -> None:
    """Skin texture inside the face outline: rougher with age."""
    xs = [q[0] for q in f.outline]
    roi = Roi(f.img, min(xs), f.top, max(xs) + 1, f.bottom + 1)
    h_, w_ = roi.shape
    fm = roi.mask(f.face_mask)[..., None]
    tex = smooth_noise(f.rng, (h_ // 3, w_ // 3), (h_, w_))[..., None] - 0.5
    roi.arr += fm * tex * (4.0 + 20.0 * f.p["wrinkles"])
    roi.paste(f.img)


def _apply_pose(f: _Face) -> Image.Image:
    """Rotation, scale, shift in one affine warp to the 2x output, then a 2x box reduction
    (anti-aliasing) to the output size."""
    u = f.u
    ccx, ccy = f.centre + f.shift[0], f.centre + f.shift[1]
    th_ = math.radians(f.angle)
    ca, sa = math.cos(th_) / f.scale, math.sin(th_) / f.scale
    s2 = u / 2
    coeffs = (ca, sa, ccx - ca * s2 - sa * s2, -sa, ca, ccy + sa * s2 - ca * s2)
    img = f.img.transform(
        (int(u), int(u)), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=rgb(f.bg)
    )
    return img.reduce(SUPERSAMPLE)


def _apply_camera(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Lighting, colour cast, contrast, blur and sensor noise."""
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


#: The layers, back to front; each reads the face's geometry and what earlier ones left.
_LAYERS = (
    _draw_background,
    _draw_long_hair,
    _draw_shoulders_neck_ears,
    _draw_face_outline,
    _draw_skin_marks,
    _draw_upper_wrinkles,
    _draw_folds_and_eye_lines,
    _draw_jowl_and_neck_lines,
    _draw_eyes_and_brows,
    _draw_nose,
    _draw_beard,
    _draw_mouth,
    _draw_head_hair,
    _add_skin_texture,
)


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
    face = _start_face(age, identity_traits, rng, size, nuisance=nuisance)
    for layer in _LAYERS:
        layer(face)
    img = _apply_pose(face)
    return _apply_camera(img, rng, size) if nuisance else img
