"""Training checkpoints: everything a restarted worker group needs to continue exactly.

A checkpoint folder is also a loadable model folder (``model.safetensors`` + ``model.json``,
written by :func:`ageray.model.save_model`), so the best checkpoint of a stage can be
evaluated, served or used as the start of the next stage as it is. Beside it:

* ``optim.pt``   optimiser and scheduler state (tensors and numbers only; loaded with
  ``weights_only=True``, so loading it never runs pickled code),
* ``state.json`` epoch, global step, stage, sampler state, the MLflow run id, metrics.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ageray.config import Config

__all__ = ["load_state", "restore", "save_checkpoint", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    cfg: Config,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model + optimiser + scheduler + state into ``folder`` (created)."""
    from ageray.model import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bare = unwrap(model)
    full_meta = {**(meta or {}), **_meta_from_state(state)}
    if hasattr(bare, "save_files"):  # models that are not AgeModel (identity pretraining)
        bare.save_files(folder, full_meta)
    else:
        save_model(bare, folder, cfg, meta=full_meta)
    if optimizer is not None:
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
            },
            folder / "optim.pt",
        )
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=float))
    return folder


def _meta_from_state(state: dict[str, Any]) -> dict[str, Any]:
    keep = ("stage", "epoch", "metrics", "mlflow_run_id")
    return {k: state[k] for k in keep if k in state}


def load_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an ageray training checkpoint (no state.json)")
    return json.loads(path.read_text())


def restore(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict[str, Any]:
    """Load weights (strict), optimiser and scheduler state in place; return ``state``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / "model.safetensors"), device="cpu")
    unwrap(model).load_state_dict(weights, strict=True)
    optim_path = folder / "optim.pt"
    if optimizer is not None and optim_path.is_file():
        blob = torch.load(optim_path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob.get("scheduler") is not None:
            scheduler.load_state_dict(blob["scheduler"])
    return load_state(folder)


@contextlib.contextmanager
def fetched(uri: str | Path) -> Iterator[Path]:
    """``materialize`` for a read that is done once the ``with`` ends (a backbone or a
    stage-1 model loaded into memory): a copy fetched from storage is removed afterwards.

    Why: every trial, stage and restart on every node fetches these again; left in TMPDIR
    they are a folder per load that nothing removes (the cluster test found them). A local
    path is yielded as it is and never removed."""
    path = materialize(uri)
    try:
        yield path
    finally:
        if path != Path(str(uri)):  # fetched: ours to remove (a file's folder included)
            root = path if path.is_dir() else path.parent
            shutil.rmtree(root, ignore_errors=True)


def materialize(uri: str | Path, dst: str | Path | None = None) -> Path:
    """A local path for a checkpoint folder or file that may live in storage (``s3://``).

    Why: on a cluster, the stage-1 model that stage 2 starts from, and the pretrained
    backbone that stage 1 starts from, are in the run's storage (S3), not on the node that
    runs a given worker. Local paths are returned as they are.
    """
    from ageray.data import storage

    text = str(uri)
    if not storage.is_s3(text):
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"{text} does not exist (a checkpoint folder or weights file)")
        return path
    import tempfile

    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="ageray-fetch-"))
    # pyarrow (Ray Train's S3 writer) leaves empty "folder/" marker objects: not files.
    files = [u for u in storage.list_files(text) if not u.endswith("/")]
    if not files:  # a single object, e.g. .../backbone.safetensors
        out = target / storage.basename(text)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(storage.read_bytes(text))
        return out
    prefix = text.rstrip("/") + "/"
    for url in files:
        out = target / url[len(prefix) :]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(storage.read_bytes(url))
    return target
