"""Faces for the inference tests: real UTKFace crops read at run time from
../shared/data/utkface-dev.tar (never copied into the repo), or synthetic faces when the
tarball is absent; and a tiny routed model that serves a fitted rule."""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

from ageray.data.records import Record

TESTS = Path(__file__).resolve().parent


def utkface_tar() -> Path | None:
    from conftest import UTKFACE_TAR

    return UTKFACE_TAR if UTKFACE_TAR.is_file() else None


def face_records(n: int, *, seed: int = 0) -> tuple[list[Record], str]:
    """``n`` face records and where they came from (``utkface`` or ``synthetic``)."""
    tar = utkface_tar()
    if tar is None:
        from ageray.data.synthetic import iter_synthetic

        recs = list(iter_synthetic(num_samples=n, image_size=96, seed=seed))
        return recs, "synthetic"
    out: list[Record] = []
    with tarfile.open(tar) as tf:
        for member in tf:
            if not member.isfile() or not member.name.lower().endswith(".jpg"):
                continue
            name = member.name.rsplit("/", 1)[-1]
            try:
                age = float(name.split("_", 1)[0])
            except ValueError:
                continue
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
            out.append(Record(key=f"utk{len(out):04d}", image=data, age=age, source=name))
            if len(out) == n:
                break
    return out, "utkface"


def make_routed_model(folder: Path, *, rule: str = "learned", seed: int = 0) -> Path:
    """The tiny two-head model (tests/datagen.py) with ``threshold`` and ``learned`` fitted
    on the routing features of 48 faces (a held-out set: other faces than the tests send),
    serving ``rule``: a model whose export must carry fitted parameters."""
    import torch
    from datagen import make_tiny_model

    from ageray.config import Config, RoutingConfig
    from ageray.inference import ImagePredictor, collect_predictions
    from ageray.model import load_model, save_model
    from ageray.model.routing.fitting import fit_rules

    base = make_tiny_model(folder.parent / f"{folder.name}-base", seed=seed)
    model, info = load_model(base)
    prep = ImagePredictor.from_model(model, info)
    records, _ = face_records(64)
    held_out = records[16:]  # the tests use the first faces
    batches = [
        {
            "image": torch.stack([prep.prepare(r.image, r.key).tensor for r in part]),
            "age": torch.tensor([r.age for r in part]),
            "age_std": torch.full((len(part),), 2.0),
            "key": [r.key for r in part],
        }
        for part in (held_out[i : i + 16] for i in range(0, len(held_out), 16))
    ]
    val = collect_predictions(model, batches, device=torch.device("cpu"))
    routing = RoutingConfig(rule=rule, fit=["threshold", "learned"], hidden=4, steps=100)
    fit_rules(model, val["route_features"], val["age"], routing, split="val")
    cfg = Config()
    cfg.data.image_size = 64
    return save_model(model, folder, cfg)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib")


def is_pickle(path: Path) -> bool:
    """A pickle-format file: pickle's PROTO opcode (protocol 2-5) at the start (plain
    pickles, legacy ``torch.save``), a zip holding a ``.pkl`` member (``torch.save``'s zip
    format with ``data.pkl``, TorchScript), or a name that promises pickle (``.pt`` ...)."""
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith(".pkl") for n in z.namelist()):
                return True
    return path.name.lower().endswith(PICKLE_SUFFIXES)


def pickle_files(root: Path) -> list[str]:
    """Every pickle-format file under ``root`` (relative paths)."""
    return sorted(
        str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file() and is_pickle(p)
    )


# --------------------------------------------------------------------------- photos
AGE_BANDS = {"child": (0, 10), "adult": (25, 45), "elderly": (70, 120)}


def utk_faces_by_band(
    tar: Path, *, per_band: int = 1, skip: int = 0
) -> dict[str, list[tuple[str, float, bytes]]]:
    """``per_band`` real UTKFace chips per band of :data:`AGE_BANDS`: ``{band: [(member
    name, age, bytes), ...]}``, the first ones in name order after ``skip`` (so a test
    always composes the same people)."""
    out: dict[str, list[tuple[str, float, bytes]]] = {band: [] for band in AGE_BANDS}
    with tarfile.open(tar) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
        seen = dict.fromkeys(AGE_BANDS, 0)
        for m in members:
            name = m.name.rsplit("/", 1)[-1]
            try:
                age = float(name.split("_", 1)[0])
            except ValueError:
                continue
            for band, (lo, hi) in AGE_BANDS.items():
                if lo <= age <= hi and len(out[band]) < per_band:
                    seen[band] += 1
                    if seen[band] > skip:
                        data = tf.extractfile(m).read()  # type: ignore[union-attr]
                        out[band].append((name, age, data))
            if all(len(v) == per_band for v in out.values()):
                break
    return out


def compose_photo(
    chips: list[bytes],
    *,
    scale: float = 1.0,
    margin: int = 60,
    gap: int = 80,
    background: tuple[int, int, int] = (200, 205, 210),
    fmt: str = "PNG",
) -> tuple[bytes, list[tuple[float, float, float, float]]]:
    """Face chips side by side on a plain background: ``(photo bytes, each chip's
    rectangle [x0, y0, x1, y1] in the photo's pixels)``. ``scale`` resizes every chip by a
    known factor (1.0: the chips' own pixels, so a face in the photo and the chip alone are
    the same pixels); PNG keeps them exact."""
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(c)).convert("RGB") for c in chips]
    if scale != 1.0:
        images = [
            im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            for im in images
        ]
    width = 2 * margin + sum(im.width for im in images) + gap * (len(images) - 1)
    height = 2 * margin + max(im.height for im in images)
    photo = Image.new("RGB", (width, height), background)
    boxes: list[tuple[float, float, float, float]] = []
    x = margin
    for im in images:
        y = margin + (height - 2 * margin - im.height) // 2
        photo.paste(im, (x, y))
        boxes.append((float(x), float(y), float(x + im.width), float(y + im.height)))
        x += im.width + gap
    buf = io.BytesIO()
    photo.save(buf, format=fmt)
    return buf.getvalue(), boxes


def wall_photo(width: int = 480, height: int = 320, *, seed: int = 0) -> bytes:
    """A JPEG of a brick wall (a texture with edges and noise, no face): what the detector
    must answer "no face" for, not an age of the background."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float64)
    img[:] = (170, 165, 160)  # mortar
    brick_h, brick_w = 28, 64
    for row, y in enumerate(range(0, height, brick_h)):
        offset = (brick_w // 2) * (row % 2)
        for x in range(-offset, width, brick_w):
            colour = np.array((150, 60, 45)) + rng.normal(0, 12, 3)
            img[y + 3 : y + brick_h - 2, max(0, x + 3) : max(0, x + brick_w - 2)] = colour
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def covers(box: Sequence[float], source: Sequence[float]) -> bool:
    """A detected box covers a source rectangle: IoU >= 0.5, or the box holds the
    rectangle's centre (a face box is smaller than its chip: the chip holds hair and neck)
    and lies mostly inside the rectangle."""
    cx, cy = (source[0] + source[2]) / 2, (source[1] + source[3]) / 2
    holds = box[0] <= cx <= box[2] and box[1] <= cy <= box[3]
    area = max(1e-9, (box[2] - box[0]) * (box[3] - box[1]))
    ix = max(0.0, min(box[2], source[2]) - max(box[0], source[0]))
    iy = max(0.0, min(box[3], source[3]) - max(box[1], source[1]))
    return iou(box, source) >= 0.5 or (holds and ix * iy / area >= 0.6)
