"""Who reads what (``ageray.data.readplan``): every sample of a split belongs to exactly one
reader slot, the training split changes each epoch, balanced streams read everything and
count each bad shard once, and epoch sizes are equal on every rank. No DataLoader, no Ray."""

from __future__ import annotations

from collections import Counter

import pytest

from ageray.data.readplan import eval_share, plan_reads, plan_slot, train_steps


def test_plan_slot_partitions_shards_or_samples() -> None:
    assert plan_slot(10, 1, 4) == ([1, 5, 9], None)
    assert plan_slot(3, 2, 4) == ([0, 1, 2], 2)
    with pytest.raises(ValueError):
        plan_slot(3, 4, 4)
    assert train_steps(100, 2, 8, None) == 6
    assert train_steps(5, 2, 8, None) == 1
    assert train_steps(100, 2, 8, 17) == 17


def _plans(num_shards: int, num_slots: int, **kw) -> list:
    return [
        plan_reads(num_shards=num_shards, slot=s, num_slots=num_slots, **kw)
        for s in range(num_slots)
    ]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shard_level_split_is_a_partition(mode: str) -> None:
    plans = _plans(10, 4, mode=mode, seed=3, epoch=1)
    read = [i for p in plans for i in p.shards]
    assert sorted(read) == list(range(10))  # each shard read by exactly one slot
    assert all(p.modulo is None and p.repeat == (mode == "train") for p in plans)
    # each slot counts the bad shards it reads: exactly one counter per shard
    assert Counter(i for p in plans for i in range(10) if p.owns(i) and i in p.shards) == (
        Counter(range(10))
    )


def test_training_shard_split_changes_every_epoch_but_not_between_calls() -> None:
    first = [p.shards for p in _plans(12, 3, mode="train", seed=0, epoch=0)]
    again = [p.shards for p in _plans(12, 3, mode="train", seed=0, epoch=0)]
    later = [p.shards for p in _plans(12, 3, mode="train", seed=0, epoch=1)]
    assert first == again
    assert first != later
    evals = [p.shards for p in _plans(12, 3, mode="eval", seed=0, epoch=0)]
    assert evals == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_sample_level_split_reads_every_shard_in_one_shared_order() -> None:
    plans = _plans(2, 4, mode="train", seed=1, epoch=2)
    assert [p.modulo for p in plans] == [0, 1, 2, 3]
    assert all(sorted(p.shards) == [0, 1] for p in plans)
    # same first pass and same reshuffles on every slot, or the modulo split breaks
    orders = [[p.source_rng.random() for _ in range(5)] for p in plans]
    assert all(o == orders[0] for o in orders)
    # every shard counted bad by exactly one slot
    assert [sum(p.owns(i) for p in plans) for i in range(2)] == [1, 1]


@pytest.mark.parametrize("sampler", ["class", "age_aware"])
def test_balanced_streams_read_everything_starting_with_a_class_cover(sampler: str) -> None:
    shard_classes = [[1, 2], [2], [3], [2, 3], [4]]
    plans = _plans(5, 3, mode="train", sampler=sampler, shard_classes=shard_classes)
    for p in plans:
        assert p.balanced and p.repeat and p.modulo is None
        assert p.shards == list(range(5))
        assert p.first_order is not None and sorted(p.first_order) == list(range(5))
        # the greedy cover needs 3 shards ({1,2}, {3} or {2,3}, {4}): they come first
        head = set().union(*(shard_classes[i] for i in p.first_order[:3]))
        assert head == {1, 2, 3, 4}
    assert [sum(p.owns(i) for p in plans) for i in range(5)] == [1] * 5
    # without per-shard histograms there is no cover order; the sampler is ignored in eval
    assert (
        plan_reads(num_shards=5, slot=0, num_slots=1, mode="train", sampler=sampler).first_order
        is None
    )
    assert not plan_reads(num_shards=5, slot=0, num_slots=1, mode="eval", sampler=sampler).balanced


@pytest.mark.parametrize("counts", [[5, 7, 3, 9, 2], [40]])
def test_eval_share_adds_up_to_the_split(counts: list[int]) -> None:
    world, workers, batch = 2, 2, 4
    shares = [
        eval_share(counts, rank=r, world_size=world, num_workers=workers, batch_size=batch)
        for r in range(world)
    ]
    assert sum(n for n, _ in shares) == sum(counts)
    for n, batches in shares:
        assert batches * batch >= n
