"""One secret, every exit (issue 21, item 2): a canary value is put into every place a
credential can enter ageray, and afterwards every place something leaves it is searched
for that value; it must be found nowhere.

Where it goes in:

* URI user-info: the served ``model_uri`` (``s3://KEY:SECRET@bucket/...``, applied as a
  live swap that fails, so the error quoting the URI reaches ``/v1/model`` and the logs),
  the tracking URI of a job (``http://user:SECRET@host``) in its config and in
  ``MLFLOW_TRACKING_URI``;
* a presigned-style query string (``?X-Amz-Signature=SECRET``) on the model URI, on a
  config value and on request URLs;
* a secret-named environment variable (``AGERAY_CANARY_TOKEN``) of serve and of the jobs;
* a config value (``--set tracking.uri=...``, ``--set model.pretrained=...?X-Amz-...``).

Where it is searched: every HTTP answer (body and headers), every file under the Ray
session folder of the serving process (its own Ray temp dir), the MLflow server's sqlite
file and artifact folder, and the console of serve (the ``serve run`` stand-in,
tests/serve_driver.py) and of two jobs: ``jobs.evaluate`` tracked to MLflow, and one that
fails with a traceback on the secret model URI. Each search also checks that its place was
really reached (``***`` where the secret would be, the traceback printed, the swap failed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from datagen import jpeg, make_tiny_model
from services import MlflowServer, free_port, mlflow_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = "canary-5ecret-7f3a9c1e"
KEY_ID = "AKIACANARYKEY0001"
MODEL_URI = f"s3://{KEY_ID}:{SECRET}@ageray-canary/models/m1?X-Amz-Signature={SECRET}"
PRESIGNED = f"https://weights.example/r18.pth?X-Amz-Signature={SECRET}"


def canary_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "platform")]),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        AGERAY_CANARY_TOKEN=SECRET,  # a secret-named variable
        AWS_ENDPOINT_URL="http://127.0.0.1:9",  # nothing ever leaves loopback
        AWS_ACCESS_KEY_ID="canary-not-secret",
        AWS_SECRET_ACCESS_KEY="canary-not-secret",
    )
    return env


def found_in(data: bytes | str) -> bool:
    return (SECRET.encode() if isinstance(data, bytes) else SECRET) in data


def leaks_under(folder: Path) -> list[str]:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files, f"nothing under {folder}"
    return [str(p) for p in files if found_in(p.read_bytes())]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("canary-model") / "model", seed=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    work = tmp_path_factory.mktemp("canary-mlflow")
    with mlflow_server(work, str(work / "artifacts")) as srv:
        yield srv


def test_serve_leaks_the_secret_nowhere(model: Path, tmp_path: Path) -> None:
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))  # short: socket paths
    port = free_port()
    console = tmp_path / "serve-console.log"
    env = {**canary_env(), "RAY_TMPDIR": str(ray_tmp)}
    argv = [sys.executable, str(ROOT / "tests" / "serve_driver.py"), str(port)]
    argv += ["tests.canary_app:app", f"model_uri={model}", f"swap_uri={MODEL_URI}"]
    with console.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []
    try:
        deadline = time.time() + 240
        while "READY" not in console.read_text(errors="replace"):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"serve did not start:\n{console.read_text()[-4000:]}")
            time.sleep(1)
        with httpx.Client(base_url=base, timeout=60) as client:
            described = client.get("/v1/model")
            answers.append(described)
            answers.append(client.get("/readyz"))
            answers.append(
                client.post(
                    "/v1/predict", content=jpeg(1, 64), headers={"content-type": "image/jpeg"}
                )
            )
            answers.append(
                client.post(
                    f"/v1/predict?X-Amz-Signature={SECRET}&token={SECRET}",
                    content=b"not an image",
                    headers={"content-type": "image/jpeg"},
                )
            )
            answers.append(
                client.post("/v1/predict", content=b"x", headers={"content-type": SECRET})
            )
            answers.append(client.get(f"/v1/{SECRET}?X-Amz-Signature={SECRET}"))
            answers.append(client.get("/v1/predict", params={"distribution": SECRET}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # serve_driver ends Serve and its own Ray
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    swap_error = described.json()["swap_error"]
    assert swap_error and "failed, still serving" in swap_error and "***" in swap_error
    assert [a.status_code for a in answers[1:3]] == [200, 200]
    assert all(a.status_code < 500 for a in answers), [a.text for a in answers]
    for a in answers:
        assert not found_in(a.text), (a.request.url, a.text)
        assert not any(found_in(f"{k}: {v}") for k, v in a.headers.items())
    text = console.read_text(errors="replace")
    assert not found_in(text), text[-4000:]
    sessions = list((ray_tmp / "ray").glob("session_2*"))
    assert sessions, f"no Ray session under {ray_tmp}"
    logs = [p for s in sessions for p in (s / "logs").rglob("*.log")]
    assert any("failed, still serving" in p.read_text(errors="replace") for p in logs)
    leaked = [leak for s in sessions for leak in leaks_under(s / "logs")]
    assert not leaked, leaked
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def run_job(args: list[str], env: dict[str, str], cwd: Path, ok: bool) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert (proc.returncode == 0) == ok, proc.stdout[-4000:]
    return proc.stdout


def test_jobs_leak_the_secret_nowhere(model: Path, server: MlflowServer, tmp_path: Path) -> None:
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    shards = tmp_path / "shards"
    write_shards(
        iter_synthetic(num_samples=24, image_size=64, seed=2),
        shards,
        splits="test=1",
        workers=1,
        progress=False,
    )
    tracking = server.uri.replace("http://", f"http://canary:{SECRET}@")
    env = {**canary_env(), "MLFLOW_TRACKING_URI": tracking}
    common = ["--shards", str(shards), "--split", "test", "--set", "data.image_size=64"]
    common += ["--set", "data.num_workers=0", "--set", "tracking.experiment=canary"]
    console = run_job(
        ["jobs.evaluate", "--model", str(model), "--output", str(tmp_path / "eval"), *common,
         "--set", f"tracking.uri={tracking}", "--set", f"model.pretrained={PRESIGNED}"],
        env, tmp_path, ok=True,
    )  # fmt: skip
    failed = run_job(
        ["jobs.evaluate", "--no-tracking", "--model", MODEL_URI, "--output",
         str(tmp_path / "eval2"), *common],
        env, tmp_path, ok=False,
    )  # fmt: skip
    assert "Traceback" in failed and "***@ageray-canary" in failed, failed[-3000:]
    for out in (console, failed):
        assert not found_in(out), out[-4000:]
    db = Path(server.backend[len("sqlite:///") :]).read_bytes()
    assert not found_in(db)
    assert b"http://***@127.0.0.1" in db  # the tracking URI was logged, redacted
    assert not leaks_under(Path(server.artifacts))
