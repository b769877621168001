"""Who reads what: which shards (or samples) each reader slot reads, in which order, and how
many steps an epoch has. Pure functions of the manifest's sizes and the run's seeds, so the
rules are unit-tested without a DataLoader.

**Slots.** There are ``G = world_size * max(1, num_workers)`` reader *slots* (rank r,
DataLoader worker w -> slot ``r * W + w``). With ``S >= G`` shards, slot g reads shards
``g, g+G, g+2G, ...`` (shard-level split; in training the shard list is first permuted with
a per-epoch seed shared by all ranks, so the split changes every epoch). With ``S < G``
every slot reads every shard in the same order and keeps the samples whose running index
``i`` satisfies ``i % G == g`` (sample-level split). Either way each sample of a split
belongs to exactly one slot: evaluation sees every sample exactly once across ranks and
workers. Class-balanced and age-aware training ignore the split (every slot reads all
shards with its own shard order and RNG) so that every slot can draw every age class; they
read one sample per sample emitted, so total I/O is unchanged.

**Equal steps.** Training streams repeat their shard subset forever (reshuffled each pass);
the loader yields exactly ``steps = data.steps_per_epoch or max(1, count // (world_size *
batch_size))`` batches on every rank, from the manifest count, whatever the rank's share of
shards or samples. No rank runs out early, so DDP cannot hang.

**Bad shards are counted once.** A shard read by one slot only is counted by that slot;
a shard every slot reads (sample-level split, balanced streams) is counted by the slot
``index % G``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ageray.data.splits import stable_unit

__all__ = [
    "ReadPlan",
    "Sampler",
    "cover_order",
    "eval_share",
    "plan_reads",
    "plan_slot",
    "stable_seed",
    "train_steps",
]

Sampler = Literal["instance", "class", "age_aware"]
BALANCED_SAMPLERS = ("class", "age_aware")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts``, the same in every process and on every machine."""
    return int(stable_unit(0, ":".join(str(p) for p in parts)) * 2**63)


def plan_slot(num_shards: int, slot: int, num_slots: int) -> tuple[list[int], int | None]:
    """Shards read by reader slot ``slot`` of ``num_slots``, and the sample modulo.

    ``(shards, None)``: shard-level split (``num_shards >= num_slots``).
    ``(all shards, slot)``: sample-level split; keep samples with ``i % num_slots == slot``.
    Every sample belongs to exactly one slot either way.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} is outside 0..{num_slots - 1}")
    if num_shards >= num_slots:
        return list(range(slot, num_shards, num_slots)), None
    return list(range(num_shards)), slot


def train_steps(count: int, world_size: int, batch_size: int, steps_per_epoch: int | None) -> int:
    """Steps per epoch, identical on every rank: ``steps_per_epoch`` when set, else
    ``max(1, count // (world_size * batch_size))``."""
    if steps_per_epoch:
        return int(steps_per_epoch)
    return max(1, count // (world_size * batch_size))


def eval_share(
    counts: Sequence[int], *, rank: int, world_size: int, num_workers: int, batch_size: int
) -> tuple[int, int]:
    """``(samples, batches)`` an evaluation stream of ``rank`` yields: the sum over its
    workers' slots, each ending in a partial batch."""
    nw = max(1, num_workers)
    num_slots = world_size * nw
    total = sum(counts)
    num_samples = num_batches = 0
    for w in range(nw):
        shards, modulo = plan_slot(len(counts), rank * nw + w, num_slots)
        if modulo is None:
            n = sum(counts[i] for i in shards)
        else:
            n = len(range(modulo, total, num_slots))
        num_samples += n
        num_batches += -(-n // batch_size)
    return num_samples, num_batches


def cover_order(shard_classes: Sequence[Sequence[int]], rng: random.Random) -> list[int] | None:
    """A shard order whose first shards cover every age class (greedy set cover on the
    manifest's per-shard histograms), so a balanced stream finds every class early.
    None (and ``rng`` untouched) when the manifest has no per-shard classes."""
    if not shard_classes:
        return None
    remaining = list(range(len(shard_classes)))
    rng.shuffle(remaining)
    uncovered = set().union(*map(set, shard_classes))
    order: list[int] = []
    while uncovered and remaining:
        best = max(remaining, key=lambda i: len(uncovered.intersection(shard_classes[i])))
        if not uncovered.intersection(shard_classes[best]):
            break
        order.append(best)
        remaining.remove(best)
        uncovered -= set(shard_classes[best])
    return order + remaining


@dataclass
class ReadPlan:
    """What one reader slot reads in one epoch, decided before anything is opened.

    ``shards``: shard indices this slot reads (first-pass order before ``source_rng``
    reshuffles, unless ``first_order`` fixes it). ``modulo``: sample-level split, keep
    samples ``i % num_slots == modulo`` (None: every sample of the shards read). ``repeat``:
    training, read forever (one pass per :data:`~ageray.data.samplers.PASS_END`).
    ``balanced``: a class-balanced / age-aware stream. ``sample_rng``: the shuffle buffer's
    or the balanced draws' RNG.
    """

    slot: int
    num_slots: int
    shards: list[int]
    modulo: int | None
    repeat: bool
    balanced: bool
    owns_all: bool
    source_rng: random.Random
    sample_rng: random.Random
    first_order: list[int] | None = None

    def owns(self, index: int) -> bool:
        """Whether this slot counts shard ``index`` as bad when it is (once per read)."""
        return self.owns_all or index % self.num_slots == self.slot


def plan_reads(
    *,
    num_shards: int,
    slot: int,
    num_slots: int,
    mode: Literal["train", "eval"],
    sampler: Sampler = "instance",
    seed: int = 0,
    epoch: int = 0,
    shard_classes: Sequence[Sequence[int]] = (),
) -> ReadPlan:
    """The :class:`ReadPlan` of reader ``slot`` of ``num_slots`` (rules in the module
    docstring). The RNGs are seeded from ``(seed, epoch)`` (shared by all slots: the
    shard permutation) and ``(seed, epoch, slot)`` (this slot's order and draws)."""
    train = mode == "train"
    epoch_rng = random.Random(stable_seed("epoch", seed, epoch))
    slot_rng = random.Random(stable_seed("slot", seed, epoch, slot))
    if train and sampler in BALANCED_SAMPLERS:
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is outside 0..{num_slots - 1}")
        return ReadPlan(
            slot=slot,
            num_slots=num_slots,
            shards=list(range(num_shards)),
            modulo=None,
            repeat=True,
            balanced=True,
            owns_all=False,  # every slot reads every shard: count each bad one once
            source_rng=slot_rng,
            sample_rng=slot_rng,
            first_order=cover_order(shard_classes, slot_rng),
        )
    order = list(range(num_shards))
    if train:
        epoch_rng.shuffle(order)  # the shard -> slot split changes every epoch
    positions, modulo = plan_slot(num_shards, slot, num_slots)
    return ReadPlan(
        slot=slot,
        num_slots=num_slots,
        shards=[order[p] for p in positions],
        modulo=modulo,
        repeat=train,
        balanced=False,
        owns_all=modulo is None,
        # a sample-level split needs every slot to read the same order: the shared rng
        source_rng=slot_rng if modulo is None else epoch_rng,
        sample_rng=slot_rng,
    )
