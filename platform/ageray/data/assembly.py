"""The stream's stages, curried in webdataset's ``pipeline`` style, and :func:`assemble`,
which composes them for one read plan.

Why curried: webdataset 1.0 writes each stage as a generator over its input
(``_shuffle(data, bufsize)``) and wraps it with ``pipelinefilter``, so that
``shuffle(1000)`` is a stage a ``wds.DataPipeline`` calls with the stream before it. The
stages here are kept as plain generators in their own modules (``tario``, ``stages``,
``samplers``, ``batching``; each tested there alone) and curried below once; assembling a
stream is then a list of stage calls that reads in the order the data flows:

    shard source -> open_shards -> tar_samples -> [select_modulo] -> parse_labels ->
    [stop_on_empty_pass] -> balanced_stream | [shuffled] -> decoded -> batched

``StreamSpec`` is everything a DataLoader worker needs to assemble its stream.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import webdataset as wds

from ageray.data import batching, samplers, stages, tario
from ageray.data.augment import build_decode_transform, decode_size
from ageray.data.labels import AGE_MAX, AGE_MIN
from ageray.data.readplan import ReadPlan, Sampler
from ageray.data.skips import SkipCounter
from ageray.data.transforms import (
    build_eval_transform,
    build_train_transform,
    split_finisher,
    train_draft_size,
)

__all__ = [
    "StreamSpec",
    "assemble",
    "balanced_stream",
    "batched",
    "decoded",
    "open_shards",
    "parse_labels",
    "select_modulo",
    "shuffled",
    "stop_on_empty_pass",
    "tar_samples",
]

# ------------------------------------------------------------------------ curried stages
# each: stage(**settings) -> a FilterFunction that a wds.DataPipeline calls with its input

open_shards = wds.pipelinefilter(tario.open_shards)
tar_samples = wds.pipelinefilter(tario.tar_samples)
select_modulo = wds.pipelinefilter(stages.select_modulo)
parse_labels = wds.pipelinefilter(stages.parse_labels)
stop_on_empty_pass = wds.pipelinefilter(stages.stop_on_empty_pass)
balanced_stream = wds.pipelinefilter(samplers.balanced_stream)
shuffled = wds.pipelinefilter(samplers.shuffled)
decoded = wds.pipelinefilter(stages.decoded)
batched = wds.pipelinefilter(batching.batched)


@dataclass
class StreamSpec:
    """Everything a DataLoader worker needs; small and picklable (spawn/forkserver)."""

    cfg: Any  # DataConfig
    split: str
    urls: list[str]
    counts: list[int]
    mode: Literal["train", "eval"]
    sampler: Sampler = "instance"
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    epoch: int = 0
    seed: int = 0
    batch_size: int = 32
    classes: list[int] = field(default_factory=list)
    shard_classes: list[list[int]] = field(default_factory=list)
    per_class: int = 16
    max_pending: int = 4096
    num_classes: int = 101
    require_age: bool = True  # a member without an age is skipped (missing_age)
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX)
    # AWS_* settings of the process that built the loader. forkserver workers are forked
    # from a server started earlier and would otherwise see that server's environment (an
    # endpoint or profile set later would be silently ignored). Never printed.
    aws_env: dict[str, str] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------ assembly


def _image_steps(spec: StreamSpec, counter: SkipCounter) -> tuple[stages.ImageDecoder, Any]:
    """(the per-sample decoder, the finisher that writes a batch's images): device mode
    decodes only (uint8, one size) and the loader augments on the device; else the train
    or eval transform, its final to-tensor/normalise step split off into the batch."""
    cfg = spec.cfg
    train = spec.mode == "train"
    if train and cfg.augment_on == "device":
        transform, draft = build_decode_transform(cfg), decode_size(cfg)
    elif train:
        transform, draft = build_train_transform(cfg), train_draft_size(cfg)
    else:
        transform, draft = build_eval_transform(cfg), cfg.image_size
    transform, finisher = split_finisher(transform)
    return stages.ImageDecoder(transform, draft=draft, counter=counter), finisher


def _read_stages(plan: ReadPlan, spec: StreamSpec, counter: SkipCounter) -> list[Any]:
    """The plan's shards, in its order, opened and split into samples (and, for a
    sample-level split, this slot's share), labels checked."""
    source = functools.partial(
        tario.shard_source,
        spec.urls,
        plan.shards,
        repeat=plan.repeat,
        rng=plan.source_rng,
        first_order=plan.first_order,
    )
    read = [
        source,
        open_shards(counter=counter, owner=plan.owns, retries=int(spec.cfg.s3_retries)),
        tar_samples(counter=counter, owner=plan.owns, expected=dict(enumerate(spec.counts))),
    ]
    if plan.modulo is not None:
        read.append(select_modulo(slot=plan.modulo, num_slots=plan.num_slots))
    read.append(
        parse_labels(counter=counter, require_age=spec.require_age, age_range=spec.age_range)
    )
    if spec.mode == "train":
        what = f"split {spec.split!r} rank {spec.rank} slot {plan.slot}"
        read.append(stop_on_empty_pass(what=what))
    return read


def _sample_stages(plan: ReadPlan, spec: StreamSpec, decode: stages.ImageDecoder) -> list[Any]:
    """Class- or age-balanced sampling (decoding as it draws), or the shuffle buffer
    (training) and decoding."""
    if plan.balanced:
        class_of = functools.partial(stages.sample_age_class, num_classes=spec.num_classes)
        return [
            balanced_stream(
                class_of=class_of,
                prepare=decode,
                classes=spec.classes or None,
                mode=spec.sampler,
                per_class=spec.per_class,
                max_pending=spec.max_pending,
                rng=plan.sample_rng,
            )
        ]
    if spec.mode != "train":
        return [decoded(decode=decode)]
    buf = int(spec.cfg.shuffle_buffer)
    shuffle = shuffled(bufsize=buf, rng=plan.sample_rng, initial=max(1, min(buf, 100)))
    return [shuffle, decoded(decode=decode)]


def assemble(
    plan: ReadPlan,
    spec: StreamSpec,
    *,
    counter: SkipCounter,
    ring: batching.BufferRing | None = None,
) -> Iterator[Any]:
    """The stage chain that carries out ``plan`` for ``spec``'s split: batches (dicts)."""
    decode, finisher = _image_steps(spec, counter)
    batch = batched(
        batch_size=spec.batch_size,
        partial=spec.mode != "train",
        counter=counter,
        finisher=finisher,
        ring=ring,
    )
    return iter(
        wds.DataPipeline(
            *_read_stages(plan, spec, counter), *_sample_stages(plan, spec, decode), batch
        )
    )
