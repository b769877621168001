"""The saved model: a folder with ``model.safetensors`` and ``model.json``, no pickle.

Why this format: the same folder is a training checkpoint, an MLflow artifact and Serve's
input, and Serve must be able to load it without executing code from the file (safetensors
holds only tensors; the architecture is rebuilt from ``model.json`` by ``build_model``).

``model.json``::

    {"format": "ageray-model/1",
     "model": {...ModelConfig...},        # rebuilt with pretrained=None: no weights file needed
     "input_size": 112,                   # the image size the model was built for
     "heads": ["vanilla", "balanced"],
     "data": {"image_size": 112, "normalize": "imagenet"},
     "align": false,
     "routing": {"rule": "learned",       # the rule inference / Serve apply by default
                 "rules": {"learned": {"settings": {...}, "fit": {...}}}},
     "meta": {...}}

A fitted routing rule's tensors (``routers.<name>.*``) are in ``model.safetensors`` with the
rest of the weights; ``routing`` says how to rebuild the modules that hold them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ageray.config import RETIRED_KEYS, Config, ModelConfig, to_dict

from .age_model import AgeModel, build_model

__all__ = ["MODEL_FORMAT", "load_model", "model_from_state", "read_model_info", "save_model"]

MODEL_FORMAT = "ageray-model/1"
WEIGHTS = "model.safetensors"
INFO = "model.json"


def _json_default(obj: Any) -> Any:
    """numpy / torch scalars and paths in ``meta`` become plain JSON values."""
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_dict(obj)
    raise TypeError(f"model.json meta: {type(obj).__name__} is not JSON serialisable")


def _state_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses
    aliases, and a strict load puts the same values back into each tied parameter)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t.to("cpu").contiguous()
    return out


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model(
    model: AgeModel,
    folder: str | Path,
    cfg: Config | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``folder`` (created); returns it.

    ``cfg`` (the run's Config) supplies ``data.image_size`` / ``data.normalize`` for Serve's
    transforms; ``meta`` is free-form (metrics, stage, run ids); ``meta["align"]`` sets the
    top-level ``align`` flag (faces must be aligned like the training shards).
    """
    if not isinstance(model, AgeModel):
        raise TypeError(f"save_model expects an AgeModel, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    data: dict[str, Any] = {"image_size": model.image_size, "normalize": None}
    if cfg is not None:
        data = {"image_size": cfg.data.image_size, "normalize": cfg.data.normalize}
    info = {
        "format": MODEL_FORMAT,
        "model": to_dict(model.cfg),
        "input_size": model.image_size,
        "heads": model.head_names,
        "data": data,
        "align": bool(meta.get("align", False)),
        "routing": model.routing_info(),
        "meta": meta,
    }
    text = json.dumps(info, indent=2, default=_json_default)
    state = _state_for_save(model)
    _atomic_write(
        folder / WEIGHTS, lambda path: save_file(state, str(path), metadata={"format": "pt"})
    )
    _atomic_write(folder / INFO, lambda path: path.write_text(text))
    return folder


def read_model_info(folder: str | Path) -> dict[str, Any]:
    """``model.json`` of a saved model folder, checked for the format."""
    folder = Path(folder)
    path = folder / INFO
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a saved ageray model: {INFO} is missing (expected "
            f"{INFO} and {WEIGHTS}, written by ageray.model.save_model)"
        )
    info = json.loads(path.read_text())
    if info.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path}: format {info.get('format')!r} is not {MODEL_FORMAT!r}; this ageray reads "
            f"{MODEL_FORMAT} folders only"
        )
    return info


def _model_config(data: dict[str, Any], source: Path) -> ModelConfig:
    """``model.json``'s model section as a ModelConfig; keys an older ageray wrote and this one
    retired (``config.RETIRED_KEYS``, e.g. ``dual_head``) are dropped, so old models load."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    data = {k: v for k, v in data.items() if f"model.{k}" not in RETIRED_KEYS}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{source}: model keys {unknown} are unknown to this ageray's ModelConfig (saved by "
            "a newer version?); upgrade ageray to load it"
        )
    return dataclasses.replace(ModelConfig(**data), pretrained=None)


def model_from_state(
    info: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    map_location: str | torch.device = "cpu",
    source: str | Path = "model",
) -> AgeModel:
    """Rebuild the model that ``info`` (a parsed ``model.json``) describes and load
    ``state`` into it strictly; eval mode, on ``map_location``. The shared half of
    :func:`load_model` and :func:`ageray.inference.load_predictor` (which holds the files as
    bytes)."""
    mc = _model_config(info.get("model") or {}, Path(str(source)) / INFO)
    size = info.get("input_size") or (info.get("data") or {}).get("image_size")
    model = build_model(mc, image_size=int(size) if size else None)
    heads = info.get("heads") or ["vanilla"]
    if "balanced" in heads:
        model.add_balanced_head(freeze=False)
    model.restore_routing(info.get("routing"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{source}: the weights do not match the architecture in {INFO}: {exc}"
        ) from exc
    model.to(map_location)
    model.eval()
    return model


def load_model(
    folder: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[AgeModel, dict[str, Any]]:
    """Rebuild the model from ``model.json`` and load ``model.safetensors`` strictly.

    Returns ``(model, info)`` with the model in eval mode on ``map_location`` and ``info`` the
    parsed ``model.json``. A saved balanced head is rebuilt (unfrozen; call
    ``freeze_for_stage2`` to continue stage 2).
    """
    folder = Path(folder)
    info = read_model_info(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{str(folder)!r}: {WEIGHTS} is missing next to {INFO}")
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    state = load_file(str(weights), device=device)
    model = model_from_state(info, state, map_location=map_location, source=weights)
    return model, info
