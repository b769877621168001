"""Video files for batch prediction: which files are videos, which frames to sample, and the
sampled frames as images for the one inference path.

    for frame in read_frames("clip.mp4", fps=2.0):
        frame.index, frame.timestamp_s, frame.image   # JPEG bytes of that frame

Why sample by time and not by every n-th frame: a video's native rate varies (25, 29.97, 30,
60 fps, and variable-rate phone clips), while a person asks for "two frames a second". The
k-th sample is the frame nearest to ``k / fps`` seconds (the first whose time is at or after
``k / fps`` less half a frame); the frame's own time
(index / native rate, or the container's position where the rate is unknown) is its
``timestamp_s``. A clip of duration D seconds therefore gives ``ceil(D * fps)`` samples
(every frame when ``fps`` is at or above the native rate).

Why read sequentially (``grab`` every frame, ``retrieve`` only the sampled ones) and not seek:
OpenCV's seeking lands on the nearest key frame in many containers (mp4v, webm), so a seek
can return a frame other than the one asked for; ``grab`` demuxes without the colour
conversion, which is most of the cost of a frame that is skipped.

Why JPEG bytes: the inference path takes image bytes (it decodes, detects every face and
aligns them exactly as for a photo), so a frame is one more image to it and Ray Data ships it
as a small binary column. A frame is already lossy; re-encoding at quality 95 changes the
answers far less than the sampling itself does.

OpenCV reads local files only: a video under ``s3://`` is copied to a temporary file first
(:func:`local_copy`). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_FPS",
    "VIDEO_EXTENSIONS",
    "Frame",
    "VideoInfo",
    "expected_samples",
    "frame_key",
    "is_video",
    "local_copy",
    "probe",
    "read_frames",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: two frames a second: a face rarely changes within half a second, and a long video stays
#: cheap (a minute is 120 samples)
DEFAULT_FPS = 2.0
JPEG_QUALITY = 95


def is_video(name: str) -> bool:
    return str(name).lower().endswith(VIDEO_EXTENSIONS)


def frame_key(video_key: str, index: int) -> str:
    """The key of a sampled frame's rows: ``clip.mp4#frame=12`` (a media-fragment-like
    suffix, so sorting by key keeps a video's frames together)."""
    return f"{video_key}#frame={int(index)}"


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (``frame_count`` and ``fps`` may be 0 when it
    does not know; then ``duration_s`` is 0 too)."""

    fps: float
    frame_count: int
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps if self.fps > 0 else 0.0


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index in the video, its time and the frame as JPEG bytes."""

    index: int
    timestamp_s: float
    image: bytes


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"--fps {fps}: frames per second to sample must be > 0 (e.g. 2)")
    return fps


def expected_samples(info: VideoInfo, fps: float) -> int:
    """How many frames :func:`read_frames` samples from a video of this length: the sample
    times ``k / fps`` up to the last frame's time plus half a frame, which is
    ``ceil(duration * fps)`` or one less; at most every frame. 0 when the container does not
    say its length."""
    fps = _check_fps(fps)
    if info.frame_count <= 0 or info.fps <= 0:
        return 0
    last = (info.frame_count - 0.5) / info.fps
    return min(info.frame_count, math.floor(last * fps + 1e-9) + 1)


def _open(path: str | os.PathLike[str]) -> Any:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise ValueError(
            f"{path}: OpenCV cannot open this video (not a video, or a codec this OpenCV "
            "build lacks); convert it to .mp4 (mp4v/H.264) or .avi (MJPG)"
        )
    return cap


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """The container's frame rate, frame count and size (a cheap read of the header)."""
    import cv2

    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        return VideoInfo(
            fps=fps if math.isfinite(fps) and fps > 0 else 0.0,
            frame_count=max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
        )
    finally:
        cap.release()


def read_frames(
    path: str | os.PathLike[str], *, fps: float = DEFAULT_FPS, quality: int = JPEG_QUALITY
) -> Iterator[Frame]:
    """The sampled frames of a local video, in order (module docstring: the k-th sample is
    the frame nearest to ``k / fps`` seconds). Raises ValueError naming the file when
    OpenCV cannot open it; a file that ends early yields the frames it has."""
    import cv2

    fps = _check_fps(fps)
    cap = _open(path)
    try:
        native = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        native = native if math.isfinite(native) and native > 0 else 0.0
        half = 0.5 / native if native else 1e-3
        k, index = 0, -1
        while cap.grab():
            index += 1
            t = index / native if native else float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0
            if t < k / fps - half:  # before the next sample's time by more than half a frame
                continue
            ok, bgr = cap.retrieve()
            if not ok:
                continue
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            if not ok:
                continue
            yield Frame(index=index, timestamp_s=round(t, 6), image=buf.tobytes())
            k = max(k + 1, math.floor(t * fps + 1e-9) + 1)
    finally:
        cap.release()


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local path to the video at ``url``: the file itself, or (``s3://``) a temporary copy
    removed afterwards (OpenCV opens local paths only)."""
    from ageray.data import storage

    if not storage.is_s3(url):
        yield Path(url)
        return
    suffix = os.path.splitext(storage.basename(url))[1]
    fd, tmp = tempfile.mkstemp(prefix="ageray-video-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh, storage.open_read(url) as src:
            while chunk := src.read(1 << 20):
                fh.write(chunk)
        yield Path(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
