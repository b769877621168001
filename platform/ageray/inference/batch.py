"""Batch prediction's parts that have rules in them, without Ray: the batch function that Ray
Data's actor pool runs, the Parquet writer, and the summary.

``jobs.predict`` wires them: work items (:func:`ageray.inference.sources.list_items`) ->
``flat_map(read_item)`` (read tasks: bytes through the storage layer) ->
``map_batches(BatchWorker, concurrency=actors)`` (each actor loads the model once and runs
the one inference path, :class:`ageray.inference.ImagePredictor`, on every batch) -> the
driver streams the answer tables into one Parquet file (local, or ``s3://`` through
:func:`ageray.data.storage.atomic_write`).

Why the actor runs decode and forward together: on CPUs decoding a face crop costs a few
percent of its forward, so shipping decoded tensors between processes would cost more than it
saves; one actor per core with one torch thread each keeps every core on the model
(``benchmarks/predict_throughput.py`` compares with the bare batched forward).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BatchWorker",
    "ParquetSink",
    "PredictSummary",
    "carry_video_columns",
    "cpu_count",
    "describe_items",
    "face_mode",
    "read_parquet",
]


class BatchWorker:
    """The callable class of ``map_batches``: loads the model once per actor, then turns
    each batch (a ``pyarrow.Table`` with ``key``, ``source``, ``image``, ``error``) into a
    table of answer rows (``ageray.inference.answers.arrow_schema``). An image that cannot
    be used is a row with ``error`` set, never an exception."""

    def __init__(
        self,
        model: str | Mapping[str, bytes] | Any,
        *,
        device: str = "cpu",
        backend: str = "torch",
        align: bool | str = "auto",
        distribution: bool = False,
        threads: int | None = 1,
        rule: str | None = None,
        faces: str = "largest",
    ) -> None:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if type(model).__name__ == "ObjectRef":  # jobs.predict ships the files once via Ray
            import ray

            model = ray.get(model)
        from ageray.inference import load_predictor

        self.predictor = load_predictor(
            model, device=device, backend=backend, align=align, threads=threads
        )
        self.distribution = distribution
        self.rule = rule
        self.faces = faces

    def __call__(self, batch: Any) -> Any:
        from ageray.inference import rows_to_table

        cols = batch.to_pydict() if hasattr(batch, "to_pydict") else dict(batch)
        rows: list[dict[str, Any]] = []
        for idx, frames in split_frames(cols):
            # a video's frames always answer every face: the tracker follows them all
            faces = "all" if frames else self.faces
            rows += self.predictor.predict(
                [cols["image"][i] for i in idx],
                keys=[str(cols["key"][i]) for i in idx],
                sources=[cols["source"][i] for i in idx],
                errors=[cols["error"][i] for i in idx],
                rule=self.rule,
                distribution=self.distribution,
                batch_size=max(1, len(idx)),
                faces=faces,
            )
        carry_video_columns(cols, rows)
        return rows_to_table(rows, distribution=self.distribution)


def split_frames(cols: Mapping[str, Any]) -> list[tuple[list[int], bool]]:
    """A read batch's rows as (indices, are video frames): photos first, then frames (rows
    with a ``frame_index``); groups that would be empty are left out."""
    n = len(cols["key"])
    marks = cols.get("frame_index") or [None] * n
    photos = [i for i in range(n) if marks[i] is None]
    frames = [i for i in range(n) if marks[i] is not None]
    return [(idx, flag) for idx, flag in ((photos, False), (frames, True)) if idx]


def carry_video_columns(cols: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
    """A sampled video frame's ``frame_index`` and ``timestamp_s`` (set by
    ``sources.read_item``) onto its answer rows, which share its key (one row per face)."""
    if "frame_index" not in cols:
        return
    frames = {
        str(k): (f, t)
        for k, f, t in zip(cols["key"], cols["frame_index"], cols["timestamp_s"])
        if f is not None
    }
    for row in rows if frames else ():
        hit = frames.get(str(row["key"]))
        if hit is not None:
            row["frame_index"], row["timestamp_s"] = int(hit[0]), float(hit[1])


def face_mode(faces: str, items: Iterable[Mapping[str, Any]]) -> str:
    """``jobs.predict --faces``: ``auto`` is ``all`` (a row per face) for image files and
    tar archives, which hold photos, and ``largest`` (a row per file) when every input is
    shards: a dataset's faces, answered exactly as evaluation reads them."""
    if faces != "auto":
        return faces
    return "largest" if all(i.get("kind") == "shard" for i in items) else "all"


@dataclass
class PredictSummary:
    """What a run of batch prediction did: rows, errors by reason, a few examples."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    heads: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None  # when the first answers arrived (start-up done)
    first_rows: int = 0
    last_at: float | None = None

    def add(self, table: Any) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at, self.first_rows = now, table.num_rows
        self.last_at = now
        self.rows += table.num_rows
        for err in table.column("error").to_pylist():
            if err is not None:
                self.errors[err.split(":", 1)[0]] += 1
                if len(self.examples) < 3:
                    self.examples.append(err)
        for head in table.column("head").to_pylist():
            if head is not None:
                self.heads[head] += 1

    @property
    def answered(self) -> int:
        return self.rows - sum(self.errors.values())

    def throughput(self) -> tuple[float, float]:
        """(images/s from the start, images/s from the first answers to the last: the
        steady state, without Ray's and the actors' start-up)."""
        if self.last_at is None or self.first_at is None:
            return 0.0, 0.0
        total = self.rows / max(self.last_at - self.started, 1e-9)
        span = self.last_at - self.first_at
        steady = (self.rows - self.first_rows) / span if span > 0 else total
        return total, steady

    def line(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        heads = ", ".join(f"{k} {v}" for k, v in sorted(self.heads.items())) or "-"
        return f"{self.rows} rows: {self.answered} answered (heads: {heads}); errors: {errs}"


class ParquetSink:
    """One Parquet file written batch by batch (bounded memory), visible at ``output`` only
    when complete: a local temporary file renamed, or uploaded whole to ``s3://``
    (:func:`ageray.data.storage.atomic_write`)."""

    def __init__(self, output: str, *, distribution: bool = False) -> None:
        from ageray.inference import arrow_schema

        if not str(output).endswith(".parquet"):
            raise ValueError(f"--output {output!r} must name a .parquet file (local or s3://)")
        self.output = str(output)
        self.schema = arrow_schema(distribution)
        self.summary = PredictSummary()
        self._stack = contextlib.ExitStack()
        self._writer: Any = None

    def __enter__(self) -> ParquetSink:
        import pyarrow.parquet as pq

        from ageray.data import storage

        if not storage.is_s3(self.output):
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
        fh = self._stack.enter_context(storage.atomic_write(self.output))
        self._writer = self._stack.enter_context(pq.ParquetWriter(fh, self.schema))
        return self

    def write(self, table: Any, *, count: bool = True) -> None:
        """Append ``table``; ``count=False`` for rows already counted when they arrived
        (a video's rows, held for tracking: the summary's rates are of arrival)."""
        table = table.cast(self.schema) if table.schema != self.schema else table
        self._writer.write_table(table)
        if count:
            self.summary.add(table)

    def write_all(self, tables: Iterable[Any]) -> PredictSummary:
        for table in tables:
            self.write(table)
        return self.summary

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)


def read_parquet(path: str) -> Any:
    """A Parquet output as a ``pyarrow.Table`` (local or ``s3://``, via the storage layer)."""
    import io

    import pyarrow.parquet as pq

    from ageray.data import storage

    return pq.read_table(io.BytesIO(storage.read_bytes(path)))


def describe_items(items: list[Mapping[str, Any]]) -> str:
    """``"2 tar archives, 1,024 files"`` for the console."""
    kinds: Counter = Counter()
    for item in items:
        kinds[item["kind"]] += len(item.get("urls", ())) or 1
    names = {"files": "image files", "tar": "tar archives", "shard": "shards", "video": "videos"}
    return ", ".join(f"{n:,} {names[k]}" for k, n in kinds.items())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
