"""Which lines of Ray's worker output reach a job's console.

Why a filter instead of ``log_to_driver=False``: the training workers write ageray's own
progress (``[ageray] stage1 epoch 2/5 ...``) to their stdout, and Ray forwards worker
output to the driver together with everything its own actors say: Train's controller
("Attempting to start training worker group"), the PlacementGroupCleaner's "Failed to
query Ray Train Controller actor state" every second, PreemptionWatcher errors, process
group set-up, Serve's replica logs. Turning forwarding off would hide the progress too.
So forwarding stays on and the driver prints only ageray's lines, without Ray's
``(RayTrainWorker pid=...)`` prefix; everything else is still in Ray's log files
(``<session>/logs/worker-*.out|err``), and ``--verbose`` prints it all as Ray would.

Ray offers no public hook for this: :func:`install_console_filter` swaps the handler Ray
registers on its log dispatcher (and the printer its error-message thread calls), and
leaves Ray's printer in place (verbose output) when that internal API is not there. The
process is a job's driver, which runs one job: the swap lasts until it exits.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["OWN_PREFIXES", "console_lines", "install_console_filter"]

#: Lines that ageray's own code writes in Ray workers and actors (the training loop's
#: ``say``, Tune's trial callback).
OWN_PREFIXES = ("[ageray]", "[tune ")


def console_lines(batch: Mapping[str, Any]) -> list[str]:
    """The lines of one forwarded batch (Ray's ``{"lines", "is_err", "pid", ...}``) that
    belong on a quiet console: ageray's own, and the raylet's word that something was
    killed for lack of memory (on a small machine the one Ray message a person must see;
    the job then fails with Ray's error anyway)."""
    lines: Iterable[str] = batch.get("lines") or ()
    raylet = batch.get("pid") == "raylet"
    return [
        line
        for line in lines
        if line.lstrip().startswith(OWN_PREFIXES) or (raylet and "memory" in line.lower())
    ]


def _print_own_lines(batch: dict[str, Any], ignore_prefix: bool = False) -> None:
    del ignore_prefix  # Ray's signature; ageray's lines are printed without Ray's prefix
    for line in console_lines(batch):
        print(line, file=sys.stdout, flush=True)


def install_console_filter() -> bool:
    """After ``ray.init(log_to_driver=True)`` in this process: print only ageray's lines
    of forwarded worker output. Returns False (Ray prints as usual) when Ray's internal
    dispatcher is not where this Ray version keeps it."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(dispatcher, "remove_handler") or not hasattr(dispatcher, "add_handler"):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _print_own_lines)
    # The raylet's error messages (a task retried, an actor killed at shutdown) reach the
    # driver through another thread that calls Ray's printer directly.
    from ray._private import worker

    if hasattr(worker, "print_to_stdstream"):
        worker.print_to_stdstream = _print_own_lines
    return True
