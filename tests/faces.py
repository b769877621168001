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
    on the routing features of 48 faces (a held-out set: other faces than the tests send),
    serving ``rule``: a model whose export must carry fitted parameters."""
    import torch
    from datagen import make_tiny_model

    from ageray.config import Config, RoutingConfig
    from ageray.inference import ImagePredictor, collect_predictions
    from ageray.model import load_model, save_model
    from ageray.model.routing.fitting import fit_rules

    base = make_tiny_model(folder.parent / f"{folder.name}-base", seed=seed)
    model, info = load_model(base)
    prep = ImagePredictor.from_model(model, info)
    records, _ = face_records(64)
    held_out = records[16:]  # the tests use the first faces
    batches = [
        {
            "image": torch.stack([prep.prepare(r.image, r.key).tensor for r in part]),
            "age": torch.tensor([r.age for r in part]),
            "age_std": torch.full((len(part),), 2.0),
            "key": [r.key for r in part],
        }
        for part in (held_out[i : i + 16] for i in range(0, len(held_out), 16))
    ]
    val = collect_predictions(model, batches, device=torch.device("cpu"))
    routing = RoutingConfig(rule=rule, fit=["threshold", "learned"], hidden=4, steps=100)
    fit_rules(model, val["route_features"], val["age"], routing, split="val")
    cfg = Config()
    cfg.data.image_size = 64
    return save_model(model, folder, cfg)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib")


def is_pickle(path: Path) -> bool:
    """A pickle-format file: pickle's PROTO opcode (protocol 2-5) at the start (plain
    pickles, legacy ``torch.save``), a zip holding a ``.pkl`` member (``torch.save``'s zip
    format with ``data.pkl``, TorchScript), or a name that promises pickle (``.pt`` ...)."""
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith(".pkl") for n in z.namelist()):
                return True
    return path.name.lower().endswith(PICKLE_SUFFIXES)


def pickle_files(root: Path) -> list[str]:
    """Every pickle-format file under ``root`` (relative paths)."""
    return sorted(
        str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file() and is_pickle(p)
    )
