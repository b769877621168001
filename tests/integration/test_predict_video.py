"""Video through batch prediction on a real local Ray: a 10-second clip the test writes itself
(three real UTKFace faces, a child, an adult and an elderly person, each drifting on its own
small circle) beside a photo, through ``jobs.predict --fps 2``: every sampled frame has its
rows with its timestamp, each face is one track from the first frame to the last, the
smoothed age is the running median of that track's ages, and the photo's rows have no video
columns."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
from datagen import make_tiny_model
from faces import covers, utk_faces_by_band
from videos import face_arrays, face_positions, write_face_video

pytestmark = pytest.mark.integration

SECONDS, NATIVE_FPS, FPS = 10.0, 10.0, 2.0
WIDTH, HEIGHT, SIZE = 640, 320, 160


def test_a_ten_second_video_gives_one_track_per_face(
    ray_local: None, utkface_tar: Path, tmp_path: Path
) -> None:
    from ageray.inference.batch import read_parquet
    from ageray.inference.video import probe
    from jobs.predict import main

    bands = utk_faces_by_band(utkface_tar)
    chips = [bands[b][0][2] for b in ("child", "adult", "elderly")]
    folder = tmp_path / "input"
    folder.mkdir()
    video = folder / "family.mp4"
    frames = write_face_video(
        video, face_arrays(chips, size=SIZE), seconds=SECONDS, fps=NATIVE_FPS,
        width=WIDTH, height=HEIGHT,
    )  # fmt: skip
    assert probe(video).frame_count == frames == 100
    (folder / "portrait.jpg").write_bytes(chips[1])
    model = make_tiny_model(tmp_path / "model", seed=0)
    out = tmp_path / "ages.parquet"
    assert main(["--model", str(model), "--input", str(folder), "--output", str(out),
                 "--fps", str(FPS), "--batch-size", "16", "--actors", "1",
                 "--no-progress"]) == 0  # fmt: skip
    rows = read_parquet(str(out)).to_pylist()

    photo = [r for r in rows if r["key"] == "portrait.jpg"]
    assert photo and all(r["frame_index"] is None and r["track_id"] is None for r in photo)
    video_rows = [r for r in rows if r["source"] == str(video)]
    by_frame: dict[int, list[dict]] = defaultdict(list)
    for r in video_rows:
        by_frame[r["frame_index"]].append(r)
    want = math.ceil(SECONDS * FPS)
    assert abs(len(by_frame) - want) <= 1, sorted(by_frame)
    for index, group in by_frame.items():
        assert {r["key"] for r in group} == {f"family.mp4#frame={index}"}
        (stamp,) = {r["timestamp_s"] for r in group}
        assert stamp == pytest.approx(index / NATIVE_FPS)

    # one track per face, the whole clip long, each always over its own face
    faced = [r for r in video_rows if r["error"] is None]
    tracks: dict[int, list[dict]] = defaultdict(list)
    for r in faced:
        tracks[r["track_id"]].append(r)
    assert len(tracks) == 3, {t: len(v) for t, v in tracks.items()}
    for tid, track in tracks.items():
        assert len(track) >= len(by_frame) - 1, (tid, len(track))
        assert len({r["frame_index"] for r in track}) == len(track)  # one box a frame
        owners = set()
        for r in track:
            spots = face_positions(3, r["frame_index"], width=WIDTH, height=HEIGHT, size=SIZE)
            owners |= {
                i
                for i, (x, y) in enumerate(spots)
                if covers(r["face_box"], (x, y, x + SIZE, y + SIZE))
            }
        assert len(owners) == 1, (tid, owners)
        track.sort(key=lambda r: r["frame_index"])
        seen = [r["age"] for r in track]
        for n, r in enumerate(track, 1):
            assert r["age_smoothed"] == pytest.approx(statistics.median(seen[:n]), abs=1e-9)
