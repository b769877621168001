"""Batch prediction with Ray Data: a folder, tar archive, shards or s3:// prefix of face images
(and videos) -> one Parquet file of answers.

    python -m jobs.predict --model models:/ageray@candidate --input photos/ --output ages.parquet
    python -m jobs.predict --model runs/demo/stage2/model --input faces.tar --output out.parquet
    python -m jobs.predict --model models:/ageray@prod --input clips/ --fps 2 --output v.parquet
    python -m jobs.predict --model models:/ageray@prod --input s3://bucket/shards/utk \\
        --split test --output s3://bucket/predictions/utk-test.parquet --actors 4
    ray job submit --working-dir . -- python -m jobs.predict --model ... --input s3://... ...

Every image goes through the one inference path (``ageray.inference.ImagePredictor``,
loaded by ``ageray.inference.load_predictor``):
alignment as the model was trained (``--align auto``), the JPEG draft decode, evaluation's
preprocessing, image + flip through both heads, the model's routing rule. Ray Data reads the
inputs in parallel tasks (files, tar members, shard samples, through ``ageray.data.storage``)
and runs the model in an actor pool (``--actors``, ``--batch-size``; ``--device cuda`` puts one
GPU under each actor). The driver writes one Parquet file (local or s3://), visible only when
complete. Columns (``ageray.inference.answers``): key, source, age, age_low, age_high (90%
interval), head, weight_balanced, rule, age_vanilla, kl_vanilla, age_balanced, kl_balanced,
gender, gender_probs, race, race_probs, face_found, face_box, face_index, face_landmarks,
face_score, quality, [distribution], error. A file that is not a usable image is a row with
``error`` set, never a crash.

Faces (``--faces``): ``all`` writes a row per detected face of each photo (its
``face_index``, largest first, its box and landmarks in the photo's pixels) and one
``no_face`` row for a photo without a face; ``largest`` a row per file, as the single-image
path always did. ``auto`` (the default) is ``all`` for image files and tar archives (photos)
and ``largest`` for shards (a dataset's faces, read as evaluation reads them).

Videos (.mp4 .avi .mov .mkv .webm, read with OpenCV: ``ageray.inference.video``): ``--fps``
frames a second are sampled, each goes through the same path as a photo (always with
``faces=all``: the tracker follows every face), and each row also
has ``frame_index``, ``timestamp_s``, ``track_id`` (a face followed across frames by IoU
matching: ``ageray.inference.face_tracks``) and ``age_smoothed`` (the track's running median);
these are None for photos. The progress bar counts images and frames done.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from ageray.inference.video import DEFAULT_FPS
from jobs._common import Timer, base_parser, load, setup_logging


def parse(argv: list[str] | None = None):
    p = base_parser("python -m jobs.predict", __doc__)
    p.add_argument("--model", required=True, help="model folder or MLflow URI (models:/...)")
    p.add_argument(
        "--input", required=True, help="image folder, .tar, shards folder, or s3:// prefix/file"
    )
    p.add_argument("--output", required=True, help="PATH.parquet or s3://bucket/key.parquet")
    p.add_argument("--split", action="append", help="shards only: split(s) to predict")
    p.add_argument("--actors", type=int, default=0, help="model actors (default: CPUs / cpus)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (= torch threads)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda: 1 GPU per actor)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument(
        "--align", default="auto", choices=["auto", "on", "off"], help="auto: as trained"
    )
    p.add_argument("--rule", help="routing rule (default: the model's own)")
    p.add_argument("--distribution", action="store_true", help="add the age distribution")
    p.add_argument(
        "--faces",
        default="auto",
        choices=["auto", "all", "largest"],
        help="all: a row per face; largest: a row per file; auto: all, largest for shards",
    )
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="video frames sampled a second")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _model_files(model: str, backend: str) -> dict[str, bytes]:
    """The model's files, read once on the driver by the one loader's fetch and shipped to
    every actor (actors on other nodes need neither the registry nor this node's disk). With
    the onnxruntime backend the export goes with them (the logged one when it matches, else
    made here once, not once per actor)."""
    from ageray.inference import fetch_model_files, with_export

    files = fetch_model_files(model)
    return (with_export(files) if backend == "onnxruntime" else files).files


def _write(ds: Any, args: Any, *, total: int | None) -> Any:
    """Stream the answer tables into the Parquet file; a video's rows are held until the end
    and written tracked (``VideoTracks``: Ray Data answers frames in any order). The bar
    counts images and sampled frames done. Returns the sink (its summary)."""
    from ageray.inference.batch import ParquetSink
    from ageray.inference.face_tracks import VideoTracks

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        desc = "[ageray] predict (images + frames)"
        bar = tqdm(total=total or None, unit="img", desc=desc, file=sys.stdout)
    tracks = VideoTracks()
    with ParquetSink(args.output, distribution=args.distribution) as sink:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if bar is not None:
                bar.update(tracks.images_in(table))
            sink.summary.add(table)  # counted as it arrives (rates), written below
            photos = tracks.split(table)
            if photos.num_rows:
                sink.write(photos, count=False)
        for table in tracks.tables(distribution=args.distribution):
            sink.write(table, count=False)
    if bar is not None:
        bar.close()
    return sink


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging()
    cfg = load(args)
    try:
        summary = run(args, cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.rows else 1


def run(args: Any, cfg: Any) -> Any:
    """The job; returns its :class:`ageray.inference.batch.PredictSummary`. Bad ``--input`` or
    ``--model`` raise FileNotFoundError / ValueError before Ray starts."""
    timer = Timer()

    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from ageray.inference.batch import BatchWorker, describe_items, face_mode
    from ageray.inference.sources import expected_images, list_items, read_item
    from ageray.tracking import Tracker
    from ageray.training.driver import init_ray

    if cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        Tracker(cfg)  # points MLflow at the configured server for models:/ URIs
    items = list_items(args.input, splits=args.split, fps=args.fps)
    files = _model_files(args.model, args.backend)
    init_ray(cfg)
    verbose = os.environ.get("AGERAY_VERBOSE", "") not in ("", "0", "false")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.target_max_block_size = 1024 * 1024  # ~100-200 faces a block: every actor gets work
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    gpu = args.device.startswith("cuda") or (
        args.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
    )
    cpus = max(args.cpus_per_actor, 0.01)
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    if gpu and not args.actors:
        actors = max(1, int(ray.cluster_resources().get("GPU", 0)))
    faces = face_mode(args.faces, items)
    print(
        f"[ageray] predicting {describe_items(items)} from {args.input} with {args.model} "
        f"({args.backend}, {actors} actor(s) x {cpus:g} CPU{', 1 GPU' if gpu else ''}, "
        f"batch {args.batch_size}, faces {faces})",
        flush=True,
    )
    align = {"auto": "auto", "on": True, "off": False}[args.align]
    ds = (
        ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        # reading is I/O: it must not wait for a CPU the model actors hold
        .flat_map(read_item, num_cpus=0, compute=TaskPoolStrategy(size=max(2, actors)))
        .map_batches(
            BatchWorker,
            fn_constructor_kwargs={
                "model": ray.put(files),  # once in the object store, not in every task spec
                "device": "cuda" if gpu else "cpu",
                "backend": args.backend,
                "align": align,
                "distribution": args.distribution,
                "threads": max(1, round(cpus)),
                "rule": args.rule,
                "faces": faces,
            },
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=1 if gpu else 0,
        )
    )
    sink = _write(ds, args, total=expected_images(items))
    _report(sink.summary, args.output, timer)
    return sink.summary


def _report(summary: Any, output: str, timer: Any) -> None:
    total, steady = summary.throughput()
    print(f"[ageray] {summary.line()}")
    for example in summary.examples:
        print(f"  e.g. {example}")
    print(
        f"[ageray] wrote {output} in {timer}: {total:.1f} images/s overall, "
        f"{steady:.1f} images/s from the first answers on"
    )


if __name__ == "__main__":
    raise SystemExit(main())
