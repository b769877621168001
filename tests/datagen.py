"""Small, deterministic test data: encoded images, records, hand-made (possibly corrupt)
shards, and a tiny routed age model. Kept tiny (16-64 px) so tests take seconds."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ageray.data.records import Record


def encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: int = 24, quality: int = 85) -> bytes:
    """A small noisy RGB JPEG, different for every seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=quality)


def make_records(
    n: int,
    *,
    ages: Sequence[float] | None = None,
    identities: int | None = None,
    size: int = 24,
    prefix: str = "s",
) -> list[Record]:
    """``n`` records with ages ``ages[i % len(ages)]`` (default 0..69), gender alternating,
    identities ``p<i // per>`` when ``identities`` is given (else none)."""
    out = []
    for i in range(n):
        age = float(ages[i % len(ages)]) if ages is not None else float(i % 70)
        ident = f"p{i % identities:03d}" if identities else None
        out.append(
            Record(
                key=f"{prefix}{i:05d}",
                image=jpeg(i, size),
                age=age,
                gender=i % 2,
                race=i % 5,
                identity=ident,
                source=f"test:{i}",
            )
        )
    return out


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def label(age: float, **kw: Any) -> bytes:
    return json.dumps({"age": age, "age_std": None, "gender": 0, "race": 1, **kw}).encode()


def write_manual_shards(
    root: Path, split: str, shards: Sequence[tuple[str, bytes, int]]
) -> dict[str, Any]:
    """Write ``(name, tar bytes or b"" for a missing file, declared count)`` shards and a
    manifest for them under ``root``; returns the manifest."""
    from ageray.data.manifest import FORMAT

    infos = []
    for name, data, count in shards:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data:
            path.write_bytes(data)
        infos.append({"name": name, "count": count, "bytes": len(data), "sha256": ""})
    manifest = {
        "format": FORMAT,
        "splits": {
            split: {
                "count": sum(c for _, _, c in shards),
                "shards": infos,
                "age_hist": {"30": 1},
                "fields": ["age"],
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def make_tiny_model(folder: Path, seed: int = 0, meta: dict[str, Any] | None = None) -> Path:
    """resnet18 + GLAE head (FR r=k=s=16) at 64 px with random weights, saved with
    ``save_model``. Its balanced head is perturbed away from the vanilla one so that Adaptive
    Routing has a real choice to make (identical heads would always tie)."""
    import torch

    from ageray.config import Config, ModelConfig
    from ageray.model import build_model, save_model

    cfg = Config()
    cfg.data.image_size = 64
    cfg.model = ModelConfig(backbone="resnet18", head="glae", fr_r=16, fr_kernel=16, fr_stride=16)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.add_balanced_head(freeze=False)
    with torch.no_grad():
        for p in model.heads["balanced"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(model, folder, cfg, meta=meta or {"seed": seed})
