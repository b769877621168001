"""Synthetic face-age generator: determinism, MIVIA-like histogram, identities, labels, and
that the age cues really move with age (cheap pixel statistics)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from ageray.data.records import KEY_RE, ImportReport
from ageray.data.synthetic import (
    age_histogram_weights,
    age_params,
    face_geometry,
    iter_synthetic,
    plan_synthetic,
    random_traits,
    render_face,
)


def small_set(**kw):
    opts = {"num_samples": 24, "image_size": 48, "images_per_identity": 4, "seed": 3} | kw
    return list(iter_synthetic(None, ImportReport(), **opts))


def test_deterministic_for_a_seed() -> None:
    a, b = small_set(), small_set()
    assert [r.key for r in a] == [r.key for r in b]
    assert [r.image for r in a] == [r.image for r in b]
    assert [r.labels() for r in a] == [r.labels() for r in b]
    c = small_set(seed=4)
    assert [r.image for r in a] != [r.image for r in c]


#: SHA-256 over the pixels of 72 faces (18 ages x 2 genders x {nuisance at 112 px, upright
#: at 64 px}, traits varied so every drawing branch runs: acne, beard, baldness, long hair),
#: recorded before ``render_face`` was split into named drawing steps. A change to the
#: drawing changes every shard built from synthetic faces, so it must be deliberate.
FACES_SHA256 = "dfef6d678b24b0caca1af34bc51e8f8441377056de2147402fd4e25b7ffec380"
AGES = (0.5, 1.5, 3, 5, 10, 14, 15, 17, 22, 29, 35, 44, 49, 55, 63, 72, 85, 97)


def test_rendered_pixels_are_unchanged() -> None:
    digest = hashlib.sha256()
    for i, age in enumerate(AGES):
        for gender in (0, 1):
            t = random_traits(np.random.default_rng(1000 + 7 * i + gender), gender, i % 5)
            t = dataclasses.replace(
                t, beard=bool(i % 2), acne=i % 3 == 0, bald_prone=i % 2 == 0, hair_style=i % 3
            )
            for nuisance, size in ((True, 112), (False, 64)):
                rng = np.random.default_rng(i * 10 + gender)
                img = render_face(age, t, rng, size, nuisance=nuisance)
                face = hashlib.sha256(img.tobytes()).hexdigest()
                digest.update(f"{age}-{gender}-{nuisance}-{size}".encode() + face.encode())
    assert digest.hexdigest() == FACES_SHA256


def test_histogram_weights_shape() -> None:
    w = age_histogram_weights(1, 81)
    assert w.shape == (81,) and abs(w.sum() - 1) < 1e-9 and (w > 0).all()
    ages = np.arange(1, 82)
    assert 20 <= ages[np.argmax(w)] <= 40
    assert w[0] < w.max() / 20 and w[-1] < w.max() / 20  # long tails on both sides
    assert w[(ages >= 20) & (ages <= 40)].sum() > 0.5


def test_plan_histogram_every_age_few_children_and_elderly() -> None:
    plan = plan_synthetic(4000)
    assert len(plan) == 4000
    ages = np.array([a for _, _, a in plan])
    counts = Counter(ages.tolist())
    assert set(counts) == set(range(1, 82)), "every age 1..81 present"
    assert (ages < 13).mean() < 0.06
    assert (ages > 65).mean() < 0.05
    assert 20 <= max(counts, key=counts.get) <= 40
    assert ((ages >= 20) & (ages <= 40)).mean() > 0.5
    # guarantee also holds at the small end
    assert set(a for _, _, a in plan_synthetic(400)) == set(range(1, 82))


def test_identities_have_several_images_at_different_ages() -> None:
    plan = plan_synthetic(4000, images_per_identity=8)
    by_id: dict[int, list[int]] = defaultdict(list)
    for ident, _, age in plan:
        by_id[ident].append(age)
    assert len(by_id) == 500
    assert all(len(v) == 8 for v in by_id.values())
    varied = sum(len(set(v)) >= 3 for v in by_id.values())
    assert varied / len(by_id) > 0.9
    spans = [max(v) - min(v) for v in by_id.values()]
    assert np.median(spans) >= 5


def test_records_labels_and_images() -> None:
    recs = small_set(num_samples=40, image_size=64, age_std=True, images_per_identity=5)
    assert len(recs) == 40 and len({r.key for r in recs}) == 40
    ids = Counter(r.identity for r in recs)
    assert len(ids) == 8 and set(ids.values()) == {5}
    per_id = defaultdict(set)
    for r in recs:
        assert KEY_RE.match(r.key)
        assert r.gender in (0, 1) and r.race in range(5)
        assert 1 <= r.age <= 81 and float(r.age).is_integer()
        assert r.age_std is not None and 0.5 < r.age_std < 10
        per_id[r.identity].add((r.gender, r.race))
        with Image.open(io.BytesIO(r.image)) as im:
            assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
    assert all(len(v) == 1 for v in per_id.values()), "gender/race fixed per identity"
    # apparent-age style std grows with age
    ages = np.array([r.age for r in recs])
    stds = np.array([r.age_std for r in recs])
    assert np.corrcoef(ages, stds)[0, 1] > 0.8


def test_report_counts() -> None:
    report = ImportReport()
    recs = list(iter_synthetic("ignored", report, num_samples=10, image_size=32))
    assert report.imported == len(recs) == 10 and report.total_skipped == 0


def test_age_params_monotone() -> None:
    tr = random_traits(np.random.default_rng(0), gender=0)
    ages = [1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 81]
    ps = [age_params(a, tr) for a in ages]
    for key in ("growth", "wrinkles", "old", "grey", "white", "thin"):
        vals = [p[key] for p in ps]
        assert vals == sorted(vals), key
    assert ps[0]["growth"] == 0 and ps[4]["growth"] == 1
    assert ps[4]["wrinkles"] < 0.1 < ps[-1]["wrinkles"]


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), np.float32)


@pytest.mark.parametrize("race", [1, 2])
def test_hair_whitens_with_age(race: int) -> None:
    """Same person at 30 and 75: the hair on the crown is much brighter at 75."""
    tr = random_traits(np.random.default_rng([5, race]), gender=1, race=race)
    size = 96
    means = []
    for age in (30, 75):
        geo = face_geometry(age, tr, size)
        y0, y1 = int(geo["hair_top"]) + 2, int((geo["head_top"] + geo["hairline_y"]) / 2)
        x0, x1 = int(size / 2 - 0.1 * geo["head_width"]), int(size / 2 + 0.1 * geo["head_width"])
        img = _gray(render_face(age, tr, np.random.default_rng(0), size, nuisance=False))
        means.append(img[y0:y1, x0:x1].mean())
    assert means[1] > means[0] + 60, means


def test_wrinkle_edges_increase_with_age() -> None:
    """Mean gradient magnitude inside the face grows from 25 to 50 to 78 (wrinkles, folds,
    skin texture)."""
    size = 112
    for seed in range(3):
        tr = random_traits(np.random.default_rng([9, seed]))
        dens = []
        for age in (25, 50, 78):
            g = _gray(render_face(age, tr, np.random.default_rng(1), size, nuisance=False))
            face = g[int(0.3 * size) : int(0.75 * size), int(0.3 * size) : int(0.7 * size)]
            gy, gx = np.abs(np.diff(face, axis=0))[:, :-1], np.abs(np.diff(face, axis=1))[:-1]
            dens.append(float((gx + gy).mean()))
        assert dens[0] < dens[1] < dens[2], dens


def test_child_proportions() -> None:
    """Infants: eyes low in a tall cranium, large eyes, a round face; adult proportions by
    18. And the eyes are drawn where the geometry says (dark pupil at the landmark)."""
    tr = random_traits(np.random.default_rng(2), gender=0, race=0)
    size = 112
    geos = {age: face_geometry(age, tr, size) for age in (1, 6, 12, 18, 30)}

    def eye_pos(a: int) -> float:
        return (geos[a]["eye_y"] - geos[a]["head_top"]) / geos[a]["head_height"]

    def eye_size(a: int) -> float:
        return geos[a]["eye_width"] / geos[a]["head_width"]

    def length(a: int) -> float:
        return geos[a]["head_height"] / geos[a]["head_width"]

    assert eye_pos(1) > eye_pos(6) > eye_pos(12) > eye_pos(18) == eye_pos(30)
    assert eye_size(1) > eye_size(6) > eye_size(12) > eye_size(18)
    assert length(1) < length(6) < length(12) < length(18)
    for age, geo in geos.items():
        img = _gray(render_face(age, tr, np.random.default_rng(0), size, nuisance=False))
        for ex, ey in geo["landmarks"][:2]:
            r, c = round(ey), round(ex)
            assert img[r - 1 : r + 2, c - 1 : c + 2].min() < 90, (age, ex, ey)  # iris/pupil


def test_render_face_sizes_and_validation() -> None:
    tr = random_traits(np.random.default_rng(0))
    for size in (32, 64, 112, 150):
        img = render_face(40, tr, np.random.default_rng(0), size)
        assert img.size == (size, size) and img.mode == "RGB"
    with pytest.raises(ValueError, match="image_size"):
        list(iter_synthetic(None, ImportReport(), num_samples=1, image_size=8))
