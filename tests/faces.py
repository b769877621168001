"""Faces for the inference tests: real UTKFace crops read at run time from
../shared/data/utkface-dev.tar (never copied into the repo), or synthetic faces when the
tarball is absent; and a tiny routed model that serves a fitted rule."""

from __future__ import annotations

import tarfile
from pathlib import Path

from ageray.data.records import Record

TESTS = Path(__file__).resolve().parent


def utkface_tar() -> Path | None:
    from conftest import UTKFACE_TAR

    return UTKFACE_TAR if UTKFACE_TAR.is_file() else None


def face_records(n: int, *, seed: int = 0) -> tuple[list[Record], str]:
    """``n`` face records and where they came from (``utkface`` or ``synthetic``)."""
    tar = utkface_tar()
    if tar is None:
        from ageray.data.synthetic import iter_synthetic

        recs = list(iter_synthetic(num_samples=n, image_size=96, seed=seed))
        return recs, "synthetic"
    out: list[Record] = []
    with tarfile.open(tar) as tf:
        for member in tf:
            if not member.isfile() or not member.name.lower().endswith(".jpg"):
                continue
            name = member.name.rsplit("/", 1)[-1]
            try:
                age = float(name.split("_", 1)[0])
            except ValueError:
                continue
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
            out.append(Record(key=f"utk{len(out):04d}", image=data, age=age, source=name))
            if len(out) == n:
                break
    return out, "utkface"


def make_routed_model(folder: Path, *, rule: str = "learned", seed: int = 0) -> Path:
    """The tiny two-head model (tests/datagen.py) with ``threshold`` and ``learned`` fitted
    on noise features, serving ``rule``: a model whose export must carry fitted parameters."""
    import torch
    from datagen import make_tiny_model

    from ageray.config import Config, RoutingConfig
    from ageray.inference import collect_predictions
    from ageray.model import load_model, save_model
    from ageray.model.routing.fitting import fit_rules

    base = make_tiny_model(folder.parent / f"{folder.name}-base", seed=seed)
    model, _ = load_model(base)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        {
            "image": torch.randn(16, 3, 64, 64, generator=gen),
            "age": torch.randint(1, 90, (16,), generator=gen).float(),
            "age_std": torch.full((16,), 2.0),
            "key": [f"v{i}" for i in range(16)],
        }
        for _ in range(3)
    ]
    val = collect_predictions(model, batches, device=torch.device("cpu"))
    routing = RoutingConfig(rule=rule, fit=["threshold", "learned"], hidden=4, steps=100)
    fit_rules(model, val["route_features"], val["age"], routing, split="val")
    cfg = Config()
    cfg.data.image_size = 64
    return save_model(model, folder, cfg)
