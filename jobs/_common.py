"""Argument parsing shared by every job: ``--config recipes/x.yaml --set a.b=c ...``.

Jobs stay thin (parse, wire Ray and MLflow, print a summary); the rules live in ageray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ageray.config import Config, ConfigError, load_config


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="recipe YAML (see recipes/); defaults apply if omitted")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.stage1.epochs=3 (repeatable)",
    )
    return p


def load(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with the config error (no traceback for typos)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("AGERAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "botocore", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __str__(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60}m{s % 60:02d}s"
