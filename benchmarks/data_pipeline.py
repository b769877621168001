"""Data pipeline throughput: the shard streams against the compute floor and a plain
DataLoader over loose JPEG files, at 112 px, in one run.

    python -m benchmarks.data_pipeline                      # real UTKFace when present
    python -m benchmarks.data_pipeline --images 4000 --workers 1,2 --repeats 3

For the training pipeline (RandomResizedCrop, flip, ColorJitter, normalise) and the eval
pipeline (resize, normalise), each measured on the same N encoded images:

* **floor** — ``decode_image(bytes)`` + the transform, in a tight loop in one process (one
  core), no pipeline around it. Decoding is included because the pipelines decode too: what
  a pipeline costs on top of this is its overhead.
* **shards** — ``ageray.data.loader.train_loader`` / ``eval_loader`` over tar shards of the
  same images (local files in /tmp), with W DataLoader workers (forkserver), batch 64.
* **plain** — ``torch.utils.data.DataLoader`` over the same images as loose ``.jpg`` files
  (a map-style Dataset that reads, decodes and transforms), W workers, batch 64, same
  transforms and collation.

"Per core" is images per CPU-second: images divided by the CPU time (user + system) of every
process involved (the main process and each worker, read from /proc at the first and last
batch, so worker start-up is excluded; the floor is one process). On a shared machine this is
steadier than wall time; wall-clock images/s are reported too. Overhead = floor per core /
pipeline per core - 1. Each configuration runs ``--repeats`` times; the best run counts.
Temporary shards and files go under /tmp and are deleted at the end; the images are never
copied into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "utkface-dev.tar"


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _clock_ticks()


def self_cpu() -> float:
    return time.process_time()


@dataclass
class Result:
    name: str
    images: int
    wall: float
    cpu: float

    @property
    def per_core(self) -> float:
        return self.images / self.cpu

    @property
    def wall_rate(self) -> float:
        return self.images / self.wall


# ------------------------------------------------------------------------------ inputs


def load_images(n: int, source: Path | None) -> tuple[list[tuple[str, bytes, float]], str]:
    """``n`` (key, JPEG bytes, age) from the UTKFace tar (every k-th file, so ages spread),
    or synthetic faces when the tar is absent."""
    if source is not None and source.is_file():
        with tarfile.open(source) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
            step = max(1, len(members) // n)
            out = []
            for m in members[::step][:n]:
                name = m.name.rsplit("/", 1)[-1]
                age = float(name.split("_", 1)[0])
                key = name.split(".", 1)[0]
                out.append((key, tar.extractfile(m).read(), age))
        return out, f"UTKFace ({source.name}, {len(out)} of {len(members)} images, 200x200 JPEG)"
    from ageray.data.records import ImportReport
    from ageray.data.synthetic import iter_synthetic

    recs = iter_synthetic(None, ImportReport(), num_samples=n, image_size=200, seed=0)
    out = [(r.key, r.image, float(r.age or 0)) for r in recs]
    return out, f"synthetic ({len(out)} images, 200x200 JPEG; UTKFace tar not found)"


def write_inputs(images: list[tuple[str, bytes, float]], tmp: Path) -> tuple[Path, Path]:
    from ageray.data.records import Record
    from ageray.data.shards import write_shards

    shards = tmp / "shards"
    write_shards(
        (Record(key=k, image=b, age=a) for k, b, a in images),
        shards,
        splits={"train": 1.0},
        max_count=500,
        workers=2,
        progress=False,
    )
    loose = tmp / "loose"
    loose.mkdir()
    index = []
    for k, b, a in images:
        (loose / f"{k}.jpg").write_bytes(b)
        index.append((k, a))
    (loose / "index.json").write_text(json.dumps(index))
    return shards, loose


# ------------------------------------------------------------------------------ baselines


class LooseJpegDataset:
    """The plain baseline: a map-style dataset over ``<key>.jpg`` files."""

    def __init__(self, folder: str, transform: Callable, draft: int) -> None:
        self.folder = folder
        self.index = json.loads(Path(folder, "index.json").read_text())
        self.transform = transform
        self.draft = draft

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from ageray.data.transforms import decode_image

        key, age = self.index[i]
        with open(os.path.join(self.folder, f"{key}.jpg"), "rb") as fh:
            data = fh.read()
        img = decode_image(data, target_size=self.draft, name=key)
        return {"image": self.transform(img), "age": float(age), "key": key}


def floor(images: list[tuple[str, bytes, float]], transform: Callable, draft: int) -> Result:
    from ageray.data.transforms import decode_image

    c0, t0 = self_cpu(), time.perf_counter()
    for key, data, _ in images:
        transform(decode_image(data, target_size=draft, name=key))
    return Result("floor", len(images), time.perf_counter() - t0, self_cpu() - c0)


def floor_batched(
    images: list[tuple[str, bytes, float]], transform: Callable, draft: int, batch: int
) -> Result:
    """The floor with the pipeline's own output placement: per image decode + image ops +
    uint8 pixels into a batch tensor, per batch one vectorised normalisation (what the
    pipeline computes, with no tar reading, labels, queues or processes around it)."""
    import torch

    from ageray.data.transforms import decode_image, split_finisher

    ops, finisher = split_finisher(transform)
    assert finisher is not None
    c0, t0 = self_cpu(), time.perf_counter()
    buf: list[Any] = []
    for i, (key, data, _) in enumerate(images):
        buf.append(ops(decode_image(data, target_size=draft, name=key)))
        if len(buf) == batch or i == len(images) - 1:
            w, h = buf[0].size
            out = torch.empty((len(buf), 3, h, w), dtype=torch.uint8)
            for row, img in zip(out, buf):
                finisher.to_uint8(img, out=row)
            finisher.normalize_uint8(out)
            buf = []
    return Result("floor-batched", len(images), time.perf_counter() - t0, self_cpu() - c0)


def markdown(results: dict[str, Any]) -> str:
    """The results as the table in benchmarks/RESULTS.md."""
    lines = [
        "| pipeline | mode | DataLoader workers | img/s per core (best) | median | "
        "wall img/s | CPU overhead vs floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["runs"].items():
        mode, pipe, w = name.split("/")
        lines.append(
            f"| {pipe} | {mode} | {w[1:] if pipe not in ('floor', 'floor-batched') else '-'} | "
            f"{r['per_core']:.0f} | {r['per_core_median']:.0f} | {r['wall_rate']:.0f} | "
            f"{r['overhead_vs_floor']:+.1%} |"
        )
    return "\n".join(lines)


def timed_batches(
    name: str, batches: Iterator[dict[str, Any]], pids: Callable[[], list[int]], total: int
) -> Result:
    """Consume ``batches``; wall and CPU time from the first batch to the last, over the main
    process and every worker. Worker CPU is sampled after every batch (a worker that has
    finished its share exits, and its last sample stands)."""
    first = None
    images = 0
    t0 = c0 = 0.0
    last: dict[int, float] = {}

    def sample() -> None:
        for p in first or []:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                last[p] = proc_cpu(p)

    for batch in batches:
        n = len(batch["key"])
        if first is None:
            first = list(pids())
            sample()
            t0, c0 = time.perf_counter(), self_cpu() + sum(last.values())
            continue  # the first batch pays worker start-up: not counted
        images += n
        sample()
        if images >= total:
            break
    wall = time.perf_counter() - t0
    cpu = self_cpu() + sum(last.values()) - c0
    return Result(name, images, wall, cpu)


def run_shards(cfg: Any, train: bool, n: int) -> Result:
    from ageray.data.loader import eval_loader, train_loader

    if train:
        loader = train_loader(cfg, "train", seed=1)
    else:
        loader = eval_loader(cfg, "train")
    it = iter(loader)
    result = timed_batches("shards", it, lambda: loader.worker_pids, n)
    it.close()
    return result


def run_plain(cfg: Any, train: bool, loose: Path, n: int) -> Result:
    import multiprocessing

    import torch

    from ageray.data.transforms import (
        build_eval_transform,
        build_train_transform,
        train_draft_size,
    )

    transform = build_train_transform(cfg) if train else build_eval_transform(cfg)
    draft = train_draft_size(cfg) if train else cfg.image_size
    ds = LooseJpegDataset(str(loose), transform, draft)
    kw: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kw["multiprocessing_context"] = multiprocessing.get_context("forkserver")
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=cfg.num_workers,
        **kw,
    )
    it = iter(dl)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    result = timed_batches("plain", it, lambda: pids, n)
    del it
    return result


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline", description=__doc__)
    p.add_argument("--images", type=int, default=4000, help="images per run (%(default)s)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--workers",
        default="0,1,2",
        help="DataLoader worker counts; 0 = in the main process (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; best counts")
    p.add_argument("--source", type=Path, default=DEFAULT_TAR, help="UTKFace tar")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from ageray.config import DataConfig
    from ageray.data.transforms import (
        build_eval_transform,
        build_train_transform,
        train_draft_size,
    )

    images, described = load_images(args.images, args.source)
    n = len(images)
    tmp = Path(tempfile.mkdtemp(prefix="ageray-databench-"))
    print(f"data: {described}; temp files under {tmp}", flush=True)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.data_pipeline " + " ".join(argv or sys.argv[1:]),
        "data": described,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": __import__("PIL").__version__,
            "loadavg_start": os.getloadavg(),
        },
        "runs": {},
    }
    try:
        shards, loose = write_inputs(images, tmp)
        configs: list[tuple[str, str, int, Callable[[], Result]]] = []
        for mode in ("train", "eval"):
            train = mode == "train"
            base = DataConfig(
                shards=str(shards),
                image_size=args.image_size,
                batch_size=args.batch_size,
                eval_batch_size=args.batch_size,
                steps_per_epoch=n // args.batch_size + 1,
                shuffle_buffer=1000,
            )
            transform = build_train_transform(base) if train else build_eval_transform(base)
            draft = train_draft_size(base) if train else base.image_size
            configs.append((mode, "floor", 1, partial(floor, images, transform, draft)))
            configs.append(
                (
                    mode,
                    "floor-batched",
                    1,
                    partial(floor_batched, images, transform, draft, args.batch_size),
                )
            )
            for w in [int(x) for x in args.workers.split(",")]:
                cfg = DataConfig(**{**vars(base), "num_workers": w})
                configs.append((mode, "shards", w, partial(run_shards, cfg, train, n - 64)))
                configs.append((mode, "plain", w, partial(run_plain, cfg, train, loose, n - 128)))
        # interleaved repeats: every configuration sees the same drift of a shared machine
        runs: dict[tuple[str, str, int], list[Result]] = {c[:3]: [] for c in configs}
        for rep in range(args.repeats):
            for mode, name, w, fn in configs:
                r = fn()
                runs[(mode, name, w)].append(r)
                print(
                    f"[{rep + 1}/{args.repeats}] {mode:5s} {name:13s} w={w}: "
                    f"{r.per_core:6.0f} img/s per core",
                    flush=True,
                )
        print()
        for (mode, name, w), rs in runs.items():
            best = max(rs, key=lambda r: r.per_core)
            fl = max(runs[(mode, "floor", 1)], key=lambda r: r.per_core)
            per_core = sorted(r.per_core for r in rs)
            results["runs"][f"{mode}/{name}/w{w}"] = vars(best) | {
                "per_core": best.per_core,
                "per_core_median": per_core[len(per_core) // 2],
                "wall_rate": best.wall_rate,
                "overhead_vs_floor": fl.per_core / best.per_core - 1,
            }
            _print(mode, name, w, best, fl)
        print()
        print(markdown(results))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


def _print(mode: str, name: str, workers: int, r: Result, fl: Result) -> None:
    over = fl.per_core / r.per_core - 1
    print(
        f"{mode:5s} {name:6s} workers={workers}: {r.per_core:7.0f} img/s per core "
        f"({r.wall_rate:7.0f} img/s wall, {r.images} images, {r.cpu:.2f} CPU-s) "
        f"overhead vs floor {over:+.1%}",
        flush=True,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
