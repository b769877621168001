"""The IoU face tracker (ageray.inference.face_tracks): ids kept across frames while boxes
overlap, new ids for new faces, tracks end after K missed frames, and the running median."""

from __future__ import annotations

import pytest

from ageray.inference.face_tracks import FaceTracker, iou, match_greedy, track_rows


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


def test_batch_prediction_holds_video_rows_and_writes_them_tracked() -> None:
    """What jobs.predict's driver does with answer tables arriving in any order: photo rows
    pass, a video's rows come out at the end tracked, in the Parquet schema."""
    from ageray.inference.answers import arrow_schema, rows_to_table
    from ageray.inference.batch import carry_video_columns
    from ageray.inference.face_tracks import VideoTracks

    def face(key: str, f: int | None, x: float, age: float, i: int = 0) -> dict:
        return {"key": key, "source": "clip.mp4" if f is not None else key, "age": age,
                "face_box": _box(x, 0), "face_index": i, "frame_index": f,
                "timestamp_s": None if f is None else f / 10}  # fmt: skip

    late = rows_to_table([face("clip.mp4#frame=5", 5, 3, 41.0), face("a.jpg", None, 0, 9.0)])
    early = rows_to_table([face("clip.mp4#frame=0", 0, 0, 40.0),
                           face("clip.mp4#frame=0", 0, 300, 70.0, i=1)])  # fmt: skip
    tracks = VideoTracks()
    assert VideoTracks.images_in(early) == 1 and VideoTracks.images_in(late) == 2
    passed = [tracks.split(t) for t in (late, early)]
    assert [t.num_rows for t in passed] == [1, 0] and tracks.videos == 1
    assert passed[0].column("key").to_pylist() == ["a.jpg"]
    (video,) = list(tracks.tables())
    assert video.schema == arrow_schema()
    got = video.select(["frame_index", "timestamp_s", "track_id", "age_smoothed"]).to_pylist()
    assert got == [
        {"frame_index": 0, "timestamp_s": 0.0, "track_id": 0, "age_smoothed": 40.0},
        {"frame_index": 0, "timestamp_s": 0.0, "track_id": 1, "age_smoothed": 70.0},
        {"frame_index": 5, "timestamp_s": 0.5, "track_id": 0, "age_smoothed": 40.5},
    ]
    assert tracks.videos == 0  # handed over once
    # the actor side: a frame's index and time go onto every face row of its key
    rows = [{"key": "v#frame=3"}, {"key": "v#frame=3"}, {"key": "p.jpg"}]
    carry_video_columns(
        {"key": ["v#frame=3", "p.jpg"], "frame_index": [3, None], "timestamp_s": [0.3, None]},
        rows,
    )
    assert [r.get("frame_index") for r in rows] == [3, 3, None]
    assert [r.get("timestamp_s") for r in rows] == [0.3, 0.3, None]


def test_a_batch_splits_into_photos_and_frames() -> None:
    from ageray.inference.batch import split_frames

    cols = {"key": ["a", "v#frame=0", "b", "v#frame=5"], "frame_index": [None, 0, None, 5]}
    assert split_frames(cols) == [([0, 2], False), ([1, 3], True)]
    assert split_frames({"key": ["a", "b"]}) == [([0, 1], False)]
    assert split_frames({"key": ["v#frame=0"], "frame_index": [0]}) == [([0], True)]
