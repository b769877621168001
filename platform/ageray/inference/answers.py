"""Named model outputs -> answer rows: the one shape every path answers in.

Why one function: Serve's JSON, the pyfunc model's DataFrame and the Parquet file of batch
prediction are three renderings of the same row, computed here from the outputs of
:class:`~ageray.inference.graph.RoutedGraph` (or the exported graph, which has the
same output names). A row is flat, so it is also a Parquet record:

====================  ==================================================================
field                 meaning
====================  ==================================================================
``key``               the image's name (file path, tar member key, request field)
``source``            where it came from (a file, tar or shard URL); None for requests
``age``               the routed answer, years
``age_low/high``      a 90% interval: the 5th and 95th percentiles of the routed age
                      distribution (each age's mass spread over [k - 0.5, k + 0.5])
``head``              ``vanilla`` or ``balanced``: the head that answered (weight >= 0.5)
``weight_balanced``   the balanced head's weight (0 or 1 for hard rules, in between for a
                      soft learned router)
``rule``              the routing rule that answered (``smaller`` = GLAE eq. 11, ...)
``age_<head>``        each head's flip-averaged answer (None when the model lacks the head)
``kl_<head>``         each head's KL(p || p_flip), the flip consistency AR compares
``gender``/``race``   index of the most likely class (multi-task models; else None),
``*_label``           its name (``ageray.data.labels``: male/female; white, black, asian,
                      indian, other) and
``*_probs``           the class probabilities, in the order of those names
``face_found/box``    detection only: whether a face was detected and its box [x0, y0, x1,
                      y1] in the original image's pixels
``face_index``        the face's place in its image, largest first (0..n-1; None: no
                      detection ran)
``face_landmarks``    10 floats: x, y of the left eye, right eye, nose, left and right
                      mouth corner, original pixels
``face_score``        the detector's confidence (MTCNN's probability; 1.0 from the Haar
                      fallback, which has none)
``quality``           None, or a note when the input cannot hold a usable face (a 1x1
                      image still gets an age, but not one to trust)
``distribution``      the routed distribution over ages 0..K-1 (on request)
``error``             why the image could not be used (then every answer field is None);
                      ``no_face: ...`` for a photo without a face in ``faces=all``
====================  ==================================================================

One row per image, or with ``faces=all`` one row per face (``face_index`` 0..n-1, the same
``key``), and one ``no_face`` row for a photo without a face: never an age of the background.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ageray.data.labels import GENDERS, RACES

__all__ = [
    "HEADS",
    "INTERVAL_LEVEL",
    "ROW_FIELDS",
    "VIDEO_FIELDS",
    "ImageAnswer",
    "answer_json",
    "answer_rows",
    "arrow_schema",
    "error_row",
    "face_json",
    "flat_json",
    "image_json",
    "no_face_row",
    "quantile_ages",
    "rows_to_table",
]

#: batch prediction's video columns (``ageray.inference.video``, ``.tracking``): in the
#: Parquet schema only, None for photos
VIDEO_FIELDS = ("frame_index", "timestamp_s", "track_id", "age_smoothed")
HEADS = ("vanilla", "balanced")
INTERVAL_LEVEL = 0.9
ROW_FIELDS = (
    "key",
    "source",
    "age",
    "age_low",
    "age_high",
    "head",
    "weight_balanced",
    "rule",
    "age_vanilla",
    "kl_vanilla",
    "age_balanced",
    "kl_balanced",
    "gender",
    "gender_label",
    "gender_probs",
    "race",
    "race_label",
    "race_probs",
    "face_found",
    "face_box",
    "face_index",
    "face_landmarks",
    "face_score",
    "quality",
    "error",
)


def quantile_ages(probs: np.ndarray, q: float) -> np.ndarray:
    """Per row of ``probs`` (B, K) over ages 0..K-1, the age below which a share ``q`` of the
    mass lies, each age k's mass spread uniformly over [k - 0.5, k + 0.5] (so a sharp
    distribution gives a narrow, not a zero-width, interval). Clipped to [0, K - 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"quantile_ages expects (B, K) probabilities, got {p.shape}")
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    cdf = np.cumsum(p, axis=1)
    k = np.minimum((cdf < q).sum(1), p.shape[1] - 1)
    rows = np.arange(p.shape[0])
    before = np.where(k > 0, cdf[rows, np.maximum(k - 1, 0)], 0.0)
    mass = p[rows, k]
    frac = np.where(mass > 0, (q - before) / np.where(mass > 0, mass, 1.0), 0.5)
    return np.clip(k - 0.5 + np.clip(frac, 0.0, 1.0), 0.0, p.shape[1] - 1.0)


def _floats(a: np.ndarray | None, n: int) -> list[float | None]:
    if a is None:
        return [None] * n
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def _groups(
    probs: np.ndarray | None, n: int, names: Sequence[str]
) -> tuple[list[Any], list[Any], list[Any]]:
    """Multi-task answers: (class index, its name, probabilities) per row, or Nones. A model
    with more classes than ``names`` names the others by their index."""
    if probs is None:
        return [None] * n, [None] * n, [None] * n
    p = np.asarray(probs, dtype=np.float64)
    index = [int(i) for i in p.argmax(1)]
    labels = [names[i] if i < len(names) else str(i) for i in index]
    return index, labels, [row.tolist() for row in p]


def answer_rows(
    outputs: Mapping[str, np.ndarray],
    *,
    rule: str | None,
    keys: Sequence[str] | None = None,
    sources: Sequence[str | None] | None = None,
    faces: Sequence[Mapping[str, Any] | None] | None = None,
    qualities: Sequence[str | None] | None = None,
    distribution: bool = False,
    level: float = INTERVAL_LEVEL,
) -> list[dict[str, Any]]:
    """One row per image (module docstring) from a backend's named outputs (numpy).

    ``distribution`` adds the routed distribution (a float32 array per row). Numbers become
    Python floats of the float32 outputs, exactly: the same image gives bit-identical rows
    through every path that ran the same forward.
    """
    age = np.asarray(outputs["age"])
    n = int(age.shape[0])
    probs = outputs.get("probs")
    low = high = None
    if probs is not None:
        tail = (1.0 - level) / 2.0
        low, high = quantile_ages(probs, tail), quantile_ages(probs, 1.0 - tail)
    head = np.asarray(outputs["head"]).reshape(-1)
    cols: dict[str, list[Any]] = {
        "age": _floats(age, n),
        "age_low": _floats(low, n),
        "age_high": _floats(high, n),
        "head": [HEADS[int(h)] for h in head],
        "weight_balanced": _floats(outputs.get("weight"), n),
        "rule": [rule if "kl_balanced" in outputs else None] * n,
    }
    for h in HEADS:
        cols[f"age_{h}"] = _floats(outputs.get(f"age_{h}"), n)
        cols[f"kl_{h}"] = _floats(outputs.get(f"kl_{h}"), n)
    for trait, names in (("gender", GENDERS), ("race", RACES)):
        index, labels, probs_ = _groups(outputs.get(trait), n, names)
        cols[trait], cols[f"{trait}_label"], cols[f"{trait}_probs"] = index, labels, probs_
    rows: list[dict[str, Any]] = []
    for i in range(n):
        face = faces[i] if faces is not None else None
        row = {
            "key": keys[i] if keys is not None else None,
            "source": sources[i] if sources is not None else None,
            **{k: v[i] for k, v in cols.items()},
            **face_columns(face),
            "quality": qualities[i] if qualities is not None else None,
            "error": None,
        }
        if distribution and probs is not None:
            row["distribution"] = np.asarray(probs[i], dtype=np.float32)
        rows.append(row)
    return rows


def face_columns(face: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``face_*`` columns of a face dict (``ageray.inference.inputs.face_fields``)."""
    if face is None:
        return dict.fromkeys(
            ("face_found", "face_box", "face_index", "face_landmarks", "face_score")
        )
    points = face.get("landmarks")
    return {
        "face_found": bool(face.get("found")),
        "face_box": face.get("box"),
        "face_index": face.get("index"),
        "face_landmarks": None if points is None else [float(v) for p in points for v in p],
        "face_score": face.get("score"),
    }


def error_row(
    key: str, error: str, *, source: str | None = None, quality: str | None = None
) -> dict[str, Any]:
    """The row of an image that could not be used: every answer field None, ``error`` says
    why (a row, never a crash)."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(key=key, source=source, error=error, quality=quality)
    return row


def no_face_row(
    key: str, reason: str, *, source: str | None = None, quality: str | None = None
) -> dict[str, Any]:
    """A photo without a usable face in ``faces=all``: one row, no answer, ``error``
    ``no_face: <reason>`` (the detector's limits, or the quality note)."""
    row = error_row(key, f"no_face: {reason}", source=source, quality=quality)
    row["face_found"] = False
    return row


def arrow_schema(distribution: bool = False) -> Any:
    """The Parquet schema of answer rows (every field nullable: error rows have no answer)."""
    import pyarrow as pa

    f64, probs = pa.float64(), pa.list_(pa.float64())
    types = {
        "key": pa.string(),
        "source": pa.string(),
        "head": pa.string(),
        "rule": pa.string(),
        "gender": pa.int64(),
        "race": pa.int64(),
        "gender_label": pa.string(),
        "race_label": pa.string(),
        "gender_probs": probs,
        "race_probs": probs,
        "face_found": pa.bool_(),
        "face_box": probs,
        "face_index": pa.int64(),
        "face_landmarks": probs,
        "quality": pa.string(),
        "error": pa.string(),
    }
    fields = [pa.field(name, types.get(name, f64)) for name in ROW_FIELDS]
    video = {"frame_index": pa.int64(), "track_id": pa.int64()}
    fields[-1:-1] = [pa.field(name, video.get(name, f64)) for name in VIDEO_FIELDS]
    if distribution:
        fields.insert(len(fields) - 1, pa.field("distribution", pa.list_(pa.float32())))
    return pa.schema(fields)


def rows_to_table(rows: Sequence[Mapping[str, Any]], *, distribution: bool = False) -> Any:
    """Answer rows -> a ``pyarrow.Table`` with :func:`arrow_schema` (fixed columns, so every
    batch of a Ray Data job and every file agree)."""
    import pyarrow as pa

    schema = arrow_schema(distribution)
    data: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        for name in schema.names:
            v = row.get(name)
            if name == "distribution" and v is not None:
                v = np.asarray(v, dtype=np.float32)
            data[name].append(v)
    return pa.Table.from_pydict(data, schema=schema)


# --------------------------------------------------------------------------- JSON
def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def answer_json(row: Mapping[str, Any], *, distribution: bool = False) -> dict[str, Any]:
    """One answer row as the JSON Serve, the page and ``ageray predict --json`` show:
    ``{"age", "head", "heads": {name: {"age", "kl"}}, "interval": {"level", "low", "high"},
    "rule"}`` plus ``gender`` / ``race`` (``{"label", "index", "probs"}``) for multi-task
    models and ``distribution`` (probabilities over ages 0..K-1) on request."""
    out: dict[str, Any] = {
        "age": float(row["age"]),
        "head": row["head"],
        "heads": {
            name: {"age": _num(row.get(f"age_{name}")), "kl": _num(row.get(f"kl_{name}"))}
            for name in HEADS
            if row.get(f"age_{name}") is not None
        },
        "interval": None
        if row.get("age_low") is None
        else {
            "level": INTERVAL_LEVEL,
            "low": float(row["age_low"]),
            "high": float(row["age_high"]),
        },
        "rule": row.get("rule"),
    }
    for group in ("gender", "race"):
        if row.get(group) is not None:
            out[group] = {
                "label": row.get(f"{group}_label"),
                "index": int(row[group]),
                "probs": list(row[f"{group}_probs"]),
            }
    if distribution:
        probs = row.get("distribution")
        out["distribution"] = None if probs is None else [float(p) for p in np.asarray(probs)]
    return out


def face_json(row: Mapping[str, Any], *, distribution: bool = False) -> dict[str, Any]:
    """One face's answer in ``faces=all``: where it is (``index``, ``box``, ``landmarks`` as
    five [x, y] pairs, the detector's ``score``), then :func:`answer_json`."""
    pts = row.get("face_landmarks")
    return {
        "index": row.get("face_index"),
        "box": row.get("face_box"),
        "landmarks": None if pts is None else [[pts[i], pts[i + 1]] for i in range(0, len(pts), 2)],
        "score": _num(row.get("face_score")),
        **answer_json(row, distribution=distribution),
    }


def image_json(
    rows: Sequence[Mapping[str, Any]],
    *,
    width: int | None,
    height: int | None,
    reason: str | None = None,
    distribution: bool = False,
) -> dict[str, Any]:
    """One photo's answer in ``faces=all``: ``{"faces": [face_json...], "reason", "image":
    {"width", "height"}}``; when ``faces`` is empty ``reason`` says why: ``reason`` as
    given when it names the detector's limits (``no face with score >= S and size >= M px
    found``), else ``no face found: <reason>`` (the image's quality note)."""
    faces = [face_json(r, distribution=distribution) for r in rows if r.get("error") is None]
    why = None
    if not faces:
        reason = reason or "no face found"
        why = reason if reason.startswith("no face") else f"no face found: {reason}"
    return {
        "faces": faces,
        "reason": why,
        "image": {"width": width, "height": height},
    }


@dataclass
class ImageAnswer:
    """One image's answer rows: one per face (``faces=all``; none when the photo has no
    face, then ``reason`` says why), or exactly one (``faces=largest``). ``error``: the
    image could not be used (``rows`` then holds its error row). ``faces`` are the face
    dicts the rows were made from (``ageray.inference.inputs.face_fields``)."""

    key: str
    mode: str
    rows: list[dict[str, Any]]
    faces: list[dict[str, Any] | None] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    reason: str | None = None
    quality: str | None = None
    error: str | None = None

    def to_json(self, *, distribution: bool = False) -> dict[str, Any]:
        """Serve's shape without ``model``/``timing_ms``: ``faces=all`` gives
        :func:`image_json`; ``faces=largest`` the flat :func:`answer_json` with ``face``
        (when detection ran) and ``quality`` (when set)."""
        if self.mode == "all":
            return image_json(
                self.rows,
                width=self.width,
                height=self.height,
                reason=self.reason,
                distribution=distribution,
            )
        return flat_json(
            self.rows[0],
            face=self.faces[0] if self.faces else None,
            quality=self.quality,
            distribution=distribution,
        )


def flat_json(
    row: Mapping[str, Any],
    *,
    face: Mapping[str, Any] | None = None,
    quality: str | None = None,
    distribution: bool = False,
) -> dict[str, Any]:
    """The single answer of ``faces=largest``: :func:`answer_json`, ``face`` when detection
    ran, ``quality`` when the image cannot hold a usable face."""
    out = answer_json(row, distribution=distribution)
    if face is not None:
        out["face"] = dict(face)
    if quality is not None:
        out["quality"] = quality
    return out
