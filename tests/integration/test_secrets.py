"""No credentials reach MLflow or the console: a real ``mlflow server`` on loopback, a real
two-stage training job (its own local Ray) and an evaluation job, with credentials in every
place the code reads them:

* the config: ``tracking.uri`` with ``user:password@`` (the training job);
* the environment: ``MLFLOW_TRACKING_URI`` with other credentials (the evaluation job, whose
  config names no URI), ``MLFLOW_TRACKING_PASSWORD``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``;
* URIs: both tracking URIs, which MLflow's client uses as they are (basic auth).

Afterwards every byte the server stored (its sqlite database: params, tags, registry; its
artifact folder: logged config YAML, manifests, evaluation reports, models) and everything
both jobs printed is searched for each secret; and the redacted forms must be there, so the
search looked at the right places.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import MlflowServer, mlflow_server

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CFG_USER, CFG_PASSWORD = "trainer-user-cfg", "cfg-uri-pa55word-0001"
ENV_USER, ENV_PASSWORD = "eval-user-env", "env-uri-pa55word-0002"
ENV = {
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-env-pa55word-0003",
}
MODEL = "models:/secrets-model@candidate"
SECRETS = (CFG_USER, CFG_PASSWORD, ENV_USER, ENV_PASSWORD, *ENV.values())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    work = tmp_path_factory.mktemp("mlflow-secrets")
    with mlflow_server(work, str(work / "artifacts")) as srv:
        yield srv


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ageray.data.shards import write_shards
    from ageray.data.synthetic import iter_synthetic

    out = tmp_path_factory.mktemp("secret-shards") / "synthetic"
    write_shards(
        iter_synthetic(num_samples=320, image_size=64, seed=5),
        out,
        splits="train=0.8,val=0.1,test=0.1",
        workers=1,
        progress=False,
        source="synthetic",
    )
    return out


def with_credentials(uri: str, user: str, password: str) -> str:
    return uri.replace("http://", f"http://{user}:{password}@")


def run_job(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run ``python -m <args>`` to the end; return its console (stdout + stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # stopped with the Ray it started if it hangs
    )
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{args[0]} did not finish:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def test_no_credentials_in_mlflow_or_on_the_console(
    server: MlflowServer, shards: Path, tmp_path: Path
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    base.update(ENV)
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform")])
    base["CUDA_VISIBLE_DEVICES"] = ""
    env_uri = with_credentials(server.uri, ENV_USER, ENV_PASSWORD)
    cfg_uri = with_credentials(server.uri, CFG_USER, CFG_PASSWORD)
    common = [
        f"data.shards={shards}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=secrets",
        "data.num_workers=0",
        "data.batch_size=16",
        "data.eval_batch_size=32",
        "data.shuffle_buffer=32",
        "data.image_size=64",
        "train.stage1.epochs=1",
        "train.stage2.enabled=false",  # stage 1 -> evaluation -> registry: every kind of record
        "train.log_every=0",
        "ray.num_cpus=2",
        "tracking.experiment=secrets",
        "tracking.registered_model=secrets-model",
    ]
    sets = [a for item in common for a in ("--set", item)]

    # training: the URI with credentials in the config (the environment's is ignored then)
    recipe = ["--config", str(ROOT / "recipes" / "demo.yaml"), *sets]
    console = run_job(
        ["jobs.train", *recipe, "--set", f"tracking.uri={cfg_uri}"],
        {**base, "MLFLOW_TRACKING_URI": env_uri},
        tmp_path,
    )
    # evaluation of the registered model: the URI with credentials from the environment
    console += run_job(
        ["jobs.evaluate", *recipe, "--model", MODEL, "--output", str(tmp_path / "eval")],
        {**base, "MLFLOW_TRACKING_URI": env_uri},
        tmp_path,
    )

    backend = Path(server.backend[len("sqlite:///") :]).read_bytes()
    artifacts = [p for p in Path(server.artifacts).rglob("*") if p.is_file()]
    assert any(p.name == "resolved.yaml" for p in artifacts)  # logged config
    assert any(p.name == "report.json" for p in artifacts)  # evaluation (both jobs)
    assert any(p.name == "model.safetensors" for p in artifacts)  # registered model
    stored = [backend, *(p.read_bytes() for p in artifacts)]
    for secret in SECRETS:
        assert secret not in console, (secret, console[-3000:])
        leaked = [b for b in stored if secret.encode() in b]
        assert not leaked, f"{secret} stored by the MLflow server"
    # ... and the redacted URI is what the params hold, so the search saw the params
    port = server.uri.rsplit(":", 1)[1]
    assert f"http://***@127.0.0.1:{port}".encode() in backend
    assert "MLflow:  mlflow ui --backend-store-uri http://***@127.0.0.1:" in console
