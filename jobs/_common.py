"""Argument parsing shared by every job: ``--config recipes/x.yaml --set a.b=c ...
[--verbose]``, and the quiet console.

Jobs stay thin (parse, wire Ray and MLflow, print a summary); the rules live in ageray.

Quiet by default: a job's console shows ageray's progress and results. Ray's own lines
(its workers' and actors' logs, Train's controller) stay in Ray's log files
(``/tmp/ray/session_latest/logs``), MLflow's per-file download bars and library
UserWarnings are off. ``--verbose`` (= ``AGERAY_VERBOSE=1``) shows everything again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

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
    p.add_argument(
        "--verbose",
        "-v",
        action=_Verbose,
        nargs=0,
        default=False,
        help="show Ray's and MLflow's own log lines too (AGERAY_VERBOSE=1)",
    )
    return p


class _Verbose(argparse.Action):
    """``--verbose`` sets ``AGERAY_VERBOSE=1`` at parse time, so everything that starts
    later in this process (``ageray.training.driver.init_ray``, nested jobs of the demo)
    and the Ray workers it starts see the same choice."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ["AGERAY_VERBOSE"] = "1"
        setattr(namespace, self.dest, True)


def verbose() -> bool:
    return os.environ.get("AGERAY_VERBOSE", "") not in ("", "0", "false")


def load(args: argparse.Namespace) -> Config:
    """The resolved config, or exit 2 with the config error (no traceback for typos)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def setup_logging(loud: bool | None = None) -> None:
    """Logging for a job's process; unless ``loud`` (default: ``--verbose`` /
    ``AGERAY_VERBOSE``, see :func:`verbose`), the quiet console (module docstring).

    Call it first thing in ``main``: the environment variables are read when MLflow and
    Ray are imported, and by the Ray processes started later (they inherit them).
    """
    if loud is None:
        loud = verbose()
    if loud:
        os.environ["AGERAY_VERBOSE"] = "1"
    logging.basicConfig(
        level=os.environ.get("AGERAY_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ageray.redaction import install as install_redaction

    # no credentials in any log line (ageray's, Ray's, MLflow's), console line or traceback
    install_redaction()
    for noisy in ("urllib3", "botocore", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if loud:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Libraries that re-enable their own warnings inside (MLflow's log_model shows each
    # UserWarning "once") still reach warnings.showwarning: route it to a silent logger.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for noisy in ("mlflow", "ray", "alembic", "httpx", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


#: Set (unless already set) for a quiet job and inherited by the Ray processes it starts.
QUIET_ENV = {
    # MLflow: no tqdm bar per downloaded or uploaded artifact file, no INFO/WARNING chatter
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    # Python warnings in Ray workers (timm, torch, Ray Train deprecations)
    "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning",
    # Ray: no usage-stats notice, no "Token authentication is enabled" banner per process
    "RAY_USAGE_STATS_ENABLED": "0",
}


class Timer:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __str__(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60}m{s % 60:02d}s"


def require_resources(cfg: Config, prog: str) -> bool:
    """Join or start the run's Ray and check that the run fits it (waiting for an autoscaler
    that may add nodes); otherwise exit 2 with one line naming the setting to change.
    Returns whether the cluster can grow (``ageray.training.capacity``)."""
    from ageray.training.capacity import ResourceError, ensure_resources

    try:
        return ensure_resources(cfg)
    except ResourceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
