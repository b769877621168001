"""Promote a registered model to ``champion`` only when it beats the current one.

    python -m jobs.promote --candidate models:/ageray@candidate --champion-alias champion \\
        --shards runs/shards/synthetic --metric cmae --margin 0.1

Both models (pinned versions, not aliases that could move meanwhile) are evaluated by the
same report code (``ageray.evaluation``) on the same split, compared on the rows they serve,
and the alias moves only when ``ageray.registry.promotion.decide`` says the candidate wins by the
margin (``previous-<alias>`` then points at the old champion: a rollback is one alias
move). The comparison (table, per-age plot, decision, both reports) is recorded in an
MLflow run either way. A Serve app deployed on ``models:/<name>@champion`` follows the
alias (``model_poll_s``) and swaps without failing a request.

The split defaults to validation: picking the served model is a choice, and the test
split must not drive choices (README, Operations).
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._common import Timer, base_parser, load, setup_logging


def parse(argv: list[str] | None = None):
    from ageray.registry.promotion import PROMOTION_METRICS

    p = base_parser("python -m jobs.promote", __doc__)
    p.add_argument("--candidate", required=True, help="models:/<name>/<version> or @<alias>")
    p.add_argument("--champion-alias", default="champion", help="alias of the model being served")
    p.add_argument("--shards", help="shards folder or s3:// URL (default: data.shards)")
    p.add_argument("--split", help="split both are evaluated on (default: data.val_split)")
    p.add_argument(
        "--metric", choices=PROMOTION_METRICS, default="cmae", help="lower wins (default cmae)"
    )
    p.add_argument(
        "--margin", type=float, default=0.0, help="years the candidate must win by (>= 0)"
    )
    p.add_argument("--output", help="folder for both reports (default: runs/promote/<name>)")
    p.add_argument("--dry-run", action="store_true", help="compare and record, move nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging(args.verbose)
    cfg = load(args)
    timer = Timer()

    from ageray.registry import alias_version, parse_model_uri
    from ageray.registry.promotion import PromotionError, decide
    from ageray.tracking import Tracker, model_info

    try:
        name, _, _ = parse_model_uri(args.candidate)
    except ValueError as exc:
        print(f"python -m jobs.promote: --candidate: {exc}", file=sys.stderr)
        return 2
    tracker = Tracker(cfg)  # promotion needs the registry: fails fast when it is down
    try:
        cand_version = model_info(args.candidate)["version"]
    except Exception as exc:  # unknown model, version or alias
        print(f"python -m jobs.promote: candidate {args.candidate}: {exc}", file=sys.stderr)
        return 2
    alias = args.champion_alias
    champ_version = alias_version(tracker.client, name, alias)
    print(
        f"[ageray] candidate {name} version {cand_version}; {alias}: "
        + (f"version {champ_version}" if champ_version else "none yet")
    )
    if champ_version == cand_version:
        print(f"[ageray] version {cand_version} already is {alias!r}; nothing to do")
        return 0

    shards = args.shards or cfg.data.shards
    split = args.split or cfg.data.val_split
    out = Path(args.output or Path(cfg.run.storage_path) / "promote" / name)
    versions = {"candidate": cand_version, "champion": champ_version}
    reports = _evaluate(cfg, name=name, versions=versions, shards=shards, split=split, out=out)
    try:
        decision = decide(
            reports["candidate"], reports.get("champion"), metric=args.metric, margin=args.margin
        )
    except PromotionError as exc:
        print(f"python -m jobs.promote: {exc}", file=sys.stderr)
        return 2
    decision.extra = {
        "model": name,
        "candidate_version": cand_version,
        "champion_version": champ_version,
        "alias": alias,
        "split": split,
        "shards": shards,
        "dry_run": args.dry_run,
    }
    table, plot = _compare(reports, decision=decision, out=out)
    run_id = _record(tracker, args, decision=decision, table=table, plot=plot, out=out)
    _print_outcome(args, decision=decision, table=table, plot=plot, out=out)
    print(f"  MLflow:     {tracker.run_url(run_id)}")
    print(f"[ageray] promotion check finished in {timer}")
    return 0


def _evaluate(
    cfg, *, name: str, versions: dict[str, str | None], shards: str, split: str, out: Path
) -> dict:
    """side -> evaluation report of each version there is (no champion yet: candidate only),
    both by the same report code on the same split."""
    from ageray.evaluation import evaluate_to_dir

    reports = {}
    for side, version in versions.items():
        if version is None:
            continue
        print(f"[ageray] evaluating {side} version {version} on {split!r} of {shards} ...")
        reports[side] = evaluate_to_dir(
            f"models:/{name}/{version}",
            shards,
            split,
            out / f"{side}-v{version}",
            flip=cfg.eval.flip_tta,
            aar_groups=cfg.eval.aar_groups,
            ccs_max=cfg.eval.ccs_max,
            num_workers=cfg.data.num_workers,
            train_split=cfg.data.train_split,
        )
    return reports


def _compare(reports: dict, *, decision, out: Path) -> tuple[str, Path]:
    """The comparison table (written to comparison.md) and the per-age plot of both sides."""
    from ageray.registry.promotion import comparison_table, plot_comparison

    table = comparison_table(reports["candidate"], reports.get("champion"), decision)
    (out / "comparison.md").write_text(table)
    plot = plot_comparison(
        reports["candidate"], reports.get("champion"), decision, out / "per_age_mae_compare.png"
    )
    return table, plot


def _record(tracker, args, *, decision, table: str, plot, out: Path) -> str:
    """Record the comparison in an MLflow run, tag the candidate version with the verdict and
    move the alias when the candidate wins (not on --dry-run); returns the run id."""
    from ageray.registry import log_comparison, move_alias

    client = tracker.client
    extra = decision.extra
    name, alias = extra["model"], extra["alias"]
    cand_version, champ_version = extra["candidate_version"], extra["champion_version"]
    run = client.create_run(
        tracker.experiment_id,
        run_name=f"promote {name} v{cand_version} vs {alias}",
        tags={"ageray.kind": "promote", "ageray.model": name, "ageray.alias": alias},
    )
    run_id = run.info.run_id
    tracker.log_params(
        run_id,
        {
            "candidate": args.candidate,
            "candidate_version": cand_version,
            "champion_version": champ_version or "none",
            "metric": args.metric,
            "margin": args.margin,
            "split": extra["split"],
            "shards": extra["shards"],
        },
    )
    log_comparison(
        tracker,
        run_id,
        table_md=table,
        decision=decision.to_dict(),
        plot=plot,
        reports={side: out / f"{side}-v{v}" for side, v in decision_versions(decision).items()},
    )
    if not args.dry_run:  # the candidate version says how its promotion went, and where
        verdict = "promoted" if decision.promote else "kept"
        client.set_model_version_tag(name, cand_version, f"promotion.{alias}", verdict)
        client.set_model_version_tag(name, cand_version, f"promotion.{alias}.run_id", run_id)
    if decision.promote and not args.dry_run:
        move_alias(client, name, alias, cand_version, previous_alias=f"previous-{alias}")
    tracker.end(run_id)
    return run_id


def _print_outcome(args, *, decision, table: str, plot, out: Path) -> None:
    """The comparison table and what happened to the alias (or would have, on --dry-run)."""
    extra = decision.extra
    alias = extra["alias"]
    cand_version, champ_version = extra["candidate_version"], extra["champion_version"]
    print()
    print(table)
    if decision.promote and args.dry_run:
        print(f"[ageray] dry run: {alias!r} would move to version {cand_version}; not moved")
    elif decision.promote:
        print(
            f"[ageray] {alias!r} -> version {cand_version}"
            + (f" (was {champ_version}; previous-{alias} keeps it)" if champ_version else "")
        )
    else:
        print(f"[ageray] {alias!r} stays at version {champ_version}")
    print(f"  comparison: {out / 'comparison.md'}, {plot}")


def decision_versions(decision) -> dict[str, str]:
    """side -> version of the reports a decision compared."""
    extra = decision.extra
    out = {"candidate": extra["candidate_version"]}
    if extra.get("champion_version"):
        out["champion"] = extra["champion_version"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
