"""The prepared device check: one command for one GPU run, results as JSON + Markdown.

    python -m benchmarks.gpu_check --out "$OUT" --shards <carried UTKFace shards>
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu-check      # every step, on CPU

On the GPU machine it runs from ``gpu-pack/run.sh`` (``make gpu-pack`` builds that folder:
the webdataset wheel, UTKFace shards re-encoded small, the runner). The machine has its own
Python with torch, torchvision, timm, numpy, Pillow, pyyaml, safetensors, pandas,
scikit-learn, pytest and onnxruntime, and no Ray, MLflow, boto3 or FastAPI: the check drives
the library in-process (``ageray.training.loop.run_local``), never through Ray.

Steps (each writes its part of ``gpu_check.json`` / ``gpu_check.md`` as soon as it is done,
so a run cut short still leaves what it measured; a failing step is recorded and the next
one runs):

a. ``pytest -m cuda tests/unit/test_cuda.py``: device placement, bf16 routed prediction
   against float32, device augmentation against the CPU, evaluation exactly once.
b. Training throughput of ResNet-18 and ResNet-50 (GLAE head) at 224 px, bf16 +
   channels_last, ``torch.compile`` off and on: (i) one batch already on the GPU, stepped
   repeatedly (the ceiling), (ii) end to end from the tar shards with per-image augmentation
   in the DataLoader workers, (iii) end to end with the batched augmentation on the GPU;
   images/s and the ratio to (i). Every step goes through ``ageray.training.loop.train_step``.
c. The real-face run: GLAE ResNet-18 at 224 px on the UTKFace shards
   (``recipes/utkface_glae_r18_gpu.yaml``), stage 1 and stage 2, as many epochs as fit in
   ``--real-face-s`` seconds (sized from (b)'s measured rate), then GLAE's Table IX on the
   test split.
d. The routed model's inference throughput (image + flip, both heads, Adaptive Routing, bf16)
   at batch 1, 8, 32, 128, 512: the floor Serve works against on a GPU.

The whole run is sized to ``--budget-s`` (540 s): (b) stops early, noting what it skipped,
rather than eat the time of (c) and (d). ``--dry-run`` runs every step on the CPU at tiny
sizes (32 px, a few steps, compile with the ``eager`` backend) on the given shards or, without
``--shards``, on a few synthetic faces it writes itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "utkface_glae_r18_gpu.yaml"
CUDA_TESTS = ("tests/unit/test_cuda.py",)

#: What the GPU machine's own Python has (distribution names), and what the pack carries.
DEVICE_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "pyyaml",
    "safetensors",
    "pandas",
    "scikit-learn",
    "pytest",
    "onnxruntime",
)
PACK_PACKAGES = ("webdataset", "braceexpand")
#: Import names of this repository's own code (it travels as the working tree).
OWN_MODULES = ("ageray", "benchmarks", "jobs", "tests", "conftest", "datagen", "services")

__all__ = [
    "DEVICE_PACKAGES",
    "PACK_PACKAGES",
    "Sizes",
    "allowed_modules",
    "distribution_closure",
    "main",
    "run_check",
]


# --------------------------------------------------------------------------------------
# What the device has (used by gpu_pack and by the test that lists the check's imports)
# --------------------------------------------------------------------------------------


def _requirement_names(dist: str) -> list[str]:
    """The distributions ``dist`` requires on Linux (extras and other platforms left out)."""
    from packaging.requirements import Requirement

    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        env = {"extra": "", "sys_platform": "linux", "platform_system": "Linux"}
        if req.marker is None or req.marker.evaluate(env):
            out.append(req.name)
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_closure(roots: Iterable[str]) -> set[str]:
    """``roots`` and every distribution they require, transitively, as installed here
    (canonical names; a root that is not installed here is kept without its requirements)."""
    seen: set[str] = set()
    todo = [_canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(_canonical(r) for r in _requirement_names(name))
        except metadata.PackageNotFoundError:
            continue
    return seen


def allowed_modules(distributions: Iterable[str]) -> set[str]:
    """Top-level import names provided by ``distributions`` (as installed here)."""
    wanted = {_canonical(d) for d in distributions}
    names = {_canonical(d) for d in wanted}
    out = set()
    for module, dists in metadata.packages_distributions().items():
        if any(_canonical(d) in names for d in dists):
            out.add(module)
    # distributions whose import name is not derivable from installed metadata here
    out.update({"PIL"} if "pillow" in wanted else set())
    out.update({"yaml"} if "pyyaml" in wanted else set())
    out.update({"sklearn"} if "scikit-learn" in wanted else set())
    return out


# --------------------------------------------------------------------------------------
# Sizes of a real run and of a dry run
# --------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """How big each step is. ``real()`` for the H200, ``dry()`` for a CPU at tiny sizes."""

    image_size: int
    batch_size: int
    warmup_steps: int
    timed_steps: int
    backbones: tuple[str, ...]
    compile_backend: str
    loader_workers: int | str
    inference_batches: tuple[int, ...]
    inference_seconds: float
    real_face_s: float
    max_epochs: tuple[int, int]  # stage 1, stage 2
    steps_per_epoch: int | None  # None: the whole train split per epoch
    budget_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def real(cls, budget_s: float = 540.0, real_face_s: float = 300.0) -> Sizes:
        return cls(
            image_size=224,
            batch_size=256,
            warmup_steps=8,
            timed_steps=24,
            backbones=("resnet18", "resnet50"),
            compile_backend="inductor",
            loader_workers="auto",
            inference_batches=(1, 8, 32, 128, 512),
            inference_seconds=2.0,
            real_face_s=real_face_s,
            max_epochs=(60, 20),
            steps_per_epoch=None,
            budget_s=budget_s,
        )

    @classmethod
    def dry(cls) -> Sizes:
        return cls(
            image_size=32,
            batch_size=4,
            warmup_steps=1,
            timed_steps=2,
            backbones=("resnet18",),  # ResNet-50 adds a minute of CPU and no code path
            compile_backend="eager",
            loader_workers=0,
            inference_batches=(1, 4, 8),
            inference_seconds=0.0,
            real_face_s=0.0,
            max_epochs=(1, 1),
            steps_per_epoch=2,
            budget_s=600.0,
        )


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "device": "cpu",
    }
    for dist in ("torchvision", "timm", "webdataset"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return env


def synthetic_shards(folder: Path, image_size: int = 48, num_samples: int = 96) -> str:
    """A few synthetic faces as shards (the dry run without carried shards)."""
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    records = iter_synthetic(num_samples=num_samples, image_size=image_size, seed=0)
    write_shards(records, folder, max_count=32, workers=1, progress=False)
    return str(folder)


def _config(shards: str, sizes: Sizes, overrides: Iterable[str] = ()) -> Any:
    """The real-face recipe at this run's sizes."""
    from ageray.config import load_config

    sets = [
        f"data.shards={shards}",
        f"data.image_size={sizes.image_size}",
        f"data.batch_size={sizes.batch_size}",
        f"data.eval_batch_size={max(2 * sizes.batch_size, 8)}",
        f"data.num_workers={sizes.loader_workers}",
        "train.log_every=0",
    ]
    if sizes.steps_per_epoch is not None:
        sets.append(f"data.steps_per_epoch={sizes.steps_per_epoch}")
    return load_config(RECIPE, [*sets, *overrides])


# --------------------------------------------------------------------------------------
# a. pytest -m cuda
# --------------------------------------------------------------------------------------


def step_pytest(out: Path, timeout_s: float = 240.0) -> dict[str, Any]:
    """Run the CUDA-marked tests in a subprocess. Third-party pytest plugins are not loaded
    (the device has none); the report is read from JUnit XML."""
    xml = out / "pytest-cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *CUDA_TESTS]  # fmt: skip
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        assert suite is not None
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"]
        counts["passed"] -= counts["skipped"]
        result.update(counts)
        result["cases"] = [
            {
                "name": case.get("name"),
                "outcome": next(
                    (c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed"
                ),
            }
            for case in suite.iter("testcase")
        ]
    result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    result["ok"] = proc.returncode == 0 and not result.get("failures") and not result.get("errors")
    return result


# --------------------------------------------------------------------------------------
# b. training throughput
# --------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """A model, optimiser and loss step as the training loop builds them for stage 1."""

    model: Any
    step: Callable
    params: list
    optimizer: Any
    scheduler: Any
    cfg: Any
    device: Any

    def run(self, batches: Iterator[dict[str, Any]], *, warmup: int, timed: int) -> float:
        """images/s over ``timed`` steps after ``warmup`` steps (batches fetched inside the
        timing: the end-to-end rate when they come from a loader)."""
        try:
            self._steps(batches, warmup=warmup, timed=timed)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a loader's generator: shut its DataLoader workers down now
        _sync(self.device)
        if self._seen == 0:
            raise RuntimeError("the batches ran out before the timed steps")
        return self._seen / max(1e-9, time.perf_counter() - self._start)

    def _steps(self, batches: Iterator[dict[str, Any]], *, warmup: int, timed: int) -> None:
        from ageray.training.loop import train_step

        self._start, self._seen = time.perf_counter(), 0
        for index, batch in enumerate(batches):
            if index == warmup:
                _sync(self.device)
                self._start = time.perf_counter()
            train_step(
                self.model,
                batch,
                step=self.step,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                params=self.params,
                device=self.device,
                amp=self.cfg.train.amp,
                channels_last=self.cfg.model.channels_last,
                grad_clip=None,
                where="gpu_check",
            )
            if index >= warmup:
                self._seen += int(batch["image"].shape[0])
            if index + 1 == warmup + timed:
                break


def build_trainer(cfg: Any, *, compile: bool, compile_backend: str) -> Trainer:
    from ageray.config import to_dict
    from ageray.training.loop import prepare_for_device
    from ageray.training.optim import build_optimizer, build_scheduler
    from ageray.training.plans import StageSpec, plan_for

    device = _device()
    plan = plan_for(cfg, StageSpec(stage="stage1", config=to_dict(cfg)))
    model = prepare_for_device(
        plan.model,
        device,
        channels_last=cfg.model.channels_last,
        compile=compile,
        compile_backend=compile_backend,
    ).to(device)
    model.train()
    params = [p for p in plan.params if p.requires_grad]
    optimizer = build_optimizer(
        params, plan.optim, cfg.data.batch_size, fused=device.type == "cuda"
    )
    scheduler = build_scheduler(optimizer, plan.optim, 1, 10_000)
    return Trainer(model, plan.step, params, optimizer, scheduler, cfg, device)


def _repeat(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    while True:
        yield batch


def step_throughput(
    shards: str, sizes: Sizes, *, deadline: float, reserve_s: float
) -> dict[str, Any]:
    """(b): per backbone and compile setting, the three input paths side by side."""
    from ageray.data.loader import train_loader

    device = _device()
    stream_device = device if device.type == "cuda" else None
    steps = sizes.warmup_steps + sizes.timed_steps
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for backbone in sizes.backbones:
        for compile in (False, True):
            label = f"{backbone} compile={'on' if compile else 'off'}"
            if time.monotonic() + reserve_s > deadline:
                skipped.append(label)
                continue
            cfg = _config(
                shards,
                sizes,
                [f"model.backbone={backbone}", f"data.steps_per_epoch={steps}"],
            )
            started = time.monotonic()
            trainer = build_trainer(cfg, compile=compile, compile_backend=sizes.compile_backend)
            row: dict[str, Any] = {"backbone": backbone, "compile": compile}
            rates: dict[str, float] = {}
            # (iii) first: its first batch doubles as the resident batch of (i)
            device_data = dataclasses.replace(cfg.data, augment_on="device")
            loader = train_loader(device_data, cfg.data.train_split, device=stream_device)
            batches = iter(loader)
            first = next(batches)
            batches.close()
            resident = {k: v.clone() if hasattr(v, "clone") else v for k, v in first.items()}
            rates["synthetic"] = trainer.run(
                _repeat(resident), warmup=sizes.warmup_steps, timed=sizes.timed_steps
            )
            for mode in ("worker", "device"):
                data = dataclasses.replace(cfg.data, augment_on=mode)
                loader = train_loader(data, cfg.data.train_split, device=stream_device, seed=1)
                rates[mode] = trainer.run(
                    iter(loader), warmup=sizes.warmup_steps, timed=sizes.timed_steps
                )
                row["loader_workers"] = loader.spec.num_workers
            row.update({f"{k}_images_per_s": round(v, 1) for k, v in rates.items()})
            for mode in ("worker", "device"):
                row[f"{mode}_vs_synthetic"] = round(rates[mode] / rates["synthetic"], 3)
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            del trainer
            _free_memory()
    return {
        "image_size": sizes.image_size,
        "batch_size": sizes.batch_size,
        "timed_steps": sizes.timed_steps,
        "warmup_steps": sizes.warmup_steps,
        "rows": rows,
        "skipped_for_time": skipped,
        "ok": bool(rows),
    }


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# c. the real-face run
# --------------------------------------------------------------------------------------


def _best(ctx: Any, metric: str) -> tuple[Path, dict[str, float]]:
    """The checkpoint with the lowest ``metric`` (the last one when none reports it)."""
    pairs = list(zip(ctx.checkpoints, ctx.reports))
    scored = [(c, r) for c, r in pairs if isinstance(r.get(metric), int | float)]
    if scored:
        return min(scored, key=lambda cr: cr[1][metric])
    return pairs[-1]


def plan_epochs(
    *, train_count: int, val_count: int, images_per_s: float, budget_s: float, sizes: Sizes
) -> tuple[int, int]:
    """Stage 1 and stage 2 epochs that fit ``budget_s`` at ``images_per_s`` (3:1, as the
    papers' 24 + 8), validation included, at least one each."""
    epoch_s = train_count / max(images_per_s, 1e-9) + val_count / max(3 * images_per_s, 1e-9)
    total = max(2, int(budget_s / max(epoch_s * 1.15, 1e-9)))
    stage2 = max(1, min(sizes.max_epochs[1], round(total * 0.25)))
    stage1 = max(1, min(sizes.max_epochs[0], total - stage2))
    return stage1, stage2


def step_real_face(
    shards: str, sizes: Sizes, work: Path, *, images_per_s: float | None
) -> dict[str, Any]:
    """(c): stage 1, stage 2, Table IX on the test split, all in this process."""
    from ageray.config import to_dict
    from ageray.data.manifest import read_manifest
    from ageray.evaluation import build_report, evaluate_model, format_table
    from ageray.training.loop import run_local
    from ageray.training.plans import StageSpec

    splits = read_manifest(shards)["splits"]
    base = _config(shards, sizes, [f"run.storage_path={work / 'runs'}"])
    if sizes.real_face_s > 0 and images_per_s:
        epochs = plan_epochs(
            train_count=int(splits[base.data.train_split]["count"]),
            val_count=int(splits[base.data.val_split]["count"]),
            images_per_s=images_per_s,
            budget_s=sizes.real_face_s,
            sizes=sizes,
        )
    else:
        epochs = sizes.max_epochs
    cfg = _config(
        shards,
        sizes,
        [
            f"run.storage_path={work / 'runs'}",
            f"train.stage1.epochs={epochs[0]}",
            f"train.stage2.epochs={epochs[1]}",
        ],
    )
    started = time.monotonic()
    stage1, ctx1 = run_local(StageSpec(stage="stage1", config=to_dict(cfg)), work / "stage1")
    model1, best1 = _best(ctx1, "val_mae")
    spec2 = StageSpec(
        stage="stage2",
        config=to_dict(cfg),
        init_model=str(model1),
        mae_ref=best1.get("val_mae"),
    )
    stage2, ctx2 = run_local(spec2, work / "stage2")
    model2, best2 = _best(ctx2, "val_routed_cmae")
    trained_s = time.monotonic() - started
    preds = evaluate_model(
        model2, shards, cfg.eval.split, flip=cfg.eval.flip_tta, num_workers=sizes.loader_workers
    )
    report = build_report(
        preds,
        shards=shards,
        split=cfg.eval.split,
        aar_groups=cfg.eval.aar_groups,
        ccs_max=cfg.eval.ccs_max,
        model_ref=str(model2),
    )
    keep = ("train_loss", "train_images_per_s", "epoch_time_s", "val_mae", "val_cmae")
    return {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size,
        "augment_on": cfg.data.augment_on,
        "epochs": {"stage1": epochs[0], "stage2": epochs[1]},
        "samples": {name: int(info["count"]) for name, info in splits.items()},
        "train_seconds": round(trained_s, 1),
        "stage1": [{k: r[k] for k in keep if k in r} for r in ctx1.reports],
        "stage2": [
            {k: r[k] for k in (*keep, "val_routed_mae", "val_routed_cmae") if k in r}
            for r in ctx2.reports
        ],
        "best": {"stage1": best1.get("val_mae"), "stage2": best2.get("val_routed_cmae")},
        "model_dir": str(model2),
        "report": _plain(report),
        "table": format_table(report),
        "ok": True,
        "last_metrics": {"stage1": _plain(stage1), "stage2": _plain(stage2)},
    }


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to numbers, NaN to None, arrays dropped."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int | str | bool) or obj is None:
        return obj
    return None


# --------------------------------------------------------------------------------------
# d. inference throughput
# --------------------------------------------------------------------------------------


def step_inference(model_dir: str | Path, sizes: Sizes) -> dict[str, Any]:
    """(d): the routed forward (``RoutedGraph``: image + flip, both heads, routing), bf16."""
    import torch

    from ageray.inference import autocast
    from ageray.model import load_model

    device = _device()
    model, info = load_model(model_dir, map_location=device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    size = int(info.get("input_size") or sizes.image_size)
    from ageray.inference import RoutedGraph

    graph = RoutedGraph(model)  # the routed forward every serving path runs
    rows = []
    for batch in sizes.inference_batches:
        images = torch.randn(batch, 3, size, size, device=device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        for _ in range(3):
            with torch.inference_mode(), autocast(device, "auto"):
                graph(images)
        _sync(device)
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < sizes.inference_seconds:
            with torch.inference_mode(), autocast(device, "auto"):
                graph(images)
            calls += 1
            if calls % 10 == 0 or sizes.inference_seconds == 0:
                _sync(device)
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "batch": batch,
                "images_per_s": round(batch * calls / seconds, 1),
                "ms_per_batch": round(1000 * seconds / calls, 3),
            }
        )
    return {"image_size": size, "heads": model.head_names, "rows": rows, "ok": True}


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    lines = [
        "# GPU check" + (" (dry run on CPU)" if results.get("dry_run") else ""),
        "",
        f"`{results.get('command', '')}`, {results.get('seconds', 0):.0f} s on "
        f"{env.get('device')} (torch {env.get('torch')}, {env.get('cpus')} CPUs).",
        "",
    ]
    steps = results.get("steps", {})
    a = steps.get("pytest")
    if a:
        lines += ["## a. pytest -m cuda", ""]
        if "error" in a:
            lines += [f"failed: {a['error']}", ""]
        else:
            lines += [
                f"{a.get('passed', 0)} passed, {a.get('failed', a.get('failures', 0))} failed, "
                f"{a.get('errors', 0)} errors, {a.get('skipped', 0)} skipped "
                f"(exit {a.get('returncode')})",
                "",
            ]
    b = steps.get("throughput")
    if b:
        lines += [f"## b. Training throughput, {b.get('image_size')} px, batch "
                  f"{b.get('batch_size')}, bf16 + channels_last", ""]  # fmt: skip
        if "error" in b:
            lines += [f"failed: {b['error']}", ""]
        else:
            lines += [
                "| backbone | compile | (i) synthetic img/s | (ii) worker aug img/s | ratio "
                "| (iii) device aug img/s | ratio |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for r in b["rows"]:
                lines.append(
                    f"| {r['backbone']} | {'on' if r['compile'] else 'off'} | "
                    f"{r['synthetic_images_per_s']} | {r['worker_images_per_s']} | "
                    f"{r['worker_vs_synthetic']:.2f} | {r['device_images_per_s']} | "
                    f"{r['device_vs_synthetic']:.2f} |"
                )
            if b.get("skipped_for_time"):
                lines.append(f"\nskipped for time: {', '.join(b['skipped_for_time'])}")
            lines.append("")
    c = steps.get("real_face")
    if c:
        lines += ["## c. Real faces: GLAE ResNet-18, UTKFace", ""]
        if "error" in c:
            lines += [f"failed: {c['error']}", ""]
        else:
            lines += [
                f"{c['recipe']} at {c['image_size']} px, batch {c['batch_size']}, augmentation "
                f"on the {c['augment_on']}; {c['epochs']['stage1']} + {c['epochs']['stage2']} "
                f"epochs in {c['train_seconds']} s; samples {c['samples']}.",
                "",
                c["table"],
                "",
            ]
    d = steps.get("inference")
    if d:
        lines += ["## d. Routed inference (image + flip, both heads), bf16", ""]
        if "error" in d:
            lines += [f"failed: {d['error']}", ""]
        else:
            lines += ["| batch | images/s | ms / batch |", "| --- | --- | --- |"]
            lines += [f"| {r['batch']} | {r['images_per_s']} | {r['ms_per_batch']} |"
                      for r in d["rows"]]  # fmt: skip
            lines.append("")
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(results))


def run_check(
    out: Path, *, dry_run: bool, shards: str | None, sizes: Sizes, steps: Iterable[str]
) -> dict[str, Any]:
    """Run the named steps (``pytest``, ``throughput``, ``real_face``, ``inference``)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + sizes.budget_s
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.gpu_check", *sys.argv[1:]]),
        "dry_run": dry_run,
        "environment": environment(),
        "sizes": dataclasses.asdict(sizes),
        "steps": {},
    }
    wanted = list(steps)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if shards is None:
        shards = synthetic_shards(work / "shards")
        results["shards"] = "synthetic (dry run)"
    else:
        results["shards"] = shards

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as exc:  # a failed step is reported; the next one still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        result["step_seconds"] = round(time.monotonic() - t0, 1)
        results["steps"][name] = result
        results["seconds"] = round(time.monotonic() - started, 1)
        _write(out, results)
        print(f"[gpu_check] {name}: {'ok' if result.get('ok') else 'FAILED'} "
              f"in {result['step_seconds']} s", flush=True)  # fmt: skip
        return result

    if "pytest" in wanted:
        record("pytest", lambda: step_pytest(out))
    rate = None
    if "throughput" in wanted:
        reserve = sizes.real_face_s + 60.0 if "real_face" in wanted else 30.0
        tp = record(
            "throughput",
            lambda: step_throughput(shards, sizes, deadline=deadline, reserve_s=reserve),
        )
        rows = [r for r in tp.get("rows", []) if r["backbone"] == "resnet18" and not r["compile"]]
        rate = rows[0]["device_images_per_s"] if rows else None
    model_dir = None
    if "real_face" in wanted:
        real = record("real_face", lambda: step_real_face(shards, sizes, work, images_per_s=rate))
        model_dir = real.get("model_dir")
    if "inference" in wanted:
        if model_dir is None:  # no real-face model: a fresh two-head one
            model_dir = str(_fresh_model(work / "fresh-model", sizes))
        record("inference", lambda: step_inference(model_dir, sizes))
    results["ok"] = all(s.get("ok") for s in results["steps"].values())
    _write(out, results)
    return results


def _fresh_model(folder: Path, sizes: Sizes) -> Path:
    """An untrained two-head GLAE ResNet-18 (when (c) did not run): same compute."""
    from ageray.config import Config, ModelConfig
    from ageray.model import build_model, save_model

    cfg = Config()
    cfg.data.image_size = sizes.image_size
    cfg.model = ModelConfig(backbone="resnet18", head="glae")
    model = build_model(cfg)
    model.add_balanced_head(freeze=False)
    return save_model(model, folder, cfg)


STEPS = ("pytest", "throughput", "real_face", "inference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU, tiny sizes")
    parser.add_argument("--shards", default=os.environ.get("AGERAY_GPU_SHARDS"),
                        help="UTKFace shard folder (gpu-pack carries one)")  # fmt: skip
    parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=540.0, help="whole run, seconds")
    parser.add_argument("--real-face-s", type=float, default=300.0, help="step c's training")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
    if not args.dry_run and args.shards is None:
        parser.error("--shards is needed for a real run (gpu-pack/run.sh passes the carried ones)")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU")
    sizes = Sizes.dry() if args.dry_run else Sizes.real(args.budget_s, args.real_face_s)
    results = run_check(
        Path(args.out), dry_run=args.dry_run, shards=args.shards, sizes=sizes, steps=steps
    )
    print(markdown(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
