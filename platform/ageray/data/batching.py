"""Prepared samples -> batches: worker-side collation into a recycled shared-memory ring,
main-process finishing (normalise, labels to tensors).

**Batches.** DataLoader workers run everything up to the augmented image; the pixels travel
to the main process as one uint8 batch in shared memory (4x fewer bytes than float32; the
buffers are recycled once normalised, see :class:`BufferRing`) and the main process
normalises the batch (``ToNormalizedTensor.normalize_uint8``: bit-identical to the
per-image transform Serve uses), optionally on ``device`` (``"cuda"``).

A batch as the caller sees it (docs/design.md): ``image`` float32 ``(B, 3, S, S)``,
``age`` / ``age_std`` float32 (NaN where absent), ``gender`` / ``race`` / ``identity`` int64
(-1 where absent), ``key`` a list of str.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ageray.data.skips import SkipCounter
from ageray.data.stages import ShardSample

__all__ = ["BATCH_LABELS", "BufferRing", "batched", "collate", "finish_batch", "no_convert"]

# the label fields of a batch, and their tensor dtypes
BATCH_LABELS = ("age", "age_std", "gender", "race", "identity")
_LABEL_DTYPES = (torch.float32, torch.float32, torch.int64, torch.int64, torch.int64)


def _new_batch(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, allocated directly in shared memory
    (as ``default_collate`` does) so sending it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class BufferRing:
    """uint8 batch buffers (shared memory in a worker) that are reused once the main process
    has normalised the batch they carried.

    Why: the first write to a fresh shared-memory page costs a page fault in the worker and
    another in the main process (tmpfs has no huge pages), about a third of all inter-process
    cost at 112 px. The main process never hands these buffers to the caller (it normalises
    into a new float tensor at once, see :func:`finish_batch`) and then records how many
    batches of each worker it has finished in ``released``, a shared int64 tensor. Buffer
    ``seq % size`` is reused for batch ``seq`` only when batch ``seq - size`` is released;
    otherwise (after a short wait) a fresh buffer is taken, so nothing ever blocks.
    ``released=None``: single process, where the caller finishes each batch before the next
    one is made.
    """

    def __init__(self, released: torch.Tensor | None, worker: int, size: int) -> None:
        self.released = released
        self.worker = worker
        self.size = max(1, size)
        self.slots: list[torch.Tensor | None] = [None] * self.size
        self.seq = 0
        self.reused = 0

    def get(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        seq = self.seq
        self.seq += 1
        slot = seq % self.size
        buf = self.slots[slot]
        if buf is not None and tuple(buf.shape) == shape and self._released(seq - self.size):
            self.reused += 1
            return buf, seq
        buf = _new_batch(shape, torch.uint8)
        self.slots[slot] = buf
        return buf, seq

    def _released(self, seq: int, wait: float = 0.02) -> bool:
        if self.released is None:
            return True
        deadline = time.monotonic() + wait
        while int(self.released[self.worker]) <= seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0005)
        return True


def collate(
    items: list[tuple[Any, ShardSample]],
    finisher: Any,
    skipped: dict[str, int],
    ring: BufferRing | None = None,
) -> dict[str, Any]:
    """Worker-side batch.

    With a ``finisher`` (the transform's final ToNormalizedTensor) the augmented images go
    into one uint8 (B, 3, H, W) tensor in shared memory, row by row, and the main process
    normalises the whole batch (:func:`finish_batch`): the same operations as the per-image
    transform with identical output, but 4x fewer bytes through shared memory (whose page
    faults cost ~100 us per 112 px float image on Linux tmpfs) and one vectorised pass.
    Labels stay Python lists (one small pickle instead of a shared-memory segment per label
    tensor) and become tensors in the main process.
    """
    first = items[0][0]
    buffer: tuple[int, int] | None = None
    if finisher is not None:
        w, h = first.size
        shape = (len(items), 3, h, w)
        if ring is not None:
            images, seq = ring.get(shape)
            buffer = (ring.worker, seq)
        else:
            images = _new_batch(shape, torch.uint8)
        for row, (img, _) in zip(images, items):
            finisher.to_uint8(img, out=row)
        key = "image_u8"
    else:
        images = _new_batch((len(items), *first.shape), first.dtype)
        torch.stack([t for t, _ in items], out=images)
        key = "image"
    labels = [it for _, it in items]
    return {
        key: images,
        "labels": [tuple(getattr(it, f) for it in labels) for f in BATCH_LABELS],
        "key": [it.key for it in labels],
        "__skipped__": skipped,
        "__buffer__": buffer,
    }


def finish_batch(
    item: dict[str, Any],
    finish_images: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | None,
) -> dict[str, Any]:
    """Main-process side of :func:`collate`: uint8 images -> normalised float32 (on
    ``device`` when given: move 1 byte per pixel, finish there), label lists -> tensors.
    ``finish_images`` is ``ToNormalizedTensor.normalize_uint8``, or in device-augmentation
    mode the batched augmentation that ends with it. Returns the batch format of
    docs/design.md."""
    out: dict[str, Any] = {}
    if "image_u8" in item:
        x = item["image_u8"]
        if device is not None:
            x = x.to(device, non_blocking=True)
        out["image"] = finish_images(x)
    else:
        out["image"] = item["image"] if device is None else item["image"].to(device)
    for name, dtype, values in zip(BATCH_LABELS, _LABEL_DTYPES, item["labels"]):
        t = torch.tensor(values, dtype=dtype)
        out[name] = t if device is None else t.to(device, non_blocking=True)
    out["key"] = item["key"]
    return out


def no_convert(item: Any) -> Any:
    """DataLoader collate_fn for ready-made batches (skips ``default_convert``'s walk)."""
    return item


def batched(
    src: Iterable[tuple[Any, ShardSample]],
    *,
    batch_size: int,
    partial: bool,
    counter: SkipCounter,
    finisher: Any = None,
    ring: BufferRing | None = None,
) -> Iterator[dict[str, Any]]:
    """Group prepared samples into batches, each carrying the skip counts made since the
    previous batch. Samples are (PIL image, item) when ``finisher`` turns images into
    tensor rows, else (tensor, item)."""
    buf: list[tuple[Any, ShardSample]] = []
    for item in src:
        buf.append(item)
        if len(buf) == batch_size:
            yield collate(buf, finisher, counter.take(), ring)
            buf = []
    if buf and partial:
        yield collate(buf, finisher, counter.take(), ring)
