"""Training augmentation per CPU core: batched tensor ops against the per-image PIL path.

    python -m benchmarks.augment_cpu                      # 2048 UTKFace faces, batch 64, 112 px
    python -m benchmarks.augment_cpu --images 128 --repeats 1       # a quick check it runs

Both paths start from the same real faces (JPEG bytes read from
``../shared/data/utkface-dev.tar``) and end with the same thing, a normalised float32 batch
(B, 3, 112, 112), for each recipe's ``data.augment`` (default: the real-face CPU recipe,
GLAE's and LAE's strong recipe, i.e. RRC + jitter, jitter + RandAugment(2, 9), all of it):

* **PIL** (``data.augment_on: worker``): per image ``decode_image`` at the RRC draft size,
  then ``build_train_transform``'s PIL ops (RandomResizedCrop, flip, ColorJitter,
  RandAugment), written as uint8 into its batch row; ``normalize_uint8`` on the batch.
* **batched** (``data.augment_on: device``, here on the CPU): per image ``decode_image`` and
  the square resize to ``decode_size`` into its uint8 row (what a DataLoader worker does in
  device mode); then ``BatchAugment`` on the whole batch.

One thread (``torch.set_num_threads(1)``, OpenCV/OMP pinned to 1 too), CPU time of that
thread (``time.thread_time``), so the figure is per core and a busy neighbour changes it
less than wall time; the two paths alternate within each repeat and the median repeat is
reported. Columns: the per-image part (decode, resize) and the augmentation, each in ms per
image, and the speed-up of the batched path, whole and augmentation alone. Run it on an idle
machine for the numbers in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "utkface-dev.tar"
RECIPES = ("utkface_glae_r18_cpu", "glae_r18", "lae_strong")

__all__ = ["main", "measure", "read_faces"]


def read_faces(tar_path: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEG members of the UTKFace tar (bytes only; never written out)."""
    faces: list[bytes] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg")):
                handle = tar.extractfile(member)
                if handle is not None:
                    faces.append(handle.read())
                if len(faces) == count:
                    break
    if not faces:
        raise ValueError(f"{tar_path}: no JPEG members")
    return faces


def _data_config(recipe: str, image_size: int, batch: int) -> Any:
    import dataclasses

    from ageray.config import load_config

    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml").data
    return dataclasses.replace(cfg, image_size=image_size, batch_size=batch)


def _pil_batch(faces: list[bytes], cfg: Any, buffer: Any) -> tuple[float, float, Any]:
    """The worker-mode path for one batch; (decode s, augment s, batch)."""
    from ageray.data.transforms import (
        build_train_transform,
        decode_image,
        split_finisher,
        train_draft_size,
    )

    ops, finisher = split_finisher(build_train_transform(cfg))
    draft = train_draft_size(cfg)
    decode = augment = 0.0
    for row, data in zip(buffer, faces):
        t0 = time.thread_time()
        image = decode_image(data, target_size=draft)
        t1 = time.thread_time()
        finisher.to_uint8(ops(image), out=row)
        augment += time.thread_time() - t1
        decode += t1 - t0
    t2 = time.thread_time()
    batch = finisher.normalize_uint8(buffer[: len(faces)])
    augment += time.thread_time() - t2
    return decode, augment, batch


def _batched_batch(
    faces: list[bytes], cfg: Any, buffer: Any, augment_op: Any, generator: Any
) -> tuple[float, float, Any]:
    """The device-mode path on the CPU for one batch; (decode + resize s, augment s, batch)."""
    from ageray.data.augment import build_decode_transform, decode_size
    from ageray.data.transforms import decode_image, split_finisher

    resize, finisher = split_finisher(build_decode_transform(cfg))
    size = decode_size(cfg)
    t0 = time.thread_time()
    for row, data in zip(buffer, faces):
        finisher.to_uint8(resize(decode_image(data, target_size=size)), out=row)
    t1 = time.thread_time()
    batch = augment_op(buffer[: len(faces)], generator)
    return t1 - t0, time.thread_time() - t1, batch


def measure(
    faces: list[bytes], recipe: str, *, image_size: int, batch: int, repeats: int
) -> dict[str, Any]:
    """Both paths over ``faces`` in batches, ``repeats`` times alternating; medians."""
    import torch

    from ageray.data.augment import BatchAugment, augment_generator, decode_size

    cfg = _data_config(recipe, image_size, batch)
    augment_op = BatchAugment(cfg)
    generator = augment_generator(seed=0, epoch=0, rank=0)
    torch.manual_seed(0)
    pil_buffer = torch.empty(batch, 3, image_size, image_size, dtype=torch.uint8)
    size = decode_size(cfg)
    dev_buffer = torch.empty(batch, 3, size, size, dtype=torch.uint8)
    chunks = [faces[i : i + batch] for i in range(0, len(faces) - batch + 1, batch)]
    if not chunks:
        raise ValueError(f"--images {len(faces)} is less than one batch of {batch}")
    runs: dict[str, list[tuple[float, float]]] = {"pil": [], "batched": []}
    for _ in range(repeats):
        for name in ("pil", "batched"):
            decode = augment = 0.0
            for chunk in chunks:
                if name == "pil":
                    d, a, out = _pil_batch(chunk, cfg, pil_buffer)
                else:
                    d, a, out = _batched_batch(chunk, cfg, dev_buffer, augment_op, generator)
                assert out.shape == (len(chunk), 3, image_size, image_size)
                decode, augment = decode + d, augment + a
            runs[name].append((decode, augment))
    images = len(chunks) * batch

    def per_image(name: str) -> dict[str, float]:
        totals = sorted(runs[name], key=sum)
        decode, augment = totals[len(totals) // 2]
        return {
            "decode_ms": 1000 * decode / images,
            "augment_ms": 1000 * augment / images,
            "total_ms": 1000 * (decode + augment) / images,
            "spread_total_ms": 1000
            * (max(map(sum, runs[name])) - min(map(sum, runs[name])))
            / images,
        }

    pil, batched = per_image("pil"), per_image("batched")
    return {
        "recipe": recipe,
        "augment": {k: v for k, v in vars(cfg.augment).items()},
        "decode_size": size,
        "images": images,
        "pil": pil,
        "batched": batched,
        "speedup_total": pil["total_ms"] / batched["total_ms"],
        "speedup_augment": pil["augment_ms"] / batched["augment_ms"],
    }


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Per core (1 thread, CPU time), {rows[0]['images']} UTKFace faces, batch "
        f"{args.batch}, {args.size} px, median of {args.repeats}: ms per image",
        "",
        "| recipe augment | PIL decode | PIL augment | batched decode+resize | batched augment "
        "| speed-up whole | speed-up augment |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p, b = r["pil"], r["batched"]
        lines.append(
            f"| {r['recipe']} | {p['decode_ms']:.3f} | {p['augment_ms']:.3f} | "
            f"{b['decode_ms']:.3f} | {b['augment_ms']:.3f} | {r['speedup_total']:.2f}x | "
            f"{r['speedup_augment']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", default=str(DEFAULT_TAR), help="UTKFace tar (real faces)")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    tar = Path(args.tar)
    if not tar.is_file():
        parser.error(f"{tar} is absent: the benchmark runs on the real faces of that tar")
    faces = read_faces(tar, args.images)
    rows = [
        measure(faces, recipe, image_size=args.size, batch=args.batch, repeats=args.repeats)
        for recipe in args.recipes.split(",")
        if recipe
    ]
    text = markdown(rows, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
