"""The one label check (``ageray.data.labels``) and the stream's entrance to it
(``ageray.data.stages.parse_labels``): every bad label is skipped and counted under its named
reason, never passed on as NaN or an impossible age. No DataLoader, no Ray."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from ageray.data.labels import (
    LABEL_SKIP_REASONS,
    LabelError,
    check_age,
    check_gender,
    check_identity,
    check_labels,
    check_race,
    parse_age,
)
from ageray.data.records import Record, printable
from ageray.data.samplers import PASS_END
from ageray.data.skips import SKIP_REASONS, SkipCounter
from ageray.data.stages import ShardSample, parse_labels


def reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(LabelError) as e:
        fn(*args, **kw)
    return e.value.reason


def test_ages_must_be_finite_numbers_in_range() -> None:
    assert check_age(0) == 0.0 and check_age(116) == 116.0 and check_age(np.int64(30)) == 30.0
    assert check_age(26.5) == 26.5
    for bad in (math.nan, math.inf, -math.inf, "26", True, None, [26], 10**400):
        assert reason(check_age, bad) == "bad_age", bad
    for out in (-1, 120.5, 1e9):
        assert reason(check_age, out) == "age_out_of_range", out
    assert reason(check_age, 50, age_range=(0, 40)) == "age_out_of_range"
    assert reason(check_age, math.nan, field="age_std") == "bad_age_std"
    assert reason(parse_age, "1e400") == "bad_age"
    assert reason(parse_age, "twelve") == "bad_age"
    assert reason(parse_age, "121") == "age_out_of_range"
    assert parse_age(" 26.5 ") == 26.5


def test_codes_are_known_or_absent() -> None:
    assert [check_gender(v) for v in (0, 1, 1.0, None)] == [0, 1, 1, None]
    assert [check_race(v) for v in (0, 4, 2.0, None)] == [0, 4, 2, None]
    assert [check_identity(v) for v in (0, 12345, None)] == [0, 12345, None]
    for bad in (2, -1, 0.5, "0", True, math.nan):
        assert reason(check_gender, bad) == "bad_gender", bad
    for bad in (5, -1, 1.5, "white", False, math.inf):
        assert reason(check_race, bad) == "bad_race", bad
    for bad in (-2, 1.5, "p001", True):
        assert reason(check_identity, bad) == "bad_identity", bad


def test_check_labels_requires_the_age_only_when_asked() -> None:
    assert check_labels({"identity": 3}, require_age=False) == {
        "age": None,
        "age_std": None,
        "gender": None,
        "race": None,
        "identity": 3,
    }
    assert reason(check_labels, {"age": None, "identity": 3}, require_age=True) == "missing_age"
    assert reason(check_labels, {"age": 30, "gender": 7}, require_age=True) == "bad_gender"


def test_every_label_reason_is_a_stream_skip_reason() -> None:
    assert set(LABEL_SKIP_REASONS) <= set(SKIP_REASONS)
    assert len(SKIP_REASONS) == len(set(SKIP_REASONS))


def _raw(key: str, labels: Any, *, raw: bytes | None = None) -> dict[str, Any]:
    body = raw if raw is not None else json.dumps(labels).encode()
    return {"__key__": key, "__url__": "x.tar", "jpg": b"jpeg bytes", "json": body}


def test_parse_labels_counts_each_bad_member_under_its_reason() -> None:
    good = {"age": 30, "age_std": 2.5, "gender": 1, "race": 4, "identity": 7}
    samples = [
        _raw("good", good),
        _raw("nan_age", None, raw=b'{"age": NaN}'),  # Python's json writes NaN
        _raw("inf_age", None, raw=b'{"age": Infinity}'),
        _raw("str_age", {"age": "30"}),
        _raw("old", {"age": 150}),
        _raw("neg", {"age": -2}),
        _raw("null_age", {"age": None}),
        _raw("no_age", {"gender": 0}),
        _raw("gender", {"age": 30, "gender": 2}),
        _raw("race", {"age": 30, "race": 9}),
        _raw("identity", {"age": 30, "identity": -4}),
        _raw("std", {"age": 30, "age_std": -1}),
        _raw("list", [30]),
        _raw("garbled", None, raw=b"\xff\xfe{"),
        _raw("deep", None, raw=b"[" * 100_000),
        {"__key__": "nolabel", "jpg": b"x"},
        {"__key__": "noimage", "json": b"{}"},
        PASS_END,
    ]
    counter = SkipCounter()
    out = list(parse_labels(iter(samples), counter=counter, require_age=True))
    assert out[-1] is PASS_END
    (sample,) = out[:-1]
    assert sample == ShardSample("good", b"jpeg bytes", 30.0, 2.5, 1, 4, 7)
    assert counter.take() == {
        "bad_age": 3,
        "age_out_of_range": 2,
        "missing_age": 2,
        "bad_gender": 1,
        "bad_race": 1,
        "bad_identity": 1,
        "age_std_out_of_range": 1,
        "bad_label": 3,
        "no_label": 1,
        "no_image": 1,
    }


def test_parse_labels_without_required_age_keeps_ageless_members() -> None:
    """Identity pretraining reads splits without ages: absent labels are NaN / -1 there."""
    counter = SkipCounter()
    out = list(
        parse_labels(
            iter([_raw("a", {"age": None, "identity": 3}), _raw("b", {"identity": 4})]),
            counter=counter,
        )
    )
    assert [s.identity for s in out] == [3, 4]
    assert all(math.isnan(s.age) and math.isnan(s.age_std) for s in out)
    assert all(s.gender == -1 and s.race == -1 for s in out)
    assert counter.take() == {}


def test_parse_labels_honours_the_configured_age_range() -> None:
    counter = SkipCounter()
    out = list(
        parse_labels(
            iter([_raw("young", {"age": 20}), _raw("old", {"age": 90})]),
            counter=counter,
            require_age=True,
            age_range=(0, 80),
        )
    )
    assert [s.key for s in out] == ["young"]
    assert counter.take() == {"age_out_of_range": 1}


def test_printable_names_are_deterministic_distinct_and_encodable() -> None:
    a = b"caf\xe9".decode("utf-8", "surrogateescape")
    b = b"caf\xe8".decode("utf-8", "surrogateescape")
    assert printable(a) == "caf\\xe9" and printable(b) == "caf\\xe8"
    assert printable("café") == "café" and printable("plain") == "plain"
    assert printable("\ud800x") == "\\ud800x"  # a lone surrogate no file name produced
    for text in (a, b, "\ud800x"):
        printable(text).encode("utf-8")  # would raise for the raw text
        json.dumps(printable(text), ensure_ascii=False).encode("utf-8")
    rec = Record(key="k", image=b"", age=1.0, identity=a, source=f"/data/{a}/1.jpg")
    assert rec.identity == "caf\\xe9" and rec.source == "/data/caf\\xe9/1.jpg"
