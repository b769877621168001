"""Class-balanced and age-aware sampling over a shard stream, in bounded memory.

Stage 2 of LAE/GLAE retrains the classifier on a *class-balanced* stream: pick an age class
uniformly among the classes present in the split, then an instance of that class uniformly.
Xing et al. (4.1) describe *age-aware sampling*: an age list and per-age image lists, each
walked in a shuffled order and reshuffled when exhausted. Both assume random access to every
image of every class; a shard stream gives us neither random access nor the whole set in
memory. The design here keeps the class statistics exact and the memory bounded:

* **Per-class buffers.** Every sample read from the stream goes into its class's buffer
  (at most ``per_class`` encoded samples; when full, the newcomer replaces a random slot).
  Memory is ``per_class * num_classes`` encoded images (16 x 101 x ~10 KB ≈ 16 MB per
  DataLoader worker at the defaults), never the data set.
* **One draw per read.** Each sample read earns one draw, so the stream reads, decodes and
  augments exactly one sample per sample emitted: throughput equals instance-balanced
  streaming. Because a buffer slot is always replaced by the next sample of its class, a
  sample of a class with ``n_c`` instances out of ``N`` stays in the buffer for ``~per_class
  N / n_c`` reads and is drawn ``~N / (C n_c)`` times on average: exactly the per-instance
  rate of class-balanced sampling over the whole set, without holding the set.
* **Classes come from the manifest.** The class set is the split's age histogram (classes
  with zero images are simply absent, so empty classes never fail). When a drawn class has
  nothing buffered yet (warm-up: a rare age not read so far), the draw is *deferred*, not
  replaced: it is fulfilled by the first sample of that class to arrive. The sequence of
  class choices is therefore exactly uniform (or exactly cyclic, for age-aware); only the
  position of a few early draws moves. Deferred draws are capped (``max_pending``); while
  at the cap the stream is read without drawing. A class with nothing usable buffered at
  the end of a whole pass over the data (no image of it, or all of them corrupt) is dropped
  for good at the pass end marker, with its deferred draws.
  The shard writer puts one sample of every age class at the head of each split and the
  manifest lists each shard's ages, so the stream covers every class within its first shard.
* **Corrupt images** found when a drawn sample is decoded are evicted from the buffer (so
  each read of a corrupt image is counted once, not once per draw) and the same class is
  drawn again.

Age-aware (Xing et al.) differs from class-balanced in *how* the class and the instance are
chosen: the class walks a shuffled cycle over the present ages (every age once per cycle,
reshuffled at the end), and the instance walks a shuffled cycle over its class buffer;
class-balanced draws both uniformly with replacement.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Literal, TypeVar

__all__ = [
    "PASS_END",
    "BalancedBuffers",
    "age_class",
    "balanced_stream",
    "shuffled",
]

T = TypeVar("T")
U = TypeVar("U")


class _PassEnd:
    """Marker a repeating source yields between full passes over its shards."""

    _instance: _PassEnd | None = None

    def __new__(cls) -> _PassEnd:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PASS_END"

    def __reduce__(self) -> str:
        return "PASS_END"


PASS_END = _PassEnd()


def age_class(age: float | None, num_classes: int = 101) -> int | None:
    """Age in years -> class index: rounded half up, clipped to ``0..num_classes-1``.
    None / NaN -> None (no class)."""
    if age is None:
        return None
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a):
        return None
    return min(max(math.floor(a + 0.5), 0), num_classes - 1)


class BalancedBuffers(Generic[T]):
    """Per-class bounded buffers and the class/instance draw rules (see module docstring).

    ``classes``: the classes to balance over (from the manifest), or None to learn them from
    the stream. ``mode``: ``class`` (uniform draws with replacement, LAE/GLAE) or
    ``age_aware`` (shuffled cycles over classes and over each class buffer, Xing et al.).
    """

    def __init__(
        self,
        classes: Iterable[int] | None,
        *,
        per_class: int = 16,
        mode: Literal["class", "age_aware"] = "class",
        rng: random.Random | None = None,
    ) -> None:
        if per_class < 1:
            raise ValueError(f"per_class={per_class} must be at least 1")
        if mode not in ("class", "age_aware"):
            raise ValueError(f"sampler mode {mode!r} must be 'class' or 'age_aware'")
        self.mode = mode
        self.per_class = per_class
        self.rng = rng or random.Random(0)
        self.learn = classes is None
        self.classes: list[int] = sorted(set(classes or ()))
        self.buffers: dict[int, list[T]] = {}
        self.seen: Counter[int] = Counter()  # reads per class since the start
        self.dead: set[int] = set()  # classes without a usable sample in a whole pass
        self._class_cycle: list[int] = []
        self._slot_cycle: dict[int, list[int]] = {}

    # -- filling ------------------------------------------------------------------------
    def add(self, cls: int, item: T) -> None:
        if cls in self.dead:
            return
        if cls not in self.buffers and cls not in self.classes:
            self.classes.append(cls)  # a class the manifest did not list: balance it too
            self.classes.sort()
            self._class_cycle = []
        buf = self.buffers.setdefault(cls, [])
        self.seen[cls] += 1
        if len(buf) < self.per_class:
            buf.append(item)
        else:
            buf[self.rng.randrange(self.per_class)] = item

    def has(self, cls: int) -> bool:
        return bool(self.buffers.get(cls))

    def evict(self, cls: int, slot: int) -> None:
        buf = self.buffers[cls]
        buf[slot] = buf[-1]
        buf.pop()
        self._slot_cycle.pop(cls, None)

    def drop_class(self, cls: int) -> None:
        """Stop drawing ``cls`` for good (a whole pass gave no usable sample of it)."""
        self.dead.add(cls)
        if cls in self.classes:
            self.classes.remove(cls)
        self.buffers.pop(cls, None)
        self._slot_cycle.pop(cls, None)
        self._class_cycle = [c for c in self._class_cycle if c != cls]

    # -- drawing ------------------------------------------------------------------------
    def draw_class(self) -> int:
        """The next class: uniform among ``classes`` (class) or the next of a shuffled cycle
        (age_aware). Classes learned from the stream count only once seen."""
        pool = self.classes
        if not pool:
            raise LookupError("no classes to draw from")
        if self.mode == "class":
            return pool[self.rng.randrange(len(pool))]
        if not self._class_cycle:
            self._class_cycle = list(pool)
            self.rng.shuffle(self._class_cycle)
        return self._class_cycle.pop()

    def draw_slot(self, cls: int) -> int:
        """An index into ``buffers[cls]`` (which must be non-empty)."""
        n = len(self.buffers[cls])
        if self.mode == "class":
            return self.rng.randrange(n)
        cycle = self._slot_cycle.get(cls)
        if not cycle:
            cycle = list(range(n))
            self.rng.shuffle(cycle)
            self._slot_cycle[cls] = cycle
        slot = cycle.pop()
        return slot if slot < n else self.rng.randrange(n)

    def memory_items(self) -> int:
        return sum(len(b) for b in self.buffers.values())


def balanced_stream(
    items: Iterable[Any],
    class_of: Callable[[T], int | None],
    prepare: Callable[[T], U | None],
    *,
    classes: Iterable[int] | None = None,
    mode: Literal["class", "age_aware"] = "class",
    per_class: int = 16,
    max_pending: int = 4096,
    rng: random.Random | None = None,
) -> Iterator[U]:
    """Class-balanced (or age-aware) resampling of ``items``; yields ``prepare(item)``.

    ``items`` may contain :data:`PASS_END` markers between full passes over the data (the
    training source repeats forever); classes with nothing usable buffered after a whole
    pass are dropped there. ``class_of(item)`` gives the class (None: the item has no class
    and is ignored).
    ``prepare(item)`` decodes/augments a drawn item; returning None means the item is
    unusable (the caller counted why): it is evicted and its class drawn again.
    The stream ends when ``items`` ends (deferred draws are then abandoned) or when no class
    is left.
    """
    state: BalancedBuffers[T] = BalancedBuffers(classes, per_class=per_class, mode=mode, rng=rng)
    pending: Counter[int] = Counter()
    n_pending = 0
    passes = 0

    def serve(cls: int) -> U | None:
        """Draw an instance of ``cls`` and prepare it; None when the class ran empty."""
        while state.has(cls):
            slot = state.draw_slot(cls)
            out = prepare(state.buffers[cls][slot])
            if out is not None:
                return out
            state.evict(cls, slot)
        return None

    for item in items:
        if item is PASS_END:
            passes += 1
            # a whole pass left nothing usable in these buffers: no usable sample exists
            for cls in [c for c in state.classes if not state.has(c)]:
                state.drop_class(cls)
                n_pending -= pending.pop(cls, 0)
            if not state.classes:
                return
            continue
        cls = class_of(item)
        if cls is None:
            continue
        state.add(cls, item)
        # fulfil draws deferred until this class arrived
        while pending.get(cls, 0) > 0:
            out = serve(cls)
            if out is None:
                break
            pending[cls] -= 1
            n_pending -= 1
            yield out
        if pending.get(cls, 0) == 0:
            pending.pop(cls, None)
        # one new draw per sample read
        if n_pending >= max_pending or not state.classes:
            continue
        drawn = state.draw_class()
        out = serve(drawn)
        if out is None:
            pending[drawn] += 1
            n_pending += 1
        else:
            yield out


def shuffled(
    items: Iterable[T], bufsize: int, rng: random.Random, initial: int = 100
) -> Iterator[T]:
    """Buffered shuffle (as webdataset's ``shuffle``) with an explicit RNG for determinism.

    Output starts after ``initial`` items; the buffer then grows by one item every second
    read up to ``bufsize``. At a :data:`PASS_END` marker the buffer is emitted (shuffled)
    before the marker, so no item of the next pass overtakes one of this pass: an epoch that
    is one pass over a rank's share reads each of its samples exactly once, even with a
    buffer larger than the share. ``bufsize <= 1`` passes items unchanged.
    """
    if bufsize <= 1:
        yield from items
        return
    initial = min(max(initial, 1), bufsize)
    buf: list[T] = []
    grow = False
    for item in items:
        if item is PASS_END:
            rng.shuffle(buf)
            yield from buf
            buf, grow = [], False
            yield item
            continue
        buf.append(item)
        if len(buf) < initial:
            continue
        if len(buf) < bufsize:
            grow = not grow
            if grow:
                continue
        k = rng.randrange(len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    rng.shuffle(buf)
    yield from buf
