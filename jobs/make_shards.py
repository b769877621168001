"""Import a face-age dataset (or generate the synthetic one) into train/val/test tar shards
plus manifest.json, in a local folder or under s3://bucket/prefix.

    python -m jobs.make_shards --source synthetic --num-samples 4000 --output runs/shards/synthetic
    python -m jobs.make_shards --source utkface --input ../shared/data/utkface-dev.tar \\
        --output s3://ageray/shards/utkface --align --on-no-face keep --workers 4
    python -m jobs.make_shards --source appa-real --input data/appa-real-release \\
        --label apparent --splits test=1 --output runs/shards/appa-test

Evaluation protocols of the papers (ageray.data.protocols; the manifest records which):

    --splits train=0.8,val=0.1,test=0.1 --split-by identity   # default: nobody in two splits
    --splits train=0.8,val=0.1,test=0.1 --split-by random     # Morph II "random 80-20"
    --folds 5 --fold 0                  # k-fold (Xing): fold 0 tests, val from the others
    --lopo --fold 0                     # FG-NET leave one person out: person 0 tests
    --splits-from official.csv          # a data set's own list: "name,split" per line

Splits are deterministic (by identity when the source has identities, so nobody is in two
splits; else by key), shards are written atomically and a re-run replaces the previous
output (same names, stale shards removed, manifest last). Importer-specific settings go
through --importer-option KEY=VALUE (e.g. images_root=..., id_col=... for morph).
The rules live in ageray.data (importers, align, shards); this job only wires them.

Usage errors (a bad flag, a missing --input, a csv without its column, an empty csv,
--output naming a file) print one line `make_shards: ...` and exit 2; bad rows and images
are counted in the report, never fatal; exit 1 when nothing could be written.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
from typing import Any, NoReturn

SOURCES = ("utkface", "fgnet", "appa-real", "mivia", "morph", "folders", "csv", "synthetic")
PROG = "python -m jobs.make_shards"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the error and where to look), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"make_shards: {message} (see {PROG} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def parse_size(text: str) -> int:
    """``123``, ``64K``, ``512M``, ``2G`` -> bytes."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1000000, 64K, 512M, 2G")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]


def output_problem(output: str) -> str | None:
    """Why ``--output`` cannot be a shard folder (a file, or under a file), else None."""
    if "://" in output:
        return None
    path = os.path.abspath(output)
    while True:
        if os.path.exists(path) and not os.path.isdir(path):
            where = "is" if path == os.path.abspath(output) else f"is under {path!r}, which is"
            return (
                f"--output {output!r} {where} an existing file; pass a folder (created if "
                "missing) or s3://bucket/prefix"
            )
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def parse_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--importer-option {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (
        _add_io_args,
        _add_split_args,
        _add_align_args,
        _add_shard_args,
        _add_importer_args,
        _add_run_args,
    ):
        add(p)
    return p


def _add_io_args(p: argparse.ArgumentParser) -> None:
    """Where the records come from and where the shards go."""
    p.add_argument("--source", required=True, choices=SOURCES, help="dataset importer")
    p.add_argument(
        "--input",
        help="dataset folder, tar or csv (see ageray.data.importers); not needed for synthetic",
    )
    p.add_argument("--output", required=True, help="shard folder or s3://bucket/prefix")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    """Which split each sample lands in (ageray.data.protocols)."""
    p.add_argument(
        "--splits",
        default="train=0.8,val=0.1,test=0.1",
        help="name=fraction,... summing to 1 (default: %(default)s; test=1 for a test-only set)",
    )
    p.add_argument(
        "--split-by",
        choices=("identity", "random"),
        default="identity",
        help="the unit kept in one split: identity (nobody in two splits; samples without "
        "one alone) or random (every sample alone: Morph's random 80-20) (%(default)s)",
    )
    p.add_argument(
        "--folds", type=positive_int, default=None, help="k-fold: K folds (with --fold i)"
    )
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        help="k-fold / LOPO: the fold (0-based) that is the test split",
    )
    p.add_argument(
        "--lopo",
        action="store_true",
        help="leave one person out (FG-NET): --fold i holds out the i-th identity (sorted)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="k-fold / LOPO: share of the training folds' groups used for validation (%(default)s)",
    )
    p.add_argument(
        "--splits-from",
        metavar="FILE",
        help="official split list: 'name,split' per line (name = sample key, file name or "
        "identity); samples it does not name are dropped (counted)",
    )


def _add_align_args(p: argparse.ArgumentParser) -> None:
    """Face alignment and image size."""
    p.add_argument(
        "--align",
        action="store_true",
        help="detect the face and align it on the 5-point template (as Serve does)",
    )
    p.add_argument(
        "--on-no-face",
        choices=("keep", "drop"),
        default="keep",
        help="with --align: keep (centre crop) or drop images without a detected face",
    )
    p.add_argument(
        "--detector",
        choices=("auto", "mtcnn", "haar"),
        default="auto",
        help="with --align: face detector (auto = MTCNN when installed, else Haar)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=112,
        help="aligned crop size (--align) and synthetic image size (default: %(default)s)",
    )


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    """Shard size, threads and seed."""
    p.add_argument(
        "--max-count",
        type=positive_int,
        default=1000,
        help="samples per shard at most (%(default)s)",
    )
    p.add_argument(
        "--max-bytes",
        type=parse_size,
        default=parse_size("512M"),
        help="bytes per shard at most, e.g. 256M (default: 512M)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        help="threads for verify/align and shard writing (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and shard-order seed (%(default)s)")


def _add_importer_args(p: argparse.ArgumentParser) -> None:
    """Importer settings (synthetic, appa-real, --importer-option)."""
    p.add_argument(
        "--num-samples", type=positive_int, default=4000, help="synthetic: images (%(default)s)"
    )
    p.add_argument(
        "--images-per-identity", type=positive_int, default=8, help="synthetic: images per identity"
    )
    p.add_argument(
        "--label",
        choices=("real", "apparent"),
        default="real",
        help="appa-real: real age, or apparent age with its std (default: %(default)s)",
    )
    p.add_argument(
        "--importer-option",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for the importer, e.g. images_root=/data/morph (repeatable)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Verification, upload and trial-run switches."""
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not decode every image while writing (faster; corrupt images then surface "
        "as skips in every training epoch instead)",
    )
    p.add_argument(
        "--multipart-threshold",
        type=parse_size,
        default=parse_size("64M"),
        help="S3: upload shards larger than this in parts (default: 64M)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="import only the first N records (trial runs)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jobs._common import setup_logging

    setup_logging()
    from ageray.data.records import InputError

    try:
        return _run(args)
    except InputError as exc:  # the input or an option is the user's to fix
        return _usage_error(str(exc))


def _usage_error(message: str) -> int:
    print(f"make_shards: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from ageray.data.importers import IMPORTERS
    from ageray.data.records import ImportReport, InputError
    from ageray.data.splits import parse_splits

    try:
        splits = parse_splits(args.splits)
    except ValueError as exc:
        return _usage_error(str(exc))
    try:
        protocol = _protocol(args, splits)
    except (InputError, OSError) as exc:
        return _usage_error(str(exc))
    problem = _flag_problem(args)
    if problem:
        return _usage_error(problem)

    options = _importer_options(args)
    report = ImportReport(source=args.source)
    try:  # binds the options (importers are generators: nothing is read yet)
        records = IMPORTERS[args.source](args.input, report, **options)
    except TypeError as exc:
        return _usage_error(f"--importer-option for --source {args.source}: {exc}")
    if args.limit is not None:
        records = itertools.islice(records, args.limit)

    aligner = _aligner(args)
    start = time.time()
    manifest = _write(
        args,
        records,
        splits=splits,
        protocol=protocol,
        options=options,
        report=report,
        aligner=aligner,
    )
    return _finish(args, report=report, manifest=manifest, start=start)


def _flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --input, --max-bytes or --output (checked before anything is read)."""
    if args.source != "synthetic" and not args.input:
        return f"--input is required for --source {args.source}"
    if args.max_bytes < 4 * 512:
        return f"--max-bytes {args.max_bytes} is too small for even one sample"
    return output_problem(args.output)


def _importer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The importer's keywords: --importer-option plus what the source's own flags say."""
    options: dict[str, Any] = dict(args.importer_option)
    if args.source == "synthetic":
        options.update(
            num_samples=args.num_samples,
            image_size=args.image_size,
            images_per_identity=args.images_per_identity,
            seed=args.seed,
        )
    options.setdefault("progress", not args.quiet)
    if args.source == "appa-real":
        options["label"] = args.label
    return options


def _aligner(args: argparse.Namespace) -> Any:
    """The ``FaceAligner`` --align asks for (announced on the console), else None."""
    if not args.align:
        return None
    from ageray.data.align import FaceAligner

    aligner = FaceAligner(
        output_size=args.image_size, detector=args.detector, on_no_face=args.on_no_face
    )
    print(f"aligning with {aligner!r} (backend {aligner.backend})")
    return aligner


def _write(
    args: argparse.Namespace,
    records: Any,
    *,
    splits: dict[str, float],
    protocol: Any,
    options: dict[str, Any],
    report: Any,
    aligner: Any,
) -> dict[str, Any]:
    """Write the shards and the manifest (``ageray.data.shards.write_shards``)."""
    from ageray.data.shards import align_transform, write_shards

    transform = align_transform(aligner) if aligner is not None else None
    return write_shards(
        records,
        args.output,
        splits=splits,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        workers=args.workers,
        seed=args.seed,
        transform=transform,
        report=report,
        source=args.source,
        input=args.input or "",
        options={
            "align": args.align,
            "on_no_face": args.on_no_face if args.align else None,
            "detector": args.detector if args.align else None,
            "image_size": args.image_size,
            "importer": {k: v for k, v in options.items() if k != "progress"},
            "verify_images": not args.no_verify,
        },
        align_stats=aligner.stats if aligner is not None else None,
        verify_images=not args.no_verify,
        multipart_threshold=args.multipart_threshold,
        progress=not args.quiet,
        protocol=protocol,
    )


def _finish(
    args: argparse.Namespace, *, report: Any, manifest: dict[str, Any], start: float
) -> int:
    """Print the report and the manifest's summary; 1 when no sample was written."""
    from ageray.data.manifest import manifest_summary
    from ageray.data.records import printable

    print(report.summary())
    if dups := manifest["skipped"].get("duplicate_image", 0):  # same bytes, another name
        print(
            f"duplicates: {dups} identical file(s) skipped (kept the first of each; "
            "examples under skipped_examples in manifest.json)"
        )
    print(manifest_summary(manifest, printable(args.output)))
    total = sum(s["count"] for s in manifest["splits"].values())
    print(f"done in {time.time() - start:.1f}s")
    if total == 0:
        print(
            f"make_shards: no sample was written; check --input {args.input} and the skip "
            "reasons above",
            file=sys.stderr,
        )
        return 1
    return 0


def _protocol(args: argparse.Namespace, splits: dict[str, float]) -> Any:
    """The split protocol the flags name (``ageray.data.protocols.SplitProtocol``)."""
    from ageray.data import storage
    from ageray.data.protocols import SplitProtocol, read_split_list

    split_list = None
    if args.splits_from:
        if not storage.exists(args.splits_from):
            raise OSError(f"--splits-from {args.splits_from!r} does not exist")
        text = storage.read_bytes(args.splits_from).decode("utf-8-sig")
        split_list = read_split_list(text, args.splits_from)
    return SplitProtocol(
        fractions=splits,
        split_by=args.split_by,
        folds=args.folds,
        fold=args.fold,
        lopo=args.lopo,
        split_list=split_list,
        split_list_source=args.splits_from or "",
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


if __name__ == "__main__":
    raise SystemExit(main())
