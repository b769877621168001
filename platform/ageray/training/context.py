"""Where a training loop runs: inside a Ray Train worker group, or in this process.

The per-worker loop (``ageray.training.loop``) only talks to a :class:`WorkerContext`, so the
same code runs under ``TorchTrainer`` and directly in a test or a benchmark. That is what
lets the tests exercise the loop without Ray and the benchmark compare the two fairly.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "LocalContext",
    "RayTrainContext",
    "WorkerContext",
    "all_gather_objects",
    "broadcast_buffers",
]


class WorkerContext(Protocol):
    rank: int
    world_size: int
    local_rank: int

    @property
    def device(self) -> torch.device: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...


class LocalContext:
    """One process, rank 0 of 1. Reports are kept in ``self.reports``; checkpoints are
    copied under ``workdir`` (``checkpoint_<n>``) so the last one can seed a resume."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, workdir: str | Path | None = None, resume_from: str | Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ageray-local-"))
        self.resume_from = Path(resume_from) if resume_from else None
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import shutil

        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.workdir / f"checkpoint_{len(self.reports):04d}"
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)
            self.checkpoints.append(dst)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.resume_from

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class RayTrainContext:
    """Rank, device and report/checkpoint plumbing of a Ray Train V2 worker."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # A barrier: every rank calls it once per epoch; only rank 0 passes a checkpoint.
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report({**metrics, **self.whereabouts()}, checkpoint=ckpt)

    def whereabouts(self) -> dict[str, Any]:
        """Where this rank runs and what it read this epoch (its node's IP, the training
        samples its loader yielded and their key checksum, ``ageray.data.loader.ReadTally``).
        Read by the driver's :class:`~ageray.training.restarts.StageWatch`: which nodes a
        run's workers are on, and that an epoch read each sample exactly once."""
        import ray

        from ageray.data.loader import TRAIN_READS

        return {
            "node_ip": ray.util.get_node_ip_address(),
            "read_samples": TRAIN_READS.count,
            "read_keysum": TRAIN_READS.keysum,
        }

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a list of one item without a process
    group). Used to merge validation predictions so metrics are exact, not averaged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    world = torch.distributed.get_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics); a no-op
    without a process group.

    Why: DDP syncs buffers at the *start* of each forward, so after an epoch's last step each
    rank holds statistics updated by its own last batch. Validation runs on every rank (each
    on its share of the samples) while the checkpoint is rank 0's model: without this the
    reported validation metrics, the best-checkpoint choice and the MAE that LAE's stage 2
    reads would belong to a mixture of models, not to the one saved.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf.data, src=src)


def fault_marker(storage_path: str, name: str, stage: str) -> Path:
    """Where a one-shot fault injection remembers that it already fired."""
    base = Path(storage_path) if "://" not in storage_path else Path(tempfile.gettempdir())
    return base / name / stage / ".fault-injected"


def registered_epoch(storage_path: str, name: str, stage: str) -> int | None:
    """The epoch of the newest checkpoint Ray Train's controller has *registered* for a
    stage (from its snapshot in local storage), or None when there is none or it is remote."""
    if "://" in storage_path:
        return None
    snap = Path(storage_path) / name / stage / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        return int(latest["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def maybe_inject_fault(
    *, storage_path: str, name: str, stage: str, rank: int, epoch: int, step: int, cfg_run
) -> None:
    """Kill this worker process once, mid-epoch, when the config or AGERAY_FAIL_AT_EPOCH
    asks for it (tests of fault tolerance; off by default).

    Before killing, wait (up to ``AGERAY_FAIL_WAIT_S``, 60 s) until the controller has
    registered the previous epoch's checkpoint. Why: a ``ray.train.report`` returns once the
    checkpoint is in storage, but the controller registers it only at its next poll of the
    workers; a worker that dies in between restarts the group from the checkpoint before
    (Ray Train's semantics). The injected fault is meant to be "a crash after epoch N-1's
    checkpoint", so it must not race the poll. Remote storage cannot be checked: no wait.
    """
    fail_epoch = int(os.environ.get("AGERAY_FAIL_AT_EPOCH", cfg_run.fail_at_epoch))
    if fail_epoch < 0 or epoch != fail_epoch or step != cfg_run.fail_at_step:
        return
    if rank != cfg_run.fail_rank:
        return
    marker = fault_marker(storage_path, name, stage)
    if marker.exists():
        return
    if epoch > 0 and "://" not in storage_path:
        deadline = time.monotonic() + float(os.environ.get("AGERAY_FAIL_WAIT_S", "60"))
        while time.monotonic() < deadline:
            done = registered_epoch(storage_path, name, stage)
            if done is not None and done >= epoch - 1:
                break
            time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
    sys.stdout.write(
        f"[ageray] fault injection: killing rank {rank} at epoch {epoch} step {step}\n"
    )
    sys.stdout.flush()
    os._exit(1)
