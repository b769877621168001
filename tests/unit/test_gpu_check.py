"""benchmarks.gpu_check and the pack that travels with it.

The dry run (every step of the device check on this CPU at tiny sizes) runs here in a
stand-in for the GPU machine's Python: a virtual environment whose site-packages hold only
the device's own packages and what they require, plus the packed wheels (symlinked from this
one), with the repository on PYTHONPATH as ``gpu-pack/run.sh`` sets it. Ray, MLflow, boto3,
FastAPI, matplotlib and the rest are simply not installed there, as on the machine. Every
process of the run lists the modules it imported; the ones beyond the device's own packages
must all be in the pack.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    DEVICE_PACKAGES,
    OWN_MODULES,
    PACK_PACKAGES,
    Sizes,
    allowed_modules,
    distribution_closure,
    plan_epochs,
)

ROOT = Path(__file__).resolve().parents[2]

RECORDER = """
import atexit, json, os, sys

@atexit.register
def _record():
    with open(os.environ["GPU_CHECK_RECORD"], "a") as fh:
        used = sorted({m.partition(".")[0] for m in list(sys.modules)})
        fh.write(json.dumps({"argv": sys.argv[:3], "imported": used}) + "\\n")
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_python(folder: Path, distributions: set[str]) -> Path:
    """A virtual environment at ``folder`` holding only ``distributions`` (symlinked from
    this environment's site-packages) and the import recorder; returns its python."""
    site_packages = Path(metadata.distribution("torch").locate_file(""))
    modules = allowed_modules(distributions)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    view = folder / "lib" / version / "site-packages"
    view.mkdir(parents=True)
    for entry in site_packages.iterdir():
        name = entry.name
        if name.endswith((".dist-info", ".egg-info")):
            keep = _canonical(name.split("-")[0]) in distributions
        elif name.endswith(".libs"):
            keep = _canonical(name[: -len(".libs")]) in distributions
        elif name.endswith(".pth") or name == "__pycache__":
            keep = False
        else:
            keep = name.split(".")[0] in modules
        if keep:
            (view / name).symlink_to(entry)
    (view / "sitecustomize.py").write_text(RECORDER)
    base = Path(getattr(sys, "_base_executable", sys.executable))
    (folder / "bin").mkdir()
    (folder / "bin" / "python").symlink_to(base)
    (folder / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\n"
        f"version = {platform.python_version()}\n"
    )
    return folder / "bin" / "python"


def test_pack_holds_what_the_device_lacks() -> None:
    """The pack's wheels are exactly the needed distributions the device has no copy of."""
    from benchmarks.gpu_pack import missing_distributions

    device = distribution_closure(DEVICE_PACKAGES)
    missing = missing_distributions()
    assert "webdataset" in missing and "braceexpand" in missing
    assert not set(missing) & device
    assert {"torch", "timm", "numpy", "pyyaml", "pillow"} <= device
    assert not {"ray", "mlflow", "boto3", "fastapi"} & device


def test_built_pack_is_small_enough_and_complete() -> None:
    pack = ROOT / "gpu-pack"
    if not (pack / "MANIFEST.json").is_file():
        pytest.skip("gpu-pack/ is not built here (make gpu-pack needs ../shared/data)")
    from benchmarks.gpu_pack import MAX_MIB, missing_distributions

    info = json.loads((pack / "MANIFEST.json").read_text())
    total = sum(p.stat().st_size for p in pack.rglob("*") if p.is_file())
    assert total <= MAX_MIB * 2**20
    wheels = {p.name.split("-")[0].lower() for p in (pack / "wheels").glob("*.whl")}
    assert set(missing_distributions()) <= wheels
    assert (pack / "utkface-shards.tar.gz").is_file() and os.access(pack / "run.sh", os.X_OK)
    assert info["splits"]["test"] > 0


def test_epochs_fit_the_budget() -> None:
    sizes = Sizes.real()
    # 11k training images at 3000 img/s: 3.8 s an epoch with validation, 4.4 s with 15%
    # slack, so 68 epochs in 300 s, split 3:1
    stage1, stage2 = plan_epochs(
        train_count=11_000, val_count=1_500, images_per_s=3000, budget_s=300, sizes=sizes
    )
    assert (stage1, stage2) == (51, 17)
    slow = plan_epochs(
        train_count=11_000, val_count=1_500, images_per_s=50, budget_s=300, sizes=sizes
    )
    assert slow == (1, 1)  # never zero epochs, even when one epoch does not fit
    assert (
        plan_epochs(train_count=100, val_count=10, images_per_s=1e6, budget_s=300, sizes=sizes)
        == sizes.max_epochs
    )


def test_dry_run_runs_every_step_with_the_device_packages_only(tmp_path: Path) -> None:
    device = distribution_closure(DEVICE_PACKAGES)
    on_device = device | distribution_closure(PACK_PACKAGES)
    python = device_python(tmp_path / "device-python", on_device)
    names = ("torch", "timm", "webdataset", "ray", "mlflow", "boto3", "fastapi", "matplotlib")
    code = f"import importlib.util as u; print([m for m in {names!r} if u.find_spec(m)])"
    probe = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GPU_CHECK_RECORD": os.devnull},
    )
    assert probe.stdout.strip() == "['torch', 'timm', 'webdataset']"  # a faithful stand-in
    record = tmp_path / "imports.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]),
        "GPU_CHECK_RECORD": str(record),
    }
    env.pop("AGERAY_GPU_SHARDS", None)  # the dry run writes its own synthetic shards
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(python), "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert list(results["steps"]) == list(gpu_check.STEPS)
    for name, step in results["steps"].items():
        assert step["ok"], (name, step.get("error"), step.get("traceback"))
    assert results["steps"]["pytest"]["skipped"] >= 4  # the CUDA tests ran and skipped here
    rows = results["steps"]["throughput"]["rows"]
    assert {r["compile"] for r in rows} == {False, True}
    assert all(r["synthetic_images_per_s"] > 0 and r["device_images_per_s"] > 0 for r in rows)
    table = results["steps"]["real_face"]["table"]
    assert "| Balanced |" in table and "| Smaller Υ (AR)" in table  # Table IX, both stages
    assert [r["batch"] for r in results["steps"]["inference"]["rows"]] == [1, 4, 8]
    assert "## d. Routed inference" in (out / "gpu_check.md").read_text()

    # the imports of every process (the check, its pytest run): beyond the device's own
    # packages, only what the pack carries
    processes = [json.loads(line) for line in record.read_text().splitlines()]
    assert any("pytest" in " ".join(p["argv"]) for p in processes)
    imported = {m for p in processes for m in p["imported"]}
    third_party = set(metadata.packages_distributions())
    extra = (imported & third_party) - allowed_modules(device) - set(OWN_MODULES)
    assert extra, "the listing sees the packed modules the check needs"
    assert extra <= allowed_modules(PACK_PACKAGES), f"not in the pack: {sorted(extra)}"


def test_gpu_runs_use_nccl_and_cpu_runs_gloo() -> None:
    from ageray.config import Config
    from ageray.training.driver import process_group_backend

    cfg = Config()
    assert process_group_backend(cfg) == "gloo"
    cfg.ray.use_gpu = True
    assert process_group_backend(cfg) == "nccl"
