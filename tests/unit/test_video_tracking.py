"""The IoU face tracker (ageray.inference.tracking): ids kept across frames while boxes
overlap, new ids for new faces, tracks end after K missed frames, and the running median."""

from __future__ import annotations

import pytest

from ageray.inference.tracking import FaceTracker, iou, match_greedy, track_rows


def _box(x: float, y: float, s: float = 100.0) -> list[float]:
    return [x, y, x + s, y + s]


def test_iou() -> None:
    assert iou(_box(0, 0), _box(0, 0)) == 1.0
    assert iou(_box(0, 0), _box(200, 0)) == 0.0
    assert iou(_box(0, 0), _box(50, 0)) == pytest.approx(50 * 100 / (2 * 100 * 100 - 5000))
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_greedy_takes_the_best_pair_first() -> None:
    tracks = [_box(0, 0), _box(60, 0)]
    boxes = [_box(55, 0), _box(5, 0)]  # box 0 overlaps both tracks; track 1 best
    assert match_greedy(tracks, boxes, threshold=0.3) == {0: 1, 1: 0}
    assert match_greedy(tracks, [_box(500, 500)], threshold=0.3) == {}


def test_ids_follow_moving_faces_and_survive_a_miss() -> None:
    t = FaceTracker(iou_threshold=0.3, max_missed=2)
    ids = [t.update([_box(10 * f, 0), _box(400 - 10 * f, 300)])[0] for f in range(5)]
    assert ids == [[0, 1]] * 5
    assert t.update([_box(50, 0)])[0] == [0]  # face 1 missed once
    assert t.update([_box(50, 0), _box(360, 300)])[0] == [0, 1]  # back: same id
    # order in the frame does not matter: ids follow the boxes
    assert t.update([_box(360, 300), _box(50, 0)])[0] == [1, 0]


def test_a_track_ends_after_k_missed_frames() -> None:
    t = FaceTracker(iou_threshold=0.3, max_missed=2)
    assert t.update([_box(0, 0)])[0] == [0]
    t.update([])
    t.update([])
    assert t.update([_box(0, 0)])[0] == [0]  # missed 2 = K: still alive
    for _ in range(3):
        t.update([])
    assert t.update([_box(0, 0)])[0] == [1]  # missed 3 > K: a new track


def test_smoothed_age_is_the_running_median() -> None:
    t = FaceTracker()
    ages = [30.0, 31.0, 80.0, 29.0, None, 30.5]  # 80: one bad frame; None: no answer
    got = [t.update([_box(0, 0)], [a])[1][0] for a in ages]
    assert got == [30.0, 30.5, 31.0, 30.5, 30.5, 30.5]


def test_track_rows_of_one_video() -> None:
    rows = []
    for f in range(4):
        rows.append(
            {
                "frame_index": f * 5,
                "face_index": 1,
                "face_box": _box(300 + f, 0),
                "age": 60.0 + f,
                "error": None,
            }
        )
        rows.append(
            {
                "frame_index": f * 5,
                "face_index": 0,
                "face_box": _box(f, 0),
                "age": 8.0,
                "error": None,
            }
        )
    rows.append(
        {
            "frame_index": 20,
            "face_index": None,
            "face_box": None,
            "age": None,
            "error": "no_face: none",
        }
    )
    out = track_rows(reversed(rows))
    assert [(r["frame_index"], r["face_index"]) for r in out] == [
        (0, 0),
        (0, 1),
        (5, 0),
        (5, 1),
        (10, 0),
        (10, 1),
        (15, 0),
        (15, 1),
        (20, None),
    ]
    assert [r["track_id"] for r in out] == [0, 1] * 4 + [None]
    assert [r["age_smoothed"] for r in out if r["track_id"] == 1] == [60.0, 60.5, 61.0, 61.5]
    assert out[-1]["age_smoothed"] is None


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="iou_threshold"):
        FaceTracker(iou_threshold=0)
    with pytest.raises(ValueError, match="max_missed"):
        FaceTracker(max_missed=-1)
    with pytest.raises(ValueError, match="2 boxes but 1 ages"):
        FaceTracker().update([_box(0, 0), _box(9, 9)], [1.0])
