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
The package: ``people`` (traits and age cues, numbers only), ``render`` (drawing one face),
and here the data set (which ages and people, the records).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ageray.data.records import ImportReport, InputError, Record
from ageray.data.synthetic.people import (
    RACE_WEIGHTS,
    IdentityTraits,
    age_params,
    face_geometry,
    random_traits,
)
from ageray.data.synthetic.render import render_face

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
        raise InputError(f"num_samples={num_samples} must be >= 1")
    if images_per_identity < 1:
        raise InputError(f"images_per_identity={images_per_identity} must be >= 1")
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
        raise InputError(f"image_size={image_size} is too small to draw a face (use >= 16)")
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
