"""No job writes outside the paths it was given (issue 21, item 3): each job runs in an
empty working folder with ``--output`` (and its inputs) elsewhere, and the working folder
is still empty afterwards. The bug it pins: ``jobs.evaluate --no-tracking`` resolved the
(unused) embedded MLflow store and created an empty ``runs/`` where it was started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from datagen import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    base = tmp_path_factory.mktemp("job-inputs")
    shards = base / "shards"
    write_shards(
        iter_synthetic(num_samples=24, image_size=64, seed=3),
        shards,
        splits="test=1",
        workers=1,
        progress=False,
    )
    return {"model": make_tiny_model(base / "model"), "shards": shards}


def run_in_empty_folder(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    "job",
    [
        ["jobs.evaluate", "--no-tracking", "--model", "{model}", "--shards", "{shards}",
         "--split", "test", "--set", "data.image_size=64", "--set", "data.num_workers=0"],
        ["jobs.make_shards", "--source", "synthetic", "--num-samples", "8", "--image-size",
         "32", "--quiet"],
        ["jobs.export", "--model", "{model}", "--format", "onnx", "--no-log",
         "--parity-images", "2"],
    ],
    ids=["evaluate", "make_shards", "export"],
)  # fmt: skip
def test_a_job_writes_only_under_its_output(
    job: list[str], inputs: dict[str, Path], tmp_path: Path
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "elsewhere" / "out"
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in job]
    run_in_empty_folder([*args, "--output", str(out)], cwd)
    assert sorted(os.listdir(cwd)) == []  # no runs/, no mlruns/, no stray file
    assert out.exists() and any(out.iterdir())  # ... and the job did write its output
