"""One temporary folder per process for model downloads and exports, removed on exit.

Why: a long-lived process (a Serve replica swapping models, a batch-prediction actor) that
makes a fresh ``tempfile.mkdtemp`` per load and forgets one on any error path fills the disk
(issue 21 measured ~90 MB left behind per ONNX Runtime load). Here every temporary model
file of a process lives under ``<tmp>/ageray-scratch-<pid>``: each use takes a subfolder
that is removed when the use ends, the whole folder is removed at exit, and a process that
died without cleaning up (SIGKILL, OOM) has its folder reclaimed by the next process that
starts one (the pid in the name is no longer alive).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PREFIX", "reclaim_stale", "scratch_root", "scratch_use"]

PREFIX = "ageray-scratch-"
_ROOT: Path | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def reclaim_stale(parent: str | Path | None = None) -> list[Path]:
    """Remove the scratch folders of processes that are gone; returns what was removed."""
    base = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    for entry in base.glob(f"{PREFIX}*"):
        pid = entry.name[len(PREFIX) :]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _remove_root() -> None:
    global _ROOT
    if _ROOT is not None and _ROOT.name == f"{PREFIX}{os.getpid()}":
        shutil.rmtree(_ROOT, ignore_errors=True)
    _ROOT = None


def scratch_root() -> Path:
    """This process's scratch folder (created on first use; stale ones reclaimed then)."""
    global _ROOT
    if _ROOT is None or _ROOT.name != f"{PREFIX}{os.getpid()}":  # forked child: its own
        reclaim_stale()
        _ROOT = Path(tempfile.gettempdir()) / f"{PREFIX}{os.getpid()}"
        _ROOT.mkdir(mode=0o700, exist_ok=True)
        atexit.register(_remove_root)
    return _ROOT


@contextlib.contextmanager
def scratch_use(what: str) -> Iterator[Path]:
    """A fresh subfolder of the scratch folder for one use, removed when the use ends."""
    path = Path(tempfile.mkdtemp(prefix=f"{what}-", dir=scratch_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
