"""Build ``gpu-pack/``: what travels with one GPU device run, at most 60 MiB (``make gpu-pack``).

The GPU machine has no network and a Python with torch, torchvision, timm, numpy, Pillow,
pyyaml, safetensors, pandas, scikit-learn, pytest and onnxruntime; the repository travels as
the working tree. What else the check needs comes in this folder:

* ``wheels/``: every distribution the check imports that the machine lacks, at the versions
  installed here: webdataset and what it requires beyond the machine's packages
  (braceexpand), from ``pip download --no-deps``;
* ``utkface-shards.tar.gz``: ``../shared/data/utkface-dev.tar`` imported with ageray's UTKFace
  importer and re-encoded at ``--image-size`` px (JPEG ``--quality``) into train/val/test
  shards, gzipped (the tar headers of 14,217 small samples would otherwise be a third of it);
* ``run.sh``: unpacks both into a temporary folder and runs ``python -m
  benchmarks.gpu_check --shards ... --out "$OUT"``;
* ``MANIFEST.json``: what is in here, sizes, and how it was made.

    python -m benchmarks.gpu_pack --out gpu-pack                # make gpu-pack
    bash gpu-pack/run.sh                                        # on the GPU machine

The face images are research-only (UTKFace licence): the pack is git-ignored and built from
the shared copy at build time, never committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import DEVICE_PACKAGES, PACK_PACKAGES, distribution_closure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "utkface-dev.tar"
MAX_MIB = 60.0
SHARDS = "utkface-shards"

RUNNER = """#!/usr/bin/env bash
# One GPU device run of the ageray check (built by `make gpu-pack`; see benchmarks/gpu_pack.py).
# From the repository root on the GPU machine:  bash gpu-pack/run.sh [gpu_check options]
# Results: $OUT/gpu_check.json and $OUT/gpu_check.md ($OUT defaults to ./gpu-check-out).
set -euo pipefail
PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$PACK/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-check-out}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# the carried wheels are pure Python: unpacking one is installing it
"$PY" - "$WORK/site" "$PACK"/wheels/*.whl <<'EOF'
import sys
import zipfile

for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
tar -xzf "$PACK/utkface-shards.tar.gz" -C "$WORK"
export PYTHONPATH="$ROOT/platform:$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" -m benchmarks.gpu_check --shards "$WORK/utkface-shards" --out "$OUT" "$@"
"""

__all__ = ["MAX_MIB", "build_pack", "main", "missing_distributions"]


def missing_distributions() -> dict[str, str]:
    """``{distribution: installed version}`` the check needs beyond the device's packages:
    the pack's roots and their requirements, less everything the device's packages bring."""
    device = distribution_closure(DEVICE_PACKAGES)
    needed = distribution_closure(PACK_PACKAGES) - device
    return {name: metadata.version(name) for name in sorted(needed)}


def download_wheels(folder: Path, wanted: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in wanted.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(folder), f"{name}=={version}"],
            check=True,
        )  # fmt: skip
    wheels = sorted(folder.glob("*.whl"))
    found = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    absent = [n for n in wanted if n.lower().replace("_", "-") not in found]
    if absent:
        raise RuntimeError(f"pip download gave no wheel for {absent}; the pack needs one each")
    return wheels


def _reencode(size: int, quality: int) -> Any:
    from PIL import Image

    from ageray.data.transforms import decode_image

    def transform(record: Any) -> Any:
        img = decode_image(record.image, target_size=size, name=record.key)
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return dataclasses.replace(record, image=buf.getvalue())

    return transform


def build_shards(source: Path, folder: Path, *, size: int, quality: int) -> dict[str, Any]:
    """UTKFace from ``source`` re-encoded at ``size`` px into shards under ``folder``."""
    from ageray.data.importers import IMPORTERS
    from ageray.data.records import ImportReport
    from ageray.data.shards import write_shards

    report = ImportReport(source="utkface")
    records = IMPORTERS["utkface"](str(source), report)
    return write_shards(
        records,
        folder,
        max_count=2000,
        workers=2,
        transform=_reencode(size, quality),
        report=report,
        source="utkface",
        input=str(source),
        options={"reencoded": {"image_size": size, "quality": quality}},
        progress=False,
    )


def _gzip_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(folder, arcname=folder.name)


def build_pack(
    out: Path,
    *,
    source: Path = DEFAULT_SOURCE,
    image_size: int = 128,
    quality: int = 85,
    max_mib: float = MAX_MIB,
) -> dict[str, Any]:
    """Write the pack into ``out`` (replacing its contents); returns its manifest."""
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} is absent: the pack's faces come from ../shared/data/utkface-dev.tar "
            "(pass --source)"
        )
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("wheels/*.whl"), out / f"{SHARDS}.tar.gz", out / "run.sh"]:
        old.unlink(missing_ok=True)
    wanted = missing_distributions()
    download_wheels(out / "wheels", wanted)
    with tempfile.TemporaryDirectory(prefix="gpu-pack-") as tmp:
        shards = Path(tmp) / SHARDS
        manifest = build_shards(source, shards, size=image_size, quality=quality)
        _gzip_folder(shards, out / f"{SHARDS}.tar.gz")
    runner = out / "run.sh"
    runner.write_text(RUNNER)
    runner.chmod(0o755)
    files = {
        str(p.relative_to(out)): p.stat().st_size
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "MANIFEST.json"
    }
    total = sum(files.values())
    info = {
        "made_by": f"python -m benchmarks.gpu_pack --image-size {image_size} --quality {quality}",
        "source": str(source),
        "image_size": image_size,
        "jpeg_quality": quality,
        "wheels": {name: version for name, version in wanted.items()},
        "splits": {k: v["count"] for k, v in manifest["splits"].items()},
        "files": files,
        "total_bytes": total,
        "total_mib": round(total / 2**20, 2),
        "seconds": round(time.time() - started, 1),
    }
    (out / "MANIFEST.json").write_text(json.dumps(info, indent=2))
    if total > max_mib * 2**20:
        raise RuntimeError(
            f"{out} holds {total / 2**20:.1f} MiB, over the {max_mib:g} MiB that may travel; "
            f"rebuild with a smaller --image-size (now {image_size}) or --quality ({quality})"
        )
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "gpu-pack"))
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="UTKFace tar")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = parser.parse_args(argv)
    info = build_pack(
        Path(args.out),
        source=Path(args.source),
        image_size=args.image_size,
        quality=args.quality,
        max_mib=args.max_mib,
    )
    print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=2))
    print(f"{args.out}: {info['total_mib']} MiB; on the GPU machine: bash {args.out}/run.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
