"""Cross-validation: write the shards of every fold of a protocol, train and evaluate each
fold with the recipe, and report the mean and spread over folds.

    python -m jobs.crossval --config recipes/xing_ldl.yaml --source utkface \\
        --input ../shared/data/utkface-dev.tar --folds 5 --shards-root /tmp/cv   # Xing 5-fold
    python -m jobs.crossval --config recipes/lae_baseline.yaml --source fgnet \\
        --input data/FGNET --lopo --shards-root /tmp/fgnet-lopo                  # FG-NET LOPO
    python -m jobs.crossval ... --folds 5 --only 0,1     # some folds now, the rest later

Fold i's shards go to ``<shards-root>/fold-<i>`` (``jobs.make_shards --folds K --fold i``,
or ``--lopo --fold i``; written once and reused on a rerun unless ``--fresh``), its run is
``<run.name>-fold<i>`` (its own checkpoints, MLflow runs and report; not registered), and the
summary (``crossval.json``, ``crossval.md``: per row mean ± std over folds, and the pooled
MAE / CMAE over every fold's test samples, the number leave-one-person-out papers quote) goes
to ``--output`` (default ``<storage>/<run.name>/crossval``) and, with tracking, to an MLflow
run ``<run.name>-crossval``. A rerun resumes: finished folds are not trained again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs._common import Timer, base_parser, load, setup_logging


def parse(argv: list[str] | None = None):
    p = base_parser("python -m jobs.crossval", __doc__)
    p.add_argument("--source", required=True, help="dataset importer (as jobs.make_shards)")
    p.add_argument("--input", help="dataset folder, tar or csv (not for synthetic)")
    p.add_argument("--shards-root", required=True, help="folder for the folds' shard folders")
    p.add_argument("--folds", type=int, help="k-fold: K folds")
    p.add_argument("--lopo", action="store_true", help="leave one person out (FG-NET)")
    p.add_argument("--split-by", choices=("identity", "random"), default="identity")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--only", help="comma-separated folds to run now (default: all)")
    p.add_argument(
        "--make-shards-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for jobs.make_shards, e.g. --make-shards-arg=--align (repeatable)",
    )
    p.add_argument("--output", help="folder for crossval.json / crossval.md")
    p.add_argument("--fresh", action="store_true", help="rewrite shards and retrain every fold")
    p.add_argument("--no-tracking", action="store_true", help="do not talk to MLflow at all")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging()
    cfg = load(args)
    if (args.folds is None) == (not args.lopo):
        print("python -m jobs.crossval: give --folds K or --lopo (one of them)", file=sys.stderr)
        return 2
    timer = Timer()

    from ageray.data.manifest import read_manifest

    first = _fold_shards(args, 0)
    manifest = read_manifest(first)
    k = int(manifest.get("num_identities") or 0) if args.lopo else int(args.folds)
    if k < 2:
        print(f"python -m jobs.crossval: {k} fold(s); nothing to cross-validate", file=sys.stderr)
        return 2
    folds = list(range(k)) if not args.only else [int(f) for f in args.only.split(",")]
    bad = [f for f in folds if not 0 <= f < k]
    if bad:
        print(f"python -m jobs.crossval: --only {bad} outside folds 0..{k - 1}", file=sys.stderr)
        return 2

    reports: dict[int, dict] = {}
    for fold in folds:
        url = first if fold == 0 else _fold_shards(args, fold)
        report = _train_fold(args, cfg, fold=fold, k=k, url=url)
        if isinstance(report, int):
            return report
        reports[fold] = report

    out, text = _write_summary(args, cfg, manifest=manifest, reports=reports, k=k)
    print(text)
    print(f"[ageray] cross-validation of {len(reports)}/{k} folds in {timer}: {out}/crossval.md")
    return 0


def _fold_shards(args, fold: int) -> str:
    """Fold ``fold``'s shard folder, written by ``jobs.make_shards`` unless a previous run
    wrote it for this fold (and not ``--fresh``)."""
    from ageray.data.manifest import read_manifest
    from jobs import make_shards

    url = f"{args.shards_root.rstrip('/')}/fold-{fold}"
    try:
        manifest = read_manifest(url)
    except FileNotFoundError:
        manifest = None
    if manifest is None or args.fresh or _protocol_of(manifest).get("fold") != fold:
        cmd = ["--source", args.source, "--output", url, "--fold", str(fold)]
        cmd += ["--input", args.input] if args.input else []
        cmd += ["--lopo"] if args.lopo else ["--folds", str(args.folds)]
        cmd += ["--split-by", args.split_by, "--val-fraction", str(args.val_fraction)]
        cmd += ["--seed", str(args.seed), "--quiet", *args.make_shards_arg]
        print(f"[ageray] fold {fold}: python -m jobs.make_shards {' '.join(cmd)}", flush=True)
        rc = make_shards.main(cmd)
        if rc != 0:
            raise SystemExit(rc)
    return url


def _train_fold(args, cfg, *, fold: int, k: int, url: str) -> dict | int:
    """Train and evaluate one fold with the recipe (its own run name); its report, or the
    exit status when it failed."""
    from ageray.config import load_config
    from ageray.evaluation.crossval import fold_run_name
    from ageray.tracking import Tracker
    from ageray.training.pipeline import PipelineError, run_pipeline

    name = fold_run_name(cfg.run.name, fold)
    fold_cfg = load_config(args.config, [*args.overrides, f"data.shards={url}", f"run.name={name}"])
    print(f"[ageray] fold {fold + 1}/{k}: run {fold_cfg.run.name!r}", flush=True)
    tracker = Tracker(fold_cfg, enabled=not args.no_tracking)
    try:
        result = run_pipeline(
            fold_cfg,
            tracker=tracker,
            evaluate=True,
            register=False,
            fresh=args.fresh,
            log=lambda text: print(text, flush=True),
        )
    except PipelineError as exc:
        print(f"python -m jobs.crossval: fold {fold}: {exc}", file=sys.stderr)
        return 2
    if result.report is None:
        print(f"python -m jobs.crossval: fold {fold} produced no report", file=sys.stderr)
        return 1
    return result.report


def _write_summary(
    args, cfg, *, manifest: dict, reports: dict[int, dict], k: int
) -> tuple[Path, str]:
    """crossval.json / crossval.md (and the MLflow run unless --no-tracking): the folder and
    the markdown."""
    from ageray.evaluation.crossval import summarize_folds, summary_markdown
    from ageray.evaluation.tables import ROW_LABELS
    from ageray.training.driver import local_run_dir

    protocol = {k_: v for k_, v in _protocol_of(manifest).items() if k_ != "fold"}
    protocol["folds"] = k
    summary = summarize_folds([reports[f] for f in sorted(reports)], protocol=protocol)
    summary["fold_ids"] = sorted(reports)
    out = Path(args.output) if args.output else local_run_dir(cfg) / "crossval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossval.json").write_text(json.dumps(summary, indent=2, default=str))
    text = summary_markdown(summary, ROW_LABELS)
    (out / "crossval.md").write_text(text)
    if not args.no_tracking:
        _log_summary(cfg, summary, out)
    return out, text


def _protocol_of(manifest: dict) -> dict:
    return dict((manifest.get("options") or {}).get("protocol") or {})


def _log_summary(cfg, summary: dict, out: Path) -> None:
    """One MLflow run ``<run.name>-crossval``: the summary's means and spreads, the files."""
    import dataclasses

    from ageray.tracking import Tracker

    run_cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, name=f"{cfg.run.name}-crossval")
    )
    tracker = Tracker(run_cfg, enabled=True)
    run_id = tracker.start_pipeline("crossval", resume=False)
    metrics = {}
    for row, values in summary["rows"].items():
        for key, stats in values.items():
            name = key.replace(".", "_")
            metrics[f"cv_{row}_{name}_mean"] = stats["mean"]
            if stats["std"] == stats["std"]:  # not NaN
                metrics[f"cv_{row}_{name}_std"] = stats["std"]
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, out, "crossval")
    tracker.end(run_id)


if __name__ == "__main__":
    raise SystemExit(main())
