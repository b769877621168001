"""Per-sample pipeline stages: split by sample, typed labels, decode and transform.

Each stage is a small generator over the previous one (webdataset style), testable alone.
``ageray.data.loader`` chains them after the tar stages of ``ageray.data.tario``::

    ... tar_samples -> [select_modulo] -> parse_labels
      train/instance:        -> stop_on_empty_pass -> shuffled -> decoded -> batched
      train/class|age_aware: -> stop_on_empty_pass -> balanced_stream(decode) -> batched
      eval:                  -> decoded -> batched

``parse_labels`` turns a raw sample into a :class:`ShardSample` (image bytes + checked
labels) and counts ``no_label``, ``no_image``, ``bad_label`` and the label check's reasons
(``bad_age``, ``age_out_of_range``, ...); :class:`ImageDecoder` counts ``not_image``,
``truncated`` and ``too_large`` (see ``ageray.data.skips``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from ageray.data.labels import AGE_MAX, AGE_MIN, LabelError, check_labels
from ageray.data.samplers import PASS_END, age_class
from ageray.data.skips import SkipCounter
from ageray.data.transforms import CorruptImageError, decode_image

__all__ = [
    "IMAGE_EXTS",
    "ImageDecoder",
    "ShardSample",
    "decoded",
    "parse_labels",
    "sample_age_class",
    "select_modulo",
    "stop_on_empty_pass",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class ShardSample(NamedTuple):
    """One sample read from a shard: the encoded image and its typed labels (NaN / -1 where
    a label is absent). What flows between :func:`parse_labels` and the batch."""

    key: str
    image: bytes
    age: float
    age_std: float
    gender: int
    race: int
    identity: int


def select_modulo(src: Iterable[Any], *, slot: int, num_slots: int) -> Iterator[Any]:
    """Sample-level split: keep sample ``i`` (counted from each pass start) when
    ``i % num_slots == slot``. Every slot reads the same shards in the same order."""
    i = 0
    for sample in src:
        if sample is PASS_END:
            i = 0
            yield sample
            continue
        if i % num_slots == slot:
            yield sample
        i += 1


def parse_labels(
    src: Iterable[Any],
    *,
    counter: SkipCounter,
    require_age: bool = False,
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX),
) -> Iterator[Any]:
    """Raw samples -> :class:`ShardSample` (image bytes + typed labels), every label through
    the one label check of :mod:`ageray.data.labels`, the importers' rule.

    Counts ``no_image``, ``no_label`` (an image without its json), ``bad_label`` (json that
    is not a label object) and the label check's reasons: ``missing_age`` (only with
    ``require_age``: a split of an age dataset), ``bad_age`` (not a finite number),
    ``age_out_of_range`` (outside ``age_range``), ``bad_age_std``, ``age_std_out_of_range``,
    ``bad_gender``, ``bad_race``, ``bad_identity``. A non-finite age would otherwise turn the
    loss into NaN far from its cause, and an out-of-range one bias every metric.
    """
    for sample in src:
        if sample is PASS_END:
            yield sample
            continue
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        raw = sample.get("json")
        if image is None:
            counter.add("no_image")
            continue
        if raw is None:
            counter.add("no_label")
            continue
        try:
            labels = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            labels = exc
        if not isinstance(labels, dict):
            counter.add("bad_label")
            log.debug("bad label json in %s: %s", sample["__key__"], labels)
            continue
        try:
            checked = check_labels(labels, require_age=require_age, age_range=age_range)
        except LabelError as exc:
            counter.add(exc.reason)
            log.debug("bad label in %s: %s", sample["__key__"], exc)
            continue
        yield ShardSample(
            key=sample["__key__"],
            image=image,
            age=_or(checked["age"], math.nan),
            age_std=_or(checked["age_std"], math.nan),
            gender=_or(checked["gender"], -1),
            race=_or(checked["race"], -1),
            identity=_or(checked["identity"], -1),
        )


def _or(value: Any, missing: Any) -> Any:
    """A batch holds NaN (float labels) or -1 (codes) where a label is absent."""
    return missing if value is None else value


def stop_on_empty_pass(src: Iterable[Any], *, what: str = "") -> Iterator[Any]:
    """Pass everything through, but end the stream when a whole pass (between two
    :data:`PASS_END` markers) had no sample: repeating it would spin forever."""
    n = 0
    for sample in src:
        if sample is PASS_END:
            if n == 0:
                log.error("%s: a whole pass over the shards gave no usable sample", what)
                return
            n = 0
        else:
            n += 1
        yield sample


class ImageDecoder:
    """Decode a :class:`ShardSample`'s image (at ``draft`` size when the format allows) and
    apply the per-sample ``transform``: ``(transformed image, sample)``, or None after
    counting why the image is unusable (``not_image``, ``truncated``, ``too_large``).

    One object serves both paths: the :func:`decoded` stage calls it on every sample, a
    balanced stream only on the samples it draws (decoding is the expensive step).
    """

    def __init__(self, transform: Callable[[Any], Any], *, draft: int, counter: SkipCounter):
        self.transform = transform
        self.draft = draft
        self.counter = counter

    def __call__(self, sample: ShardSample) -> tuple[Any, ShardSample] | None:
        try:
            img = decode_image(sample.image, target_size=self.draft, name=sample.key)
        except CorruptImageError as exc:
            self.counter.add(exc.reason)
            log.debug("%s", exc)
            return None
        return self.transform(img), sample


def decoded(
    src: Iterable[Any],
    decode: Callable[[Any], Any],
    *,
    max_failures: int = 10_000,
) -> Iterator[Any]:
    """``decode`` each sample, dropping the ones it rejects (None) and pass markers. Ends the
    stream after ``max_failures`` rejections in a row (a stream of only corrupt images)."""
    fails = 0
    for sample in src:
        if sample is PASS_END:
            continue
        out = decode(sample)
        if out is None:
            fails += 1
            if fails >= max_failures:
                log.error("%d images in a row failed to decode; stopping this stream", fails)
                return
            continue
        fails = 0
        yield out


def sample_age_class(sample: ShardSample, num_classes: int) -> int | None:
    """The age class a balanced sampler files ``sample`` under (None: no age)."""
    return age_class(None if math.isnan(sample.age) else sample.age, num_classes)
