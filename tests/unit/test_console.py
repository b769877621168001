"""Quiet jobs: which forwarded worker lines reach the console, the console filter on Ray's
real dispatcher object (no Ray started), and what ``--verbose`` / the quiet default set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ageray.training.console import console_lines, install_console_filter

ROOT = Path(__file__).resolve().parents[2]


def test_only_ageray_lines_pass() -> None:
    batch = {
        "is_err": True,
        "pid": 123,
        "lines": [
            "[ageray] stage1 epoch 1/5 done in 12.3s train_loss 3.210 val_mae 9.100",
            "Failed to query Ray Train Controller actor state",
            "Exception in thread PlacementGroupCleanerMonitor:",
            "[2026-11-28 19:56:03,927 E 23036 23069] core_worker.cc:2465: Actor with class "
            "name: 'PreemptionWatcher' ...",
            "Setting up process group for: env:// [rank=0, world_size=1]",
            "  [ageray] stage2: resumed at epoch 2",
            "[tune 1m02s] trial 3 finished",
        ],
    }
    assert console_lines(batch) == [
        "[ageray] stage1 epoch 1/5 done in 12.3s train_loss 3.210 val_mae 9.100",
        "  [ageray] stage2: resumed at epoch 2",
        "[tune 1m02s] trial 3 finished",
    ]
    assert console_lines({"lines": []}) == [] and console_lines({}) == []


def test_the_raylets_out_of_memory_word_passes_its_chatter_does_not() -> None:
    oom = "Task was killed due to the node running low on memory. Memory on the node ..."
    retried = "Task ServeController.graceful_shutdown failed. There are infinite retries ..."
    assert console_lines({"pid": "raylet", "lines": [retried, oom]}) == [oom]
    assert console_lines({"pid": 42, "lines": [oom]}) == []  # a worker quoting it: no


def test_filter_replaces_rays_printer_on_its_dispatcher(capsys: pytest.CaptureFixture) -> None:
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    saved = list(dispatcher.handlers)
    saved_printer = worker.print_to_stdstream
    try:
        dispatcher.add_handler("ray_print_logs", lambda data: print("RAY PRINTED", data))
        assert install_console_filter() is True
        names = [name for name, _ in dispatcher.handlers]
        assert names.count("ray_print_logs") == 1
        dispatcher.emit({"lines": ["noise", "[ageray] progress"], "is_err": False, "pid": 1})
        worker.print_to_stdstream({"lines": ["Task x failed"], "pid": "raylet"}, False)
        out = capsys.readouterr().out
        assert out == "[ageray] progress\n"
    finally:
        dispatcher.handlers = saved
        worker.print_to_stdstream = saved_printer


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AGERAY_", "MLFLOW_"))}
    clean.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


PROBE = """
import os, sys, warnings
from jobs._common import base_parser, setup_logging
args = base_parser("probe", "probe").parse_args(sys.argv[1:])
setup_logging()
print(args.verbose, os.environ.get("AGERAY_VERBOSE"),
      os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"),
      os.environ.get("MLFLOW_LOGGING_LEVEL"))
with warnings.catch_warnings(record=True) as caught:
    warnings.warn("timm says something", UserWarning)
print(len(caught))
"""


def test_jobs_are_quiet_by_default_and_verbose_on_request() -> None:
    quiet = _run(PROBE).split()
    assert quiet == ["False", "None", "false", "ERROR", "0"]
    loud = _run(PROBE, "--verbose").split()
    assert loud[:2] == ["True", "1"] and loud[2:4] == ["None", "None"] and loud[4] == "1"
    # an explicit choice of the user's wins over the quiet default
    mine = _run(PROBE, env={"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "true"}).split()
    assert mine[2] == "true"
