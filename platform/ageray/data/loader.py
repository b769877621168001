"""Shards -> batches on each Ray Train worker: ``train_loader`` and ``eval_loader``.

The pipeline is webdataset-style, a chain of small generator stages, each testable alone,
one concern per module:

    readplan  which shards / samples this reader slot reads, in which order (ReadPlan)
    tario     shard_source -> open_shards -> tar_samples
    stages    [select_modulo] -> parse_labels -> stop_on_empty_pass (train) ->
              shuffled | balanced_stream (samplers) -> decoded (ImageDecoder)
    batching  batched (uint8 batches in a recycled shared-memory ring) -> finish_batch

``ageray.data.assembly`` curries those stages (webdataset's ``pipelinefilter``) and composes
them for one read plan in a ``wds.DataPipeline`` (:func:`~ageray.data.assembly.assemble`).
This module plans each DataLoader worker's reads (:func:`~ageray.data.readplan.plan_reads`),
has them assembled, and runs the DataLoader (:class:`ShardLoader`). Every rank yields the
same number of training steps (see ``ageray.data.readplan``); a stream that reads a whole
pass without one usable sample stops instead of spinning, and if all of a rank's workers
stop, the loader raises a clear error rather than returning a short epoch. Skips are
counted by reason (``ageray.data.skips``) into ``loader.skipped``.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from ageray.data import storage
from ageray.data.assembly import StreamSpec, assemble
from ageray.data.augment import DeviceAugmenter
from ageray.data.batching import BufferRing, finish_batch, no_convert
from ageray.data.labels import AGE_MAX, AGE_MIN
from ageray.data.manifest import read_manifest, split_info
from ageray.data.readplan import Sampler, eval_share, plan_reads, stable_seed, train_steps
from ageray.data.samplers import age_class
from ageray.data.skips import SKIP_REASONS, SkipCounter
from ageray.data.tario import register_gopen
from ageray.data.transforms import ToNormalizedTensor

__all__ = [
    "ShardLoader",
    "ShardStream",
    "StreamSpec",
    "assemble",
    "dataloader_workers",
    "eval_loader",
    "train_loader",
]

log = logging.getLogger(__name__)

# what the forkserver imports once, before it forks DataLoader workers: module paths
_PRELOAD = ["torch", "torchvision.transforms", "ageray.data.loader"]


# --------------------------------------------------------------------------------------
# The per-worker dataset
# --------------------------------------------------------------------------------------


def _aws_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


class ShardStream(torch.utils.data.IterableDataset):
    """The stream of one rank; each DataLoader worker iterates its own slot of it."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        # set by ShardLoader before each iteration: batches finished per worker (shared)
        self.released: torch.Tensor | None = None
        self.ring_size = 4

    def __iter__(self) -> Iterator[dict[str, Any]]:
        register_gopen()
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        if info is not None:
            os.environ.update(spec.aws_env)
        worker = info.id if info is not None else 0
        num_workers = max(1, spec.num_workers)
        slot = spec.rank * num_workers + worker
        num_slots = spec.world_size * num_workers
        counter = SkipCounter()
        if info is not None and spec.mode == "train":
            # augmentation randomness per (seed, epoch, rank, worker); only in worker
            # processes: with num_workers=0 we must not reseed the trainer's own RNG
            torch.manual_seed(stable_seed("torch", spec.seed, spec.epoch, spec.rank, worker))
        ring = BufferRing(self.released if info is not None else None, worker, self.ring_size)
        plan = plan_reads(
            num_shards=len(spec.urls),
            slot=slot,
            num_slots=num_slots,
            mode=spec.mode,
            sampler=spec.sampler,
            seed=spec.seed,
            epoch=spec.epoch,
            shard_classes=spec.shard_classes,
        )
        yield from assemble(plan, spec, counter=counter, ring=ring)
        rest = counter.take()
        if rest:
            yield {"__skipped__": rest}


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------


class ReadTally:
    """How many training samples this process's latest training iteration yielded, and the
    sum of their keys' CRC32s: ranks report both per epoch (``RayTrainContext.report``), so
    a run can prove every sample was read exactly once across all ranks of all nodes (the
    counts add up to the split's size and the sums to the split's) without shipping keys."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count, self.keysum = 0, 0

    def add(self, keys: list[str]) -> None:
        self.count += len(keys)
        self.keysum += sum(zlib.crc32(k.encode()) for k in keys)


TRAIN_READS = ReadTally()


class ShardLoader:
    """Iterable of batch dicts for one rank; a new iteration starts a new DataLoader.

    ``steps`` (training): the exact number of batches each iteration yields, identical on
    every rank. ``len(loader)``: ``steps`` for training, the expected number of batches for
    evaluation. ``skipped``: cumulative skip counts by reason, over all iterations.
    """

    def __init__(
        self,
        dataset: ShardStream,
        *,
        steps: int | None,
        num_batches: int,
        num_samples: int,
        multiprocessing_context: str | None = "forkserver",
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        device: str | torch.device | None = None,
    ) -> None:
        self.dataset = dataset
        self.spec = dataset.spec
        self.normalizer = ToNormalizedTensor(self.spec.cfg.normalize)
        self.device = torch.device(device) if device is not None else None
        self.steps = steps
        self.num_batches = num_batches
        self.num_samples = num_samples
        self.multiprocessing_context = multiprocessing_context
        if pin_memory is None:
            pin_memory = self.device is not None and self.device.type == "cuda"
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        # every reason present (0 until it happens), as in docs/design.md
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        self.worker_pids: list[int] = []  # of the current iteration (benchmarks read CPU time)

    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.num_batches

    def _dataloader(self) -> torch.utils.data.DataLoader:
        nw = self.spec.num_workers
        kw: dict[str, Any] = {}
        if nw > 0:
            ctx = multiprocessing.get_context(self.multiprocessing_context)
            if self.multiprocessing_context == "forkserver":
                # workers fork from a server that already imported torch and this module:
                # starting a worker then costs milliseconds instead of seconds
                ctx.set_forkserver_preload(_PRELOAD)
            kw.update(
                multiprocessing_context=ctx,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
            )
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            collate_fn=no_convert,
            num_workers=nw,
            pin_memory=self.pin_memory,
            **kw,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        nw = self.spec.num_workers
        if self.spec.mode == "train":
            TRAIN_READS.reset()  # one training iteration = one epoch's reads on this rank
        released = torch.zeros(max(1, nw), dtype=torch.int64).share_memory_()
        self.dataset.released = released
        self.dataset.ring_size = self.prefetch_factor * max(1, nw) + 2
        # keep each worker's last buffers mapped here, so a reused buffer arrives as a
        # cache hit (no new mmap, no page faults) in torch's shared-storage cache
        mapped: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=self.dataset.ring_size)
        )
        finish_images = self._finish_images()
        it = iter(self._dataloader())
        self.worker_pids = [w.pid for w in getattr(it, "_workers", [])]
        produced = 0
        try:
            for item in it:
                for reason, n in (item.pop("__skipped__", None) or {}).items():
                    self.skipped[reason] = self.skipped.get(reason, 0) + n
                if "key" not in item:
                    continue  # a counts-only item from a worker that had nothing left
                batch = finish_batch(item, finish_images, self.device)
                if item.get("__buffer__") is not None and nw > 0:
                    worker, seq = item["__buffer__"]
                    mapped[worker].append(item["image_u8"])
                    released[worker] = seq + 1  # the worker may now reuse that buffer
                if self.spec.mode == "train":
                    TRAIN_READS.add(item["key"])
                yield batch
                produced += 1
                if self.steps is not None and produced >= self.steps:
                    return
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self.steps is not None and produced < self.steps:
            raise RuntimeError(
                f"split {self.spec.split!r} (rank {self.spec.rank}) ran dry after {produced} of "
                f"{self.steps} steps: no readable samples left (skipped so far: "
                f"{ {k: v for k, v in self.skipped.items() if v} }); check the shards under "
                f"{self.spec.cfg.shards} or re-create them with jobs.make_shards"
            )

    def _finish_images(self) -> Any:
        """What turns a uint8 batch (on the device) into the model's input: the batched
        augmentation in device mode (training), else the normalisation."""
        spec = self.spec
        if spec.mode == "train" and spec.cfg.augment_on == "device":
            return DeviceAugmenter(spec.cfg, seed=spec.seed, epoch=spec.epoch, rank=spec.rank)
        return self.normalizer.normalize_uint8


def dataloader_workers(setting: int | str) -> int:
    """``data.num_workers`` as a number. ``"auto"``: the CPUs this process may run on,
    shared by the training processes of this node (``LOCAL_WORLD_SIZE``, which
    torch.distributed launchers and Ray Train set), one kept for each training process."""
    if setting != "auto":
        return int(setting)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, cpus // local - 1)


def _stream_spec(
    cfg: Any,
    split: str,
    *,
    rank: int,
    world_size: int,
    require_age: bool | None,
    **kw: Any,
) -> tuple[dict[str, Any], StreamSpec]:
    """``split``'s manifest entry and the spec of its stream for ``rank`` (``kw``: the
    mode and its settings). ``require_age=None``: required when the manifest says the split
    has ages (every age dataset; identity folders for pretraining have none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
    manifest = read_manifest(cfg.shards)
    info = split_info(manifest, split, cfg.shards)
    if require_age is None:
        require_age = "age" in info.get("fields", ["age"])
    spec = StreamSpec(
        cfg=cfg,
        split=split,
        urls=[storage.join(cfg.shards, s["name"]) for s in info["shards"]],
        counts=[int(s["count"]) for s in info["shards"]],
        rank=rank,
        world_size=world_size,
        num_workers=dataloader_workers(cfg.num_workers),
        aws_env=_aws_env(),
        require_age=require_age,
        **kw,
    )
    return info, spec


def _set_age_classes(spec: StreamSpec, info: dict[str, Any]) -> None:
    """The age classes a balanced sampler draws from: the split's, and each shard's (so a
    slot reads the shards that hold the classes it needs); a split without ages fails."""
    k = spec.num_classes
    spec.classes = sorted({age_class(int(a), k) for a in info.get("age_hist", {})})
    if not spec.classes:
        raise ValueError(
            f"sampler={spec.sampler} balances age classes, but split {spec.split!r} under "
            f"{spec.cfg.shards} has no ages (its manifest age_hist is empty); use "
            "sampler=instance"
        )
    spec.shard_classes = [
        sorted({age_class(int(a), k) for a in s.get("age_hist", {})}) for s in info["shards"]
    ]


def train_loader(
    cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    sampler: Sampler = "instance",
    num_classes: int = 101,
    per_class: int = 16,
    max_pending: int = 4096,
    require_age: bool | None = None,
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX),
    multiprocessing_context: str | None = "forkserver",
    pin_memory: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The training stream of ``split`` for one rank (``cfg`` is a ``DataConfig``).

    ``sampler``: ``instance`` (shuffle buffer of ``cfg.shuffle_buffer``), ``class``
    (LAE/GLAE stage 2) or ``age_aware`` (Xing et al.); see ``ageray.data.samplers``.
    Extra knobs not (yet) in DataConfig: ``num_classes`` (age classes 0..K-1 for balancing),
    ``per_class`` / ``max_pending`` (balanced buffers), ``require_age`` / ``age_range`` (the
    label check, see :func:`~ageray.data.stages.parse_labels`; by default an age is required
    when the split's manifest lists ages), ``multiprocessing_context`` for the
    DataLoader workers (forkserver or spawn: fork is unsafe inside Ray workers), ``device``
    (e.g. ``"cuda"``: batches arrive there, images moved as uint8 with pinned memory and
    normalised on the device; default: CPU tensors).
    """
    if sampler not in ("instance", "class", "age_aware"):
        raise ValueError(f"sampler={sampler!r} must be one of instance, class, age_aware")
    info, spec = _stream_spec(
        cfg,
        split,
        rank=rank,
        world_size=world_size,
        mode="train",
        sampler=sampler,
        epoch=epoch,
        seed=seed,
        batch_size=int(cfg.batch_size),
        per_class=per_class,
        max_pending=max_pending,
        num_classes=num_classes,
        require_age=require_age,
        age_range=tuple(age_range),
    )
    if sampler != "instance":
        _set_age_classes(spec, info)
    steps = train_steps(int(info["count"]), world_size, cfg.batch_size, cfg.steps_per_epoch)
    return ShardLoader(
        ShardStream(spec),
        steps=steps,
        num_batches=steps,
        num_samples=steps * cfg.batch_size,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        device=device,
    )


def eval_loader(
    cfg: Any,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    require_age: bool | None = None,
    age_range: tuple[float, float] = (AGE_MIN, AGE_MAX),
    multiprocessing_context: str | None = "forkserver",
    pin_memory: bool | None = None,
    device: str | torch.device | None = None,
) -> ShardLoader:
    """The evaluation stream of ``split`` for one rank: every sample of the split exactly
    once across all ranks and workers, in a fixed order, last batch of each worker partial.
    Batches are ``cfg.eval_batch_size``; images get ``build_eval_transform(cfg)``.
    Members whose labels fail the check are skipped and counted in ``loader.skipped`` (the
    evaluation report's ``skipped``); ``require_age`` / ``age_range`` as in
    :func:`train_loader`."""
    _, spec = _stream_spec(
        cfg,
        split,
        rank=rank,
        world_size=world_size,
        mode="eval",
        batch_size=int(cfg.eval_batch_size),
        require_age=require_age,
        age_range=tuple(age_range),
    )
    num_samples, num_batches = eval_share(
        spec.counts,
        rank=rank,
        world_size=world_size,
        num_workers=spec.num_workers,
        batch_size=spec.batch_size,
    )
    return ShardLoader(
        ShardStream(spec),
        steps=None,
        num_batches=num_batches,
        num_samples=num_samples,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        device=device,
    )
