"""Frame sampling and reading of video files (ageray.inference.video), on videos the test
writes with OpenCV itself: sample counts, timestamps and indices, every codec the tests
write, and clear errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from videos import CODECS

from ageray.inference.video import (
    VideoInfo,
    expected_samples,
    frame_key,
    is_video,
    probe,
    read_frames,
)


def _write(path: Path, frames: int, fps: float, *, size: tuple[int, int] = (64, 48)) -> None:
    """Frame i is uniformly grey level 2*i: a read frame says which frame it was."""
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CODECS[path.suffix]), fps, size)
    assert w.isOpened(), path
    for i in range(frames):
        w.write(np.full((size[1], size[0], 3), 2 * i, np.uint8))
    w.release()


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_samples_by_time_with_timestamps(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"clip{suffix}"
    _write(path, frames=100, fps=10.0)  # 10 s
    info = probe(path)
    assert (info.fps, info.frame_count, info.width, info.height) == (10.0, 100, 64, 48)
    frames = list(read_frames(path, fps=2.0))
    assert len(frames) == expected_samples(info, 2.0) == math.ceil(10.0 * 2.0) == 20
    assert [f.index for f in frames] == list(range(0, 100, 5))
    assert [f.timestamp_s for f in frames] == pytest.approx([i * 0.5 for i in range(20)])
    # the bytes are that frame (grey level 2 * index), as a JPEG
    grey = [np.asarray(Image.open(io.BytesIO(f.image)).convert("L")).mean() for f in frames]
    assert grey == pytest.approx([2 * f.index for f in frames], abs=3)


def test_uneven_rates_and_more_than_native(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    _write(path, frames=75, fps=25.0)  # 3 s at 25 fps
    frames = list(read_frames(path, fps=3.0))  # every 8.33 frames: the nearest frame
    assert [f.index for f in frames] == [round(k * 25 / 3) for k in range(9)]
    assert len(frames) == expected_samples(probe(path), 3.0)
    assert all(abs(f.timestamp_s - k / 3.0) <= 0.02 for k, f in enumerate(frames))
    every = list(read_frames(path, fps=100.0))  # above the native rate: every frame once
    assert [f.index for f in every] == list(range(75))
    assert expected_samples(probe(path), 100.0) == 75


def test_expected_samples_is_ceil_within_one() -> None:
    for n, native, fps in ((100, 10, 2), (299, 29.97, 2), (301, 30, 2), (17, 25, 0.5)):
        got = expected_samples(VideoInfo(fps=native, frame_count=n, width=1, height=1), fps)
        assert abs(got - math.ceil(n / native * fps)) <= 1, (n, native, fps, got)
    assert expected_samples(VideoInfo(fps=0, frame_count=0, width=1, height=1), 2) == 0


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "holiday.mp4"
    bad.write_bytes(b"not a video at all\n" * 10)
    with pytest.raises(ValueError, match=r"holiday\.mp4: OpenCV cannot open"):
        list(read_frames(bad))
    good = tmp_path / "ok.avi"
    _write(good, frames=5, fps=5.0)
    for fps in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="--fps"):
            list(read_frames(good, fps=fps))


def test_names() -> None:
    assert is_video("a/B.MP4") and is_video("x.webm") and is_video("y.mkv")
    assert not is_video("face.jpg") and not is_video("mp4")
    assert frame_key("clips/a.mp4", 12) == "clips/a.mp4#frame=12"


def test_batch_prediction_sources_read_a_videos_frames(tmp_path: Path) -> None:
    """jobs.predict's sources: a video in the input folder is one item of its own whose
    rows are its sampled frames (key, frame index, timestamp); photos keep None there; a
    broken video is one error row naming it."""
    from ageray.inference.sources import list_items, read_item

    (tmp_path / "clips").mkdir()
    _write(tmp_path / "clips" / "walk.avi", frames=30, fps=10.0)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "broken.mp4").write_bytes(b"nope")
    items = list_items(str(tmp_path), fps=2.0)
    kinds = sorted((i["kind"], i.get("url", "").rsplit("/", 1)[-1]) for i in items)
    assert kinds == [("files", ""), ("video", "broken.mp4"), ("video", "walk.avi")]
    rows = [r for item in items for r in read_item(item)]
    photo = [r for r in rows if r["key"] == "photo.jpg"]
    assert photo[0]["frame_index"] is None and photo[0]["timestamp_s"] is None
    frames = [r for r in rows if r["key"].startswith("clips/walk.avi#")]
    assert [r["key"] for r in frames] == [
        f"clips/walk.avi#frame={i}" for i in (0, 5, 10, 15, 20, 25)
    ]
    assert [r["timestamp_s"] for r in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert all(r["image"][:2] == b"\xff\xd8" and r["error"] is None for r in frames)
    (bad,) = [r for r in rows if r["key"] == "broken.mp4"]
    assert (
        bad["image"] is None
        and bad["error"].startswith("bad_video: ")
        and "broken.mp4" in bad["error"]
    )
    single = list_items(str(tmp_path / "clips" / "walk.avi"), fps=1.0)
    assert single == [
        {
            "kind": "video",
            "url": str(tmp_path / "clips" / "walk.avi"),
            "root": str(tmp_path / "clips"),
            "fps": 1.0,
        }
    ]
    with pytest.raises(ValueError, match="--fps"):
        list_items(str(tmp_path), fps=0)
