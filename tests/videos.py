"""Test videos written by the tests themselves (never committed): real faces pasted on a
plain background, each drifting a few pixels a frame, through OpenCV's own writer."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: what this OpenCV writes AND reads back (checked by the tests): MPEG-4 Part 2 in .mp4,
#: Motion JPEG in .avi
CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


def face_arrays(images: Sequence[bytes], *, size: int = 160) -> list[np.ndarray]:
    """JPEG/PNG bytes -> RGB arrays of ``size`` x ``size``."""
    from PIL import Image

    return [
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((size, size))) for b in images
    ]


def face_positions(
    n: int, frame: int, *, width: int, height: int, size: int, step: float = 1.5
) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` faces in ``frame``: spread along the width, each moving on
    its own small circle (``step`` px a frame, radius 12 px): they move, but far less than
    a box between two sampled frames, so IoU matching must keep each face's id."""
    gap = width / n
    out = []
    for i in range(n):
        cx = gap * (i + 0.5) - size / 2
        cy = (height - size) / 2
        angle = frame * step / 12.0 + i
        out.append((round(cx + 12 * math.cos(angle)), round(cy + 12 * math.sin(angle))))
    return out


def write_face_video(
    path: Path,
    faces: Sequence[np.ndarray],
    *,
    seconds: float = 10.0,
    fps: float = 10.0,
    width: int = 640,
    height: int = 320,
) -> int:
    """Write ``faces`` (RGB arrays of one size) moving on a grey background to ``path``
    (.mp4: mp4v, .avi: MJPG); returns the number of frames written."""
    import cv2

    size = faces[0].shape[0]
    fourcc = cv2.VideoWriter_fourcc(*CODECS[path.suffix.lower()])
    writer = cv2.VideoWriter(str(path), fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"this OpenCV cannot write {path.suffix} ({CODECS[path.suffix]})")
    frames = round(seconds * fps)
    try:
        for f in range(frames):
            canvas = np.full((height, width, 3), 128, np.uint8)
            for face, (x, y) in zip(
                faces, face_positions(len(faces), f, width=width, height=height, size=size)
            ):
                canvas[y : y + size, x : x + size] = face
            writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return frames
