"""Class-balanced and age-aware sampling over a stream (ageray.data.samplers): uniform over
the classes present (chi-square), bounded memory, one draw per read, corrupt items evicted."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator

import pytest
from scipy.stats import chisquare

from ageray.data.samplers import (
    PASS_END,
    BalancedBuffers,
    age_class,
    balanced_stream,
    shuffled,
)


def long_tailed_labels(seed: int = 0) -> list[tuple[int, int]]:
    """(item id, age class) pairs: a long tail over 0..100 with empty classes (no 0, no odd
    ages above 60, nothing above 90), from thousands of 25-35 year olds down to single
    images of the elderly."""
    rng = random.Random(seed)
    items: list[tuple[int, int]] = []
    for age in range(1, 91):
        if age > 60 and age % 2:
            continue
        n = max(1, int(2000 * 0.85 ** abs(age - 30)))
        items += [(len(items) + i, age) for i in range(n)]
    rng.shuffle(items)
    return items


def repeat_passes(items: list, seed: int, head: bool = False) -> Iterator:
    """What a training source does: the items forever, reshuffled each pass, PASS_END
    between passes. ``head``: the first pass starts with one item of every class, as the
    shard writer lays out the first shard of a split."""
    rng = random.Random(seed)
    first = True
    while True:
        order = list(items)
        rng.shuffle(order)
        if head and first:
            seen: dict[int, tuple[int, int]] = {}
            for it in order:
                seen.setdefault(it[1], it)
            order = list(seen.values()) + [it for it in order if it not in seen.values()]
        first = False
        yield from order
        yield PASS_END


def test_age_class_rounds_half_up_and_clips() -> None:
    assert age_class(24.5) == 25
    assert age_class(24.49) == 24
    assert age_class(-3) == 0
    assert age_class(116) == 100
    assert age_class(116, num_classes=200) == 116
    assert age_class(None) is None
    assert age_class(float("nan")) is None


@pytest.mark.parametrize("mode", ["class", "age_aware"])
def test_class_frequencies_are_uniform_over_present_classes(mode: str) -> None:
    items = long_tailed_labels()
    hist = Counter(c for _, c in items)
    present = sorted(hist)
    assert max(hist.values()) / min(hist.values()) > 1000  # really long-tailed
    assert 0 not in hist and 61 not in hist and 95 not in hist  # empty classes exist
    out = balanced_stream(
        repeat_passes(items, 1, head=True),
        class_of=lambda it: it[1],
        prepare=lambda it: it,
        classes=present,
        mode=mode,
        per_class=16,
        rng=random.Random(2),
    )
    draws = list(itertools.islice(out, 20_000))
    freq = Counter(c for _, c in draws)
    assert set(freq) == set(present)  # nothing from an empty class, every present one drawn
    observed = [freq[c] for c in present]
    stat, p = chisquare(observed)
    assert p > 0.01, (stat, p, observed)
    if mode == "age_aware":
        # cycles over the ages: counts differ by far less than sampling noise would give
        assert max(observed) - min(observed) <= 3


def test_deferred_draws_keep_uniformity_without_a_head() -> None:
    """Rare classes met late: their draws wait (bounded) and are served on arrival."""
    items = [it for it in long_tailed_labels() if it[0] % 4 == 0 or it[1] > 50]
    present = sorted({c for _, c in items})
    out = balanced_stream(
        repeat_passes(items, 5),
        class_of=lambda it: it[1],
        prepare=lambda it: it,
        classes=present,
        rng=random.Random(6),
    )
    draws = list(itertools.islice(out, 20_000))
    freq = Counter(c for _, c in draws)
    _, p = chisquare([freq[c] for c in present])
    assert p > 0.01


def test_instance_stream_is_not_uniform_control() -> None:
    """The chi-square test above has power: the raw stream fails it."""
    items = long_tailed_labels()
    freq = Counter(c for _, c in itertools.islice(repeat_passes(items, 1), 20_000))
    _, p = chisquare([freq[c] for c in sorted({c for _, c in items})])
    assert p < 1e-6


def test_one_draw_per_read_and_bounded_memory() -> None:
    items = long_tailed_labels()
    reads = 0

    def counting(src: Iterator) -> Iterator:
        nonlocal reads
        for it in src:
            if it is not PASS_END:
                reads += 1
            yield it

    classes = sorted({c for _, c in items})
    out = list(
        itertools.islice(
            balanced_stream(
                counting(repeat_passes(items, 3)),
                class_of=lambda it: it[1],
                prepare=lambda it: it,
                classes=classes,
                per_class=8,
                rng=random.Random(0),
            ),
            30_000,
        )
    )
    # after warm-up (rare classes found), emitted == read: instance-balanced throughput
    assert len(out) == 30_000
    assert reads <= 30_000 * 1.05


def test_buffers_never_exceed_per_class() -> None:
    buf: BalancedBuffers[int] = BalancedBuffers([1, 2], per_class=4, rng=random.Random(0))
    for i in range(1000):
        buf.add(1 + i % 3, i)  # class 3 is unknown to the manifest: balanced too
    assert buf.memory_items() == 12
    assert buf.classes == [1, 2, 3]


def test_age_aware_instance_cycle_visits_every_buffered_item_once() -> None:
    buf: BalancedBuffers[str] = BalancedBuffers(
        [5], per_class=6, mode="age_aware", rng=random.Random(1)
    )
    for i in range(6):
        buf.add(5, f"x{i}")
    first = [buf.buffers[5][buf.draw_slot(5)] for _ in range(6)]
    second = [buf.buffers[5][buf.draw_slot(5)] for _ in range(6)]
    assert sorted(first) == sorted(second) == [f"x{i}" for i in range(6)]
    assert first != second  # reshuffled at the end of the list


def test_age_aware_class_cycle_visits_every_class_once() -> None:
    buf: BalancedBuffers[int] = BalancedBuffers(range(10), mode="age_aware", rng=random.Random(0))
    for _ in range(5):
        assert sorted(buf.draw_class() for _ in range(10)) == list(range(10))


def test_corrupt_items_are_evicted_once_and_dead_classes_dropped() -> None:
    # class 7 has only corrupt items, class 3 one corrupt item among good ones
    items = [(i, 3) for i in range(20)] + [(100, 7), (101, 7)] + [(i, 4) for i in range(200, 230)]
    bad = {5, 100, 101}
    rejected: Counter[int] = Counter()

    def prepare(it: tuple[int, int]) -> tuple[int, int] | None:
        if it[0] in bad:
            rejected[it[0]] += 1
            return None
        return it

    out = list(
        itertools.islice(
            balanced_stream(
                repeat_passes(items, 0),
                class_of=lambda it: it[1],
                prepare=prepare,
                classes=[3, 4, 7],
                per_class=64,
                rng=random.Random(0),
            ),
            3000,
        )
    )
    assert all(it[0] not in bad for it in out)
    passes = len(out) // len(items) + 2
    assert rejected[5] <= passes  # evicted on failure: at most once per read
    assert rejected[100] == rejected[101] == 1  # class 7 dropped at the first pass end
    freq = Counter(c for _, c in out)
    assert set(freq) == {3, 4}
    assert abs(freq[3] - freq[4]) < 300


def test_empty_and_unknown_classes_do_not_fail() -> None:
    # the manifest lists classes 1..5 but the stream only has 2 and 4
    items = [(i, 2 + 2 * (i % 2)) for i in range(50)]
    out = list(
        itertools.islice(
            balanced_stream(
                repeat_passes(items, 0),
                class_of=lambda it: it[1],
                prepare=lambda it: it,
                classes=[1, 2, 3, 4, 5],
                rng=random.Random(0),
            ),
            500,
        )
    )
    assert len(out) == 500
    assert {c for _, c in out} == {2, 4}


def test_items_without_class_are_ignored_and_finite_streams_end() -> None:
    items = [(i, None if i % 2 else 1) for i in range(40)]
    out = list(
        balanced_stream(
            iter(items), class_of=lambda it: it[1], prepare=lambda it: it, rng=random.Random(0)
        )
    )
    assert 0 < len(out) <= 20
    assert all(c == 1 for _, c in out)


def test_learned_classes_without_manifest() -> None:
    items = long_tailed_labels()[:3000]
    out = list(
        itertools.islice(
            balanced_stream(
                repeat_passes(items, 0),
                class_of=lambda it: it[1],
                prepare=lambda it: it,
                classes=None,
                rng=random.Random(0),
            ),
            5000,
        )
    )
    assert len(out) == 5000
    assert len({c for _, c in out}) == len({c for _, c in items})


def test_shuffled_is_a_deterministic_permutation_and_passes_markers() -> None:
    data = [*list(range(500)), PASS_END, *list(range(500, 600))]
    a = list(shuffled(iter(data), 64, random.Random(3), initial=10))
    b = list(shuffled(iter(data), 64, random.Random(3), initial=10))
    assert a == b
    assert a.count(PASS_END) == 1
    nums = [x for x in a if x is not PASS_END]
    assert sorted(nums) == list(range(600))
    assert nums != list(range(600))
    assert list(shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))


def test_shuffled_lets_no_item_of_the_next_pass_overtake_this_one() -> None:
    # a training stream repeats its share forever; one epoch = one pass = each sample once,
    # even with a buffer bigger than the pass (the cluster test checks it across ranks)
    passes = [*range(120), PASS_END, *range(120), PASS_END, *range(50)]
    out = list(shuffled(iter(passes), 500, random.Random(1), initial=100))
    first = out[: out.index(PASS_END)]
    assert sorted(first) == list(range(120)) and first != list(range(120))
    second = out[out.index(PASS_END) + 1 :]
    assert sorted(second[: second.index(PASS_END)]) == list(range(120))


def test_pass_end_pickles_to_the_same_marker() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(PASS_END)) is PASS_END
