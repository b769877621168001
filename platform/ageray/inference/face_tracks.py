"""Faces followed across a video's sampled frames: one id per person and a smoothed age.

    tracker = FaceTracker(iou_threshold=0.3, max_missed=3)
    for boxes, ages in frames:                       # in frame order
        ids, smoothed = tracker.update(boxes, ages)  # one id and smoothed age per box

Matching: each frame's boxes are matched to the live tracks by IoU of the box with the
track's last box, greedily (the pair with the highest IoU first, then the next among those
left), and only pairs with IoU >= ``iou_threshold`` match. Why greedy and not Hungarian:
faces in a photo rarely overlap, so the two agree on every frame where there is anything to
decide, and greedy needs no solver and is easy to reason about (SORT's Hungarian matters
for crowded pedestrians, not faces). A box left unmatched starts a new track; a track
unmatched for more than ``max_missed`` consecutive sampled frames ends (a person who left and
came back is a new track: with no face embedding we cannot tell who it is).

Smoothing: ``age_smoothed`` is the running median of the track's ages so far (every frame up
to and including this one). Why a median of everything and not an EMA: a person's age does
not change during a video, so there is no drift to follow and no rate to tune (an EMA's
factor trades lag for noise and means a different time at every ``--fps``); the median of all
observations is the estimate that single bad frames (motion blur, a half-turned head, a
blink) cannot drag, and it is causal, so a row can be written as soon as its frame is seen.

:func:`track_rows` applies it to the answer rows of one video (``frame_index``, ``face_box``,
``age``), filling ``track_id`` and ``age_smoothed``; :class:`VideoTracks` is how batch
prediction's driver uses it: Ray Data answers a video's frames in any order and on any actor,
so the driver sets each video's rows aside as their tables arrive (a few small rows a frame,
no images) and tracks each video whole at the end. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_IOU",
    "DEFAULT_MAX_MISSED",
    "FaceTracker",
    "Track",
    "VideoTracks",
    "iou",
    "match_greedy",
    "track_rows",
]

DEFAULT_IOU = 0.3
#: at 2 sampled frames a second, a face may vanish for 1.5 s (a turn, a hand, a missed
#: detection) and keep its id
DEFAULT_MAX_MISSED = 3

Box = Sequence[float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (0 for empty boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def match_greedy(
    tracks: Sequence[Box], boxes: Sequence[Box], *, threshold: float = DEFAULT_IOU
) -> dict[int, int]:
    """``{box index: track index}``: the highest-IoU pair first, each track and box used
    once, only pairs with IoU >= ``threshold``."""
    pairs = sorted(
        ((iou(t, b), ti, bi) for ti, t in enumerate(tracks) for bi, b in enumerate(boxes)),
        key=lambda p: (-p[0], p[1], p[2]),
    )
    used_t: set[int] = set()
    out: dict[int, int] = {}
    for score, ti, bi in pairs:
        if score < threshold:
            break
        if ti in used_t or bi in out:
            continue
        used_t.add(ti)
        out[bi] = ti
    return out


@dataclass
class Track:
    """A live track: its id, last box, consecutive missed frames and its ages (sorted)."""

    id: int
    box: list[float]
    missed: int = 0
    ages: list[float] = field(default_factory=list)

    def add_age(self, age: float | None) -> float | None:
        """Record ``age`` (None: this frame had no answer) and return the running median."""
        if age is not None:
            bisect.insort(self.ages, float(age))
        n = len(self.ages)
        if n == 0:
            return None
        mid = n // 2
        return self.ages[mid] if n % 2 else 0.5 * (self.ages[mid - 1] + self.ages[mid])


class FaceTracker:
    """IoU tracker over sampled frames (module docstring). Ids count from 0 per tracker, so
    one tracker per video."""

    def __init__(
        self, *, iou_threshold: float = DEFAULT_IOU, max_missed: int = DEFAULT_MAX_MISSED
    ) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold={iou_threshold}: must be in (0, 1]")
        if max_missed < 0:
            raise ValueError(f"max_missed={max_missed}: must be >= 0 frames")
        self.iou_threshold = float(iou_threshold)
        self.max_missed = int(max_missed)
        self.tracks: list[Track] = []
        self.next_id = 0

    def update(
        self, boxes: Sequence[Box], ages: Sequence[float | None] | None = None
    ) -> tuple[list[int], list[float | None]]:
        """One sampled frame's face boxes (and ages) -> (track id, smoothed age) per box, in
        the order given. A frame with no face is ``update([])``: every track misses it."""
        ages = list(ages) if ages is not None else [None] * len(boxes)
        if len(ages) != len(boxes):
            raise ValueError(f"update: {len(boxes)} boxes but {len(ages)} ages")
        matched = match_greedy([t.box for t in self.tracks], boxes, threshold=self.iou_threshold)
        hit: set[int] = set()
        ids: list[int] = []
        smoothed: list[float | None] = []
        for bi, box in enumerate(boxes):
            if bi in matched:
                track = self.tracks[matched[bi]]
                track.box, track.missed = [float(v) for v in box], 0
            else:
                track = Track(id=self.next_id, box=[float(v) for v in box])
                self.next_id += 1
                self.tracks.append(track)
            hit.add(id(track))
            ids.append(track.id)
            smoothed.append(track.add_age(ages[bi]))
        for track in self.tracks:
            if id(track) not in hit:
                track.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        return ids, smoothed


def track_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    iou_threshold: float = DEFAULT_IOU,
    max_missed: int = DEFAULT_MAX_MISSED,
) -> list[dict[str, Any]]:
    """The answer rows of ONE video (any order) -> the same rows ordered by frame and face,
    with ``track_id`` and ``age_smoothed`` set. Rows without a box (a frame with no face, an
    unreadable frame) keep ``track_id`` None and still count as a frame every track missed."""
    frames: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        frames.setdefault(int(row["frame_index"]), []).append(dict(row))
    tracker = FaceTracker(iou_threshold=iou_threshold, max_missed=max_missed)
    out: list[dict[str, Any]] = []
    for index in sorted(frames):
        group = sorted(frames[index], key=lambda r: r.get("face_index") or 0)
        faced = [r for r in group if r.get("face_box") is not None and r.get("error") is None]
        ids, smoothed = tracker.update(
            [r["face_box"] for r in faced], [r.get("age") for r in faced]
        )
        for r, tid, age in zip(faced, ids, smoothed):
            r["track_id"], r["age_smoothed"] = tid, age
        for r in group:
            r.setdefault("track_id", None)
            r.setdefault("age_smoothed", None)
        out.extend(group)
    return out


class VideoTracks:
    """The rows of video frames in answer tables, held per video until :meth:`tables`
    tracks each (module docstring). Photo rows (``frame_index`` None) pass straight on."""

    def __init__(
        self, *, iou_threshold: float = DEFAULT_IOU, max_missed: int = DEFAULT_MAX_MISSED
    ) -> None:
        FaceTracker(iou_threshold=iou_threshold, max_missed=max_missed)  # checks the values
        self.iou_threshold, self.max_missed = iou_threshold, max_missed
        self._videos: dict[str, list[dict[str, Any]]] = {}

    @staticmethod
    def images_in(table: Any) -> int:
        """How many images (photos and sampled frames) a table answers: its distinct keys
        (a photo's faces share its key)."""
        return len(set(table.column("key").to_pylist()))

    def split(self, table: Any) -> Any:
        """``table`` without its video rows, which are kept for :meth:`tables`."""
        import pyarrow.compute as pc

        frames = table.column("frame_index")
        if frames.null_count == table.num_rows:
            return table
        photos = pc.is_null(frames)
        for row in table.filter(pc.invert(photos)).to_pylist():
            self._videos.setdefault(str(row["source"]), []).append(row)
        return table.filter(photos)

    @property
    def videos(self) -> int:
        return len(self._videos)

    def tables(self, *, distribution: bool = False) -> Iterable[Any]:
        """Each video's rows, tracked, as an answer table (videos in name order)."""
        from .answers import rows_to_table

        for source in sorted(self._videos):
            rows = track_rows(
                self._videos.pop(source),
                iou_threshold=self.iou_threshold,
                max_missed=self.max_missed,
            )
            yield rows_to_table(rows, distribution=distribution)
