"""Promotion and a Serve app that follows it, on real services: a real MLflow server (S3
artifacts on SeaweedFS), `python -m jobs.promote` as a subprocess, Serve on the session's local
Ray, and Serve's metrics read back from Ray's Prometheus endpoint.

The models are real models whose quality is known by construction: every image gets the
same answer (the classifiers' weights are zero and their bias is a Gaussian around one age),
so a model that always says 35 beats one that always says 5 on any age distribution of
adults, and the evaluation that decides is the real one (the report code on real shards).

Order matters (one app for the module): traffic + metrics on version 1, then a win moves the
alias while clients keep sending (Serve follows, no request fails), then a loss moves
nothing, then a second app with require_auth and no token refuses to start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from services import MlflowServer, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAME = "ageray-promote-test"
EXPERIMENT = "promote-test"
APP = "ageray-promote"
PREFIX = "/promo"
AGES = {"1": 5.0, "2": 35.0, "3": 6.0}  # version -> the age it always answers


def constant_age_model(folder: Path, age: float) -> Path:
    """resnet18 + GLAE head at 64 px whose classifiers answer ``age`` for any image."""
    import torch

    from ageray.config import Config, ModelConfig
    from ageray.model import build_model, save_model

    cfg = Config()
    cfg.data.image_size = 64
    cfg.model = ModelConfig(backbone="resnet18", head="glae", fr_r=16, fr_kernel=16, fr_stride=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.add_balanced_head(freeze=False)
    ages = torch.arange(101, dtype=torch.float32)
    with torch.no_grad():
        for head in model.heads.values():
            head.classifier.weight.zero_()
            head.classifier.bias.copy_(-((ages - age) ** 2) / (2 * 3.0**2))
    return save_model(model, folder, cfg, meta={"constant_age": age})


@dataclass
class Registry:
    uri: str
    client: Any


@pytest.fixture(scope="module")
def registry(mlflow_srv: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Versions 1, 2, 3 answering 5, 35 and 6 years; ``champion`` -> version 1."""
    from ageray.config import Config
    from ageray.tracking import Tracker, log_model

    tmp = tmp_path_factory.mktemp("promote-models")
    cfg = Config()
    cfg.run.name = "promote-test"
    cfg.run.storage_path = str(tmp / "runs")
    cfg.tracking.uri = mlflow_srv.uri
    cfg.tracking.experiment = EXPERIMENT
    cfg.tracking.registered_model = NAME
    tracker = Tracker(cfg)
    for version, age in AGES.items():
        folder = constant_age_model(tmp / f"v{version}", age)
        run_id = tracker.start_stage(f"model-{version}", resume=False)
        out = log_model(tracker, run_id, folder, metrics={"constant_age": age})
        tracker.end(run_id)
        assert out["version"] == version
    tracker.client.set_registered_model_alias(NAME, "champion", "1")
    return Registry(mlflow_srv.uri, tracker.client)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic faces (ages 1-81, few children and elderly) with a validation split."""
    from jobs import make_shards

    out = tmp_path_factory.mktemp("promote-shards") / "shards"
    saved = dict(os.environ)  # the job sets its quiet environment; keep the session's
    rc = make_shards.main(
        [
            "--source", "synthetic", "--num-samples", "160", "--image-size", "64",
            "--output", str(out), "--quiet",
        ]
    )  # fmt: skip
    os.environ.clear()
    os.environ.update(saved)
    assert rc in (0, None) and (out / "manifest.json").is_file()
    return out


@dataclass
class App:
    base: str
    metrics_url: str

    def url(self, path: str) -> str:
        return self.base + path

    def version(self) -> str | None:
        r = httpx.get(self.url("/v1/model"), timeout=30)
        return r.json().get("version") if r.status_code == 200 else None


def wait_until(cond: Callable[[], Any], timeout: float = 90.0, every: float = 0.5) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


@pytest.fixture(scope="module")
def app(ray_local: None, registry: Registry) -> Iterator[App]:
    """serve.app on models:/<name>@champion, polling the alias every second."""
    import ray
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    env = {"MLFLOW_TRACKING_URI": registry.uri, "OMP_NUM_THREADS": "1"}
    serve.run(
        build_app(
            f"models:/{NAME}@champion",
            settings={
                "device": "cpu",
                "torch_threads": 1,
                "warmup_batch_sizes": [1],
                "model_poll_s": 1,
                "auth_token_env": "AGERAY_NO_TOKEN_HERE",
            },
            num_replicas=1,
            ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env}},
        ),
        name=APP,
        route_prefix=PREFIX,
    )
    metrics_port = ray.nodes()[0]["MetricsExportPort"]
    yield App(f"http://127.0.0.1:{port}{PREFIX}", f"http://127.0.0.1:{metrics_port}/metrics")
    serve.delete(APP)
    serve.shutdown()


def face(seed: int = 0) -> bytes:
    from ageray.data.synthetic import iter_synthetic

    return next(iter(iter_synthetic(num_samples=1, image_size=64, seed=seed))).image


def predict(client: httpx.Client, url: str, data: bytes) -> httpx.Response:
    """One face chip, one flat answer (``faces=largest``; the default answers per face)."""
    return client.post(
        url, params={"faces": "largest"}, content=data, headers={"content-type": "image/jpeg"}
    )


# --------------------------------------------------------------------------- metrics


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {metric name: [(labels, value)]} for ageray's series."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_ageray_\w+)(?:\{(.*)\})? ([-+0-9.eEinfNa]+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def ours(series: dict) -> dict:
    """Only this module's app: other tests' Serve apps in the same Ray session export the
    same metric names (Serve tags every series with its ``application``)."""
    return {
        name: [(lab, v) for lab, v in rows if lab.get("application") == APP]
        for name, rows in series.items()
    }


def total(series: dict, name: str, **labels: str) -> float:
    return sum(
        v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


def test_metrics_after_traffic(app: App) -> None:
    """After 12 answered images and 2 refused requests, Ray's exporter shows each metric
    with the values the traffic implies (series are per replica; the app tag is ours)."""
    with httpx.Client(timeout=60) as c:
        for i in range(12):
            assert predict(c, app.url("/v1/predict"), face(i)).status_code == 200
        assert predict(c, app.url("/v1/predict"), b"not an image").status_code == 400
        assert c.post(app.url("/v1/predict"), content=b"").status_code in (400, 415)
        assert c.get(app.url("/")).status_code == 200

    def ready() -> dict | None:
        s = ours(scrape(app.metrics_url))
        done = total(s, "ray_ageray_requests_total", route="/v1/predict", status="200") >= 12
        return s if done and total(s, "ray_ageray_predicted_age_count") >= 12 else None

    s = wait_until(ready, timeout=120, every=2)
    assert total(s, "ray_ageray_requests_total", route="/v1/predict", status="400") >= 1
    assert total(s, "ray_ageray_requests_total", route="/", status="200") >= 1
    assert total(s, "ray_ageray_images_total") >= 12
    routed = total(s, "ray_ageray_routed_total")
    assert routed >= 12 and set(lab["head"] for lab, _ in s["ray_ageray_routed_total"]) <= {
        "vanilla",
        "balanced",
    }
    assert total(s, "ray_ageray_batch_size_count") >= 1
    assert total(s, "ray_ageray_forward_ms_count") >= 1
    assert total(s, "ray_ageray_queue_wait_ms_count") >= 12
    # version 1 always says ~5 years: every observation is in the (5, 10] bucket
    count = total(s, "ray_ageray_predicted_age_count")
    assert total(s, "ray_ageray_predicted_age_bucket", le="10.0") == count >= 12
    assert total(s, "ray_ageray_predicted_age_bucket", le="5.0") == 0
    versions = [(lab, v) for lab, v in s["ray_ageray_model_version"] if lab.get("model") == NAME]
    assert versions and all(v == 1.0 and lab["alias"] == "champion" for lab, v in versions)
    assert all(lab.get("application") == APP for lab, _ in versions)


# --------------------------------------------------------------------------- promotion


def promote(registry: Registry, shards: Path, out: Path, candidate: str, margin: float) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri}
    done = subprocess.run(
        [
            sys.executable, "-m", "jobs.promote",
            "--candidate", candidate, "--champion-alias", "champion",
            "--shards", str(shards), "--metric", "cmae", "--margin", str(margin),
            "--output", str(out),
            "--set", f"tracking.experiment={EXPERIMENT}",
            "--set", "data.num_workers=0",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def promotion_run(registry: Registry, version: str) -> Any:
    exp = registry.client.get_experiment_by_name(EXPERIMENT)
    runs = registry.client.search_runs(
        [exp.experiment_id],
        f"tags.`ageray.kind` = 'promote' and params.candidate_version = '{version}'",
    )
    assert len(runs) == 1
    return runs[0]


def test_a_win_moves_the_alias_and_serve_follows_without_failing(
    app: App, registry: Registry, shards: Path, tmp_path: Path
) -> None:
    results: list[tuple[float, int, Any]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t = time.time()
                r = predict(c, app.url("/v1/predict"), face(1))
                results.append((t, r.status_code, r.json() if r.status_code == 200 else r.text))
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        out = promote(registry, shards, tmp_path / "win", f"models:/{NAME}/2", margin=1.0)
        assert "'champion' -> version 2" in out and "PROMOTED" in out, out
        assert registry.client.get_model_version_by_alias(NAME, "champion").version == "2"
        assert registry.client.get_model_version_by_alias(NAME, "previous-champion").version == "1"
        wait_until(lambda: app.version() == "2", timeout=60)
        swapped = time.time()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:3]
    by_version = {}
    for _, _, body in results:
        by_version.setdefault(body["model"]["version"], []).append(body["age"])
    assert set(by_version) == {"1", "2"}, set(by_version)
    for version, ages in by_version.items():  # each answer came from the version it names
        assert all(abs(a - AGES[version]) < 0.5 for a in ages), (version, ages[:5])
    late = [r for r in results if r[0] > swapped]  # sent once /v1/model said version 2
    assert late and all(r[2]["model"]["version"] == "2" for r in late)

    run = promotion_run(registry, "2")
    assert run.data.metrics["promoted"] == 1.0
    assert run.data.metrics["improvement"] >= 1.0
    arts = {a.path for a in registry.client.list_artifacts(run.info.run_id)}
    assert {"comparison.md", "decision.json", "per_age_mae_compare.png", "reports"} <= arts
    dlpath = registry.client.download_artifacts(run.info.run_id, "decision.json", str(tmp_path))
    decision = json.loads(Path(dlpath).read_text())
    assert decision["promote"] is True and decision["extra"]["champion_version"] == "1"
    assert "PROMOTED" in (tmp_path / "win" / "comparison.md").read_text()
    tags = registry.client.get_model_version(NAME, "2").tags
    assert tags["promotion.champion"] == "promoted"


def test_a_loss_moves_nothing(app: App, registry: Registry, shards: Path, tmp_path: Path) -> None:
    out = promote(registry, shards, tmp_path / "loss", f"models:/{NAME}/3", margin=0.0)
    assert "KEPT CHAMPION" in out and "'champion' stays at version 2" in out, out
    assert registry.client.get_model_version_by_alias(NAME, "champion").version == "2"
    assert registry.client.get_model_version_by_alias(NAME, "previous-champion").version == "1"
    run = promotion_run(registry, "3")
    assert run.data.metrics["promoted"] == 0.0 and run.data.metrics["improvement"] < 0
    assert registry.client.get_model_version(NAME, "3").tags["promotion.champion"] == "kept"
    time.sleep(3.0)  # three poll intervals: nothing to follow
    assert app.version() == "2"


def test_require_auth_without_a_token_refuses_to_start(app: App, registry: Registry) -> None:
    from ray import serve

    from serve.app import build_app

    with pytest.raises(RuntimeError, match="ageray-locked failed"):
        serve.run(
            build_app(
                f"models:/{NAME}@champion",
                settings={"require_auth": True, "auth_token_env": "AGERAY_LOCKED_TOKEN"},
                num_replicas=1,
                ray_actor_options={"num_cpus": 0.25},
            ),
            name="ageray-locked",
            route_prefix="/locked",
        )
    # what `serve status` shows for the deployment: the replica's reason, naming the variable
    status = serve.status().applications["ageray-locked"]
    message = status.deployments["AgeEstimator"].message
    assert "require_auth is true" in message and "AGERAY_LOCKED_TOKEN" in message, message
    serve.delete("ageray-locked")
    assert app.version() is not None  # the other app was never affected
