"""The real Serve app on loopback: serve/config.yaml deployed the way `serve run
serve/config.yaml` deploys it, the model pulled as models:/<name>@<alias> from a real MLflow
server (S3 artifacts on SeaweedFS), and a real HTTP client.

One app is shared by the whole module (Serve start + model load take ~10-20 s); tests that
change it do so through user_config redeploys, which Serve applies in place (reconfigure),
and put it back. The model swap runs last.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from datagen import make_tiny_model
from model_predict import predict
from PIL import Image
from services import MlflowServer, free_port

from ageray.config import Config, DataConfig
from ageray.data.transforms import decode_image, preprocess_for_eval
from ageray.model import load_model
from ageray.serving import ServeSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "ageray-test"
PREFIX = "/age"
NAME = "ageray-serve-test"
TOKEN_ENV = "AGERAY_TEST_TOKEN"
TOKEN = "s3cret-test-token"

# The base user_config of the test app (config.yaml's, with smaller warm-up and batches).
BASE_UC: dict[str, Any] = {
    "device": "cpu",
    "torch_threads": 1,
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.002,
    "max_inflight_images": 256,
    "retry_after_s": 1,
    "warmup_batch_sizes": [1],
    "auth_token_env": "AGERAY_NO_TOKEN_HERE",  # auth off unless a test turns it on
}


# --------------------------------------------------------------------------- model + registry


@dataclass
class Reference:
    """The same weights loaded in-process with plain ``load_model``: the answers the
    endpoint must reproduce (``model.predict`` on evaluation's preprocessing)."""

    model: Any
    data_cfg: Any


@dataclass
class Registry:
    uri: str
    refs: dict[str, Reference]  # version -> in-process model


@pytest.fixture(scope="module")
def registry(mlflow_srv: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Two versions registered through Tracker + log_model; alias ``prod`` -> version 1."""
    from ageray.tracking import Tracker, log_model

    tmp = tmp_path_factory.mktemp("serve-models")
    cfg = Config()
    cfg.run.name = "serve-test"
    cfg.run.storage_path = str(tmp / "runs")
    cfg.tracking.uri = mlflow_srv.uri
    cfg.tracking.experiment = "serve-test"
    cfg.tracking.registered_model = NAME
    cfg.tracking.alias = "candidate"
    tracker = Tracker(cfg)
    refs = {}
    for i, seed in enumerate((0, 1)):
        folder = make_tiny_model(tmp / f"v{i + 1}", seed)
        run_id = tracker.start_stage(f"stage2-{i}", resume=False)
        out = log_model(tracker, run_id, folder, metrics={"val_mae": 5.5 + i, "cmae": 7.25})
        tracker.end(run_id)
        model, info = load_model(folder)
        data = DataConfig(
            image_size=info["data"]["image_size"], normalize=info["data"]["normalize"]
        )
        refs[out["version"]] = Reference(model, data)
    assert sorted(refs) == ["1", "2"]
    tracker.client.set_registered_model_alias(NAME, "prod", "1")
    return Registry(mlflow_srv.uri, refs)


# --------------------------------------------------------------------------- the endpoint


@dataclass
class Endpoint:
    base: str
    registry: Registry
    config: dict[str, Any]
    user_config: dict[str, Any] = field(default_factory=lambda: dict(BASE_UC))
    options: dict[str, Any] = field(default_factory=dict)

    def deploy(
        self, user_config: dict[str, Any] | None = None, wait: bool = True, **options: Any
    ) -> None:
        """(Re)deploy serve/config.yaml's application with test overrides, as `serve run
        serve/config.yaml` does (client.deploy_apps). Same code + runtime_env: a changed
        user_config is applied in place through reconfigure."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        self.user_config = dict(user_config if user_config is not None else BASE_UC)
        self.options = options
        doc = copy.deepcopy(self.config)
        app = doc["applications"][0]
        app.update(name=APP, route_prefix=PREFIX)
        app["args"] = {}  # the model comes from AGERAY_MODEL_URI in the runtime env
        app["runtime_env"] = {
            "env_vars": {
                "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": self.registry.uri,
                "AGERAY_MODEL_URI": f"models:/{NAME}@prod",
                TOKEN_ENV: TOKEN,
            }
        }
        dep = app["deployments"][0]
        dep.pop("autoscaling_config")
        dep.update(num_replicas=1, ray_actor_options={"num_cpus": 0.5})
        dep.update(options)
        dep["user_config"] = self.user_config
        schema = ServeDeploySchema.model_validate(
            {"applications": [app], "proxy_location": "HeadOnly"}
        )
        _get_global_client().deploy_apps(schema, _blocking=True)
        if wait:
            wait_until(self.applied)
        if options:
            time.sleep(2.0)  # deployment options reach the proxy's router by long poll

    def applied(self) -> bool:
        """True once the replica runs with this user_config (reconfigure assigns the new
        settings last, after any model swap)."""
        info = self.model_info()
        if not info:
            return False
        serving = info["serving"]
        want_uri = self.user_config.get("model_uri", f"models:/{NAME}@prod")
        return info["uri"] == want_uri and all(
            json.dumps(serving.get(k)) == json.dumps(v)
            for k, v in self.user_config.items()
            if k in serving
        )

    def url(self, path: str) -> str:
        return self.base + path

    def model_info(self) -> dict[str, Any]:
        r = httpx.get(self.url("/v1/model"), headers={"Authorization": f"Bearer {TOKEN}"})
        return r.json() if r.status_code == 200 else {}


def wait_until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not met in time")


@pytest.fixture(scope="module")
def endpoint(ray_local: None, registry: Registry) -> Iterator[Endpoint]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    ep = Endpoint(f"http://127.0.0.1:{port}{PREFIX}", registry, config)
    ep.deploy()
    yield ep
    serve.delete(APP)
    serve.shutdown()


# --------------------------------------------------------------------------- images


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 256))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def faces() -> list[bytes]:
    """Synthetic faces (JPEG, like the training data) plus odd modes and tiny sizes."""
    from ageray.data.synthetic import iter_synthetic

    out = [r.image for r in iter_synthetic(num_samples=16, image_size=96, seed=3)]
    rgb = Image.open(io.BytesIO(out[0])).convert("RGB")
    out += [
        encode(rgb.convert("L")),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb.convert("RGBA")),
        encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)),  # 16-bit
        encode(rgb.resize((1, 1))),
        encode(rgb.resize((8, 8)), "JPEG"),
    ]
    return out


def reference(ref: Reference, data: bytes) -> dict[str, Any]:
    """In-process answer: evaluation's decode + preprocess_for_eval, then model.predict
    (image + flip, both heads, AR) on the plainly loaded model; no Serve code involved."""
    x = preprocess_for_eval([decode_image(data, target_size=ref.data_cfg.image_size)], ref.data_cfg)
    pred = predict(ref.model, x, flip=True, rule="smaller")
    return {
        "age": float(pred.age[0]),
        "head": "balanced" if int(pred.head[0]) else "vanilla",
        "heads": {
            n: {"age": float(h["age"][0]), "kl": float(h["kl"][0])} for n, h in pred.heads.items()
        },
        "probs": pred.probs[0],
    }


def assert_matches(answer: dict[str, Any], ref: dict[str, Any]) -> None:
    assert abs(answer["age"] - ref["age"]) <= 1e-4, (answer["age"], ref["age"])
    assert answer["head"] == ref["head"]
    for name in ("vanilla", "balanced"):
        assert abs(answer["heads"][name]["age"] - ref["heads"][name]["age"]) <= 1e-4
        assert answer["heads"][name]["kl"] == pytest.approx(ref["heads"][name]["kl"], abs=1e-6)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- tests


def test_readyz_is_503_before_the_model_is_loaded() -> None:
    """Serve routes nothing to a replica before its constructor returns, so the not-ready
    branch is exercised on the deployment class directly."""
    from serve.app import AgeEstimator

    replica = SimpleNamespace(_ready=False, _served=None, _settings=ServeSettings())
    resp = asyncio.run(AgeEstimator.func_or_class.readyz(replica))
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert json.loads(resp.body)["error"]["code"] == "not_ready"


def test_health_ready_and_model(endpoint: Endpoint) -> None:
    assert httpx.get(endpoint.url("/healthz")).json() == {"status": "ok"}
    ready = httpx.get(endpoint.url("/readyz"))
    assert ready.status_code == 200 and ready.json()["model"]["version"] == "1"
    info = httpx.get(endpoint.url("/v1/model")).json()
    assert (info["name"], info["version"], info["alias"]) == (NAME, "1", "prod")
    assert info["uri"] == f"models:/{NAME}@prod"
    assert info["metrics"] == {"val_mae": 5.5, "cmae": 7.25}
    assert info["run_id"]
    assert info["config"]["model"]["backbone"] == "resnet18"
    assert info["config"]["data"] == {"image_size": 64, "normalize": "imagenet"}
    assert info["config"]["heads"] == ["vanilla", "balanced"]
    assert info["serving"]["max_batch_size"] == 16 and info["serving"]["auth"] is False
    docs = httpx.get(endpoint.url("/docs"))
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(endpoint.url("/openapi.json")).json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])


def test_predict_every_input_form(endpoint: Endpoint, registry: Registry, faces) -> None:
    ref_model = registry.refs["1"]
    face = faces[0]
    ref = reference(ref_model, face)
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    with httpx.Client(timeout=30) as c:
        answers = [
            c.post(url, files={"file": ("f.jpg", face, "image/jpeg")}),
            c.post(url, files={"image": ("f.jpg", face, "image/jpeg")}),
            c.post(url, content=face, headers={"content-type": "image/jpeg"}),
            c.post(url, content=face, headers={"content-type": "application/octet-stream"}),
            c.post(url, json={"image": b64(face)}),
        ]
        for r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            assert_matches(body, ref)
            assert body["model"] == {
                "name": NAME,
                "version": "1",
                "alias": "prod",
                "uri": f"models:/{NAME}@prod",
            }
            assert set(body["timing_ms"]) == {"read", "decode", "queue", "forward", "total"}
            assert "distribution" not in body and "face" not in body
        r = c.post(url + "&distribution=true", content=face, headers={"content-type": "image/png"})
        dist = r.json()["distribution"]
        assert len(dist) == 101 and abs(sum(dist) - 1) < 1e-4
        assert np.allclose(dist, ref["probs"].numpy(), atol=1e-5)
        for chunk in (faces[:16], faces[16:]):  # at most max_images=16 per request
            many = c.post(url, json={"images": [b64(f) for f in chunk]}).json()["predictions"]
            assert len(many) == len(chunk)
            for answer, data in zip(many, chunk):  # in order, every mode and size answered
                assert_matches(answer, reference(ref_model, data))


def bad_requests(faces: list[bytes]) -> list[tuple[str, dict[str, Any], int, str]]:
    """(what, httpx request kwargs, status, error code) for every bad-input class."""
    jpeg = faces[0]
    over = b"\xff\xd8\xff" + b"\0" * (10 * 1024 * 1024)  # just over the 10 MB default
    raw = {"content-type": "image/jpeg"}
    js = {"content-type": "application/json"}
    mp = {"content-type": "multipart/form-data; boundary=x"}
    text = {"content-type": "text/plain"}
    photo = {"photo": ("f.jpg", jpeg, "image/jpeg")}
    media, pixels = "unsupported_media_type", "too_many_pixels"
    return [
        ("empty body", {"content": b"", "headers": raw}, 400, "empty_body"),
        ("empty multipart", {"content": b"", "headers": mp}, 400, "empty_body"),
        ("not an image", {"content": b"GIF? no: plain text", "headers": raw}, 400, "not_an_image"),
        ("truncated", {"content": jpeg[: len(jpeg) // 2], "headers": raw}, 400, "truncated_image"),
        ("wrong type", {"content": jpeg, "headers": text}, 415, media),
        ("form urlencoded", {"data": {"image": "abc"}}, 415, media),
        ("no content type", {"content": jpeg}, 415, media),
        ("over 10 MB", {"content": over, "headers": raw}, 413, "payload_too_large"),
        ("pixel bomb", {"content": png_header_only(20_000, 20_000), "headers": raw}, 413, pixels),
        ("pillow bomb", {"content": png_header_only(10**5, 10**5), "headers": raw}, 413, pixels),
        ("malformed json", {"content": b'{"image": ', "headers": js}, 400, "malformed_json"),
        ("deep json", {"content": b"[" * 100_000, "headers": js}, 400, "malformed_json"),
        ("json array", {"json": [b64(jpeg)]}, 422, "invalid_request"),
        ("unknown field", {"json": {"img": b64(jpeg)}}, 422, "invalid_request"),
        ("malformed base64", {"json": {"image": "@@not-base64@@"}}, 400, "malformed_base64"),
        ("base64 of text", {"json": {"image": b64(b"hello")}}, 400, "not_an_image"),
        ("too many images", {"json": {"images": [b64(jpeg)] * 17}}, 413, "too_many_images"),
        ("no file field", {"files": photo}, 422, "missing_image"),
        ("bad query", {"content": jpeg, "headers": raw, "params": {"distribution": "maybe"}}, 422,
         "invalid_request"),
        ("bad faces", {"content": jpeg, "headers": raw, "params": {"faces": "some"}}, 422,
         "invalid_request"),
        ("bad faces field", {"json": {"image": b64(jpeg), "faces": "most"}}, 422,
         "invalid_request"),
    ]  # fmt: skip


def test_every_bad_input_is_a_named_4xx(endpoint: Endpoint, faces) -> None:
    url = endpoint.url("/v1/predict")
    loaded_at = endpoint.model_info()["loaded_at"]
    with httpx.Client(timeout=60) as c:
        for what, kwargs, status, code in bad_requests(faces):
            r = c.post(url, **kwargs)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (what, r.text)
            assert len(r.json()["error"]["message"]) > 20, what
        assert c.get(url).status_code == 405
        assert c.get(endpoint.url("/v2/predict")).json()["error"]["code"] == "not_found"
    # the replica stayed healthy and was never restarted
    assert httpx.get(endpoint.url("/readyz")).status_code == 200
    assert endpoint.model_info()["loaded_at"] == loaded_at


def _mutants(faces: list[bytes], rng: random.Random) -> Iterator[tuple[dict[str, Any], set[int]]]:
    """Malformed requests, each with the set of statuses it may get (all 4xx, or 200 for a
    mangled image that still decodes: then only the answer's shape is checked)."""
    raw = {"content-type": "image/jpeg"}
    js = {"content-type": "application/json"}
    while True:
        face = rng.choice(faces)
        kind = rng.randrange(16)
        if kind == 0:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 3000)))
            yield {"content": body, "headers": raw}, {400}
        elif kind == 1:
            yield (
                {"content": face[: rng.randrange(0, len(face) // 2)], "headers": raw},
                {400},
            )
        elif kind == 2:
            b = bytearray(face)
            for _ in range(rng.randrange(1, 20)):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            yield {"content": bytes(b), "headers": raw}, {200, 400}
        elif kind == 3:
            ctype = rng.choice(["text/plain", "application/xml", "video/mp4", "foo/bar", ""])
            yield {"content": face, "headers": {"content-type": ctype}}, {415}
        elif kind == 4:
            text = json.dumps({"image": b64(face)})
            yield {"content": text[: rng.randrange(1, len(text))].encode(), "headers": js}, {400}
        elif kind == 5:
            s = list(b64(face))
            for _ in range(rng.randrange(1, 5)):
                s[rng.randrange(len(s))] = rng.choice("!@#$%^&*()")
            yield {"json": {"image": "".join(s)}}, {400}
        elif kind == 6:
            value = rng.choice([None, 3, 1.5, [], {}, True, ["x"], {"a": 1}])
            yield {"json": {rng.choice(["image", "images"]): value}}, {400, 422}
        elif kind == 7:
            yield {"json": {"images": [b64(face)] * rng.randrange(17, 40)}}, {413}
        elif kind == 8:
            body = b"--b\r\n" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 500)))
            ctype = rng.choice(["multipart/form-data; boundary=b", "multipart/form-data"])
            yield {"content": body, "headers": {"content-type": ctype}}, {400, 422}
        elif kind == 9:
            yield (
                {"content": png_header_only(rng.randrange(6000, 90000), 9000), "headers": raw},
                {413},
            )
        elif kind == 10:
            yield (
                {
                    "content": face,
                    "headers": raw,
                    "params": {"distribution": "x" * rng.randrange(1, 9)},
                },
                {422},
            )
        elif kind == 11:
            yield {"content": b"", "headers": rng.choice([raw, js])}, {400}
        elif kind == 12:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
            yield {"json": {"images": [b64(face), b64(blob)]}}, {400}
        elif kind == 13:
            depth = rng.randrange(1000, 50000)
            yield {"content": b'{"image": ' + b"[" * depth, "headers": js}, {400}
        elif kind == 14:
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300)))
            yield {"content": junk, "headers": js}, {400, 422}
        else:
            yield (
                {
                    "files": {
                        "file": ("x.jpg", face[: rng.randrange(0, len(face) // 2)], "image/jpeg")
                    }
                },
                {400},
            )


def _valid(faces: list[bytes], rng: random.Random) -> tuple[dict[str, Any], list[int]]:
    i = rng.randrange(len(faces))
    form = rng.randrange(4)
    if form == 0:
        return {"files": {"file": ("f.jpg", faces[i], "image/jpeg")}}, [i]
    if form == 1:
        return {"content": faces[i], "headers": {"content-type": "image/jpeg"}}, [i]
    if form == 2:
        return {"json": {"image": b64(faces[i])}}, [i]
    idx = [rng.randrange(len(faces)) for _ in range(rng.randrange(2, 5))]
    return {"json": {"images": [b64(faces[j]) for j in idx]}}, idx


def test_fuzz_never_5xx_and_valid_answers_match(endpoint: Endpoint, registry: Registry, faces):
    """1,200 malformed requests mixed with 400 valid ones from 8 concurrent clients: no 5xx,
    every malformed one a 4xx it may get, every valid answer equal to in-process predict."""
    ref_model = registry.refs["1"]
    refs = [reference(ref_model, f) for f in faces]
    rng = random.Random(1234)
    mutants = _mutants(faces, rng)
    jobs: list[tuple[dict[str, Any], set[int] | None, list[int] | None]] = []
    for _ in range(1200):
        kwargs, allowed = next(mutants)
        jobs.append((kwargs, allowed, None))
    for _ in range(400):
        kwargs, idx = _valid(faces, rng)
        jobs.append((kwargs, None, idx))
    rng.shuffle(jobs)
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    failures: list[str] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def worker(part: list[tuple[dict[str, Any], set[int] | None, list[int] | None]]) -> None:
        with httpx.Client(timeout=60) as c:
            for kwargs, allowed, idx in part:
                r = c.post(url, **kwargs)
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                problem = None
                if idx is not None:
                    if r.status_code != 200:
                        problem = f"valid request got {r.status_code}: {r.text[:200]}"
                    else:
                        body = r.json()
                        preds = (
                            body["predictions"] if len(idx) > 1 or "predictions" in body else [body]
                        )
                        for p, j in zip(preds, idx):
                            try:
                                assert_matches(p, refs[j])
                            except AssertionError as exc:
                                problem = f"answer differs for face {j}: {exc}"
                elif r.status_code not in allowed:
                    problem = f"{r.status_code} not in {allowed}: {r.text[:200]}"
                elif r.status_code == 200:
                    assert isinstance(r.json()["age"], float)
                else:
                    err = r.json()["error"]
                    assert err["code"] and err["message"]
                if problem:
                    with lock:
                        failures.append(problem)

    threads = [threading.Thread(target=worker, args=(jobs[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [s for s in statuses if s >= 500], statuses
    assert not failures, failures[:5]
    assert sum(statuses.values()) == 1600
    assert httpx.get(endpoint.url("/readyz")).status_code == 200


def test_auth_on_and_off(endpoint: Endpoint, faces) -> None:
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    raw = {"content-type": "image/jpeg"}
    try:
        endpoint.deploy({**BASE_UC, "auth_token_env": TOKEN_ENV})
        with httpx.Client(timeout=30) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = c.post(url, content=faces[0], headers={**raw, **headers})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert c.get(endpoint.url("/v1/model"), headers=headers).status_code == 401
            ok = {"Authorization": f"Bearer {TOKEN}"}
            assert c.post(url, content=faces[0], headers={**raw, **ok}).status_code == 200
            assert c.get(endpoint.url("/v1/model"), headers=ok).json()["serving"]["auth"]
            # health endpoints and docs stay open
            assert c.get(endpoint.url("/healthz")).status_code == 200
            assert c.get(endpoint.url("/readyz")).status_code == 200
            assert c.get(endpoint.url("/docs")).status_code == 200
    finally:
        endpoint.deploy(BASE_UC)
    assert httpx.post(url, content=faces[0], headers=raw).status_code == 200


async def _burst(url: str, n: int, **kwargs: Any) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        return await asyncio.gather(*(c.post(url, **kwargs) for _ in range(n)))


def test_overload_is_503_with_retry_after(endpoint: Endpoint, faces) -> None:
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    body = {"json": {"images": [b64(f) for f in faces[:16]]}}
    try:
        # 1. the replica's own admission limit (in-flight images): JSON 503 + Retry-After
        endpoint.deploy({**BASE_UC, "max_inflight_images": 16, "max_batch_size": 4})
        responses = asyncio.run(_burst(url, 24, **body))
        codes = sorted({r.status_code for r in responses})
        assert codes == [200, 503], codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
        # 2. Serve's queue limit (max_queued_requests): 503 + Retry-After from the proxy
        endpoint.deploy(BASE_UC, max_ongoing_requests=1, max_queued_requests=1)
        responses = asyncio.run(_burst(url, 24, **body))
        codes = sorted({r.status_code for r in responses})
        assert codes == [200, 503], codes
        assert all(r.headers.get("Retry-After") == "1" for r in responses if r.status_code == 503)
    finally:
        endpoint.deploy(BASE_UC)
    assert httpx.get(endpoint.url("/readyz")).status_code == 200


def test_failed_swap_keeps_the_old_model(endpoint: Endpoint, faces) -> None:
    """A user_config naming a version that does not exist must not take the service down:
    the old model keeps answering and /v1/model says what went wrong."""
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    raw = {"content-type": "image/jpeg"}
    try:
        endpoint.deploy({**BASE_UC, "model_uri": f"models:/{NAME}/99"}, wait=False)
        wait_until(lambda: endpoint.model_info().get("swap_error"))
        info = endpoint.model_info()
        assert info["version"] == "1" and f"models:/{NAME}/99" in info["swap_error"]
        r = httpx.post(url, content=faces[0], headers=raw)
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
    finally:
        endpoint.deploy(BASE_UC)
    assert endpoint.model_info()["swap_error"] is None


def test_multitask_model_answers_gender_and_race(endpoint: Endpoint, faces, tmp_path: Path) -> None:
    """A multi-task model (Xing's parallel net) answers gender and race (label, code,
    probabilities) through the endpoint, and /openapi.json documents both fields."""
    from ageray.data.labels import GENDERS, RACES
    from ageray.model import build_model, save_model

    cfg = Config()
    cfg.data.image_size = 64
    cfg.model.backbone, cfg.model.head = "test_resnet", "linear"
    cfg.model.formulation, cfg.model.multitask = "mae", "parallel"
    folder = save_model(build_model(cfg), tmp_path / "parallel", cfg)
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    try:
        endpoint.deploy({**BASE_UC, "model_uri": str(folder)}, wait=False)
        wait_until(
            lambda: (
                (endpoint.model_info().get("config") or {}).get("model", {}).get("multitask")
                == "parallel"
            )
        )
        r = httpx.post(url, content=faces[0], headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        answer = r.json()
        for trait, names in (("gender", GENDERS), ("race", RACES)):
            got = answer[trait]
            assert len(got["probs"]) == len(names)
            assert sum(got["probs"]) == pytest.approx(1.0, abs=1e-5)
            assert got["index"] == int(np.argmax(got["probs"]))
            assert got["label"] == names[got["index"]]
    finally:
        endpoint.deploy(BASE_UC)
    assert endpoint.model_info()["version"] == "1"
    schema = httpx.get(endpoint.url("/openapi.json")).json()
    ok = schema["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]
    flat = [
        o for o in ok["application/json"]["schema"]["oneOf"] if "age" in o.get("properties", {})
    ]
    one = flat[0]["properties"]
    assert one["gender"]["properties"]["label"]["enum"] == list(GENDERS)
    assert one["race"]["properties"]["label"]["enum"] == list(RACES)


@pytest.mark.realdata
def test_every_face_of_a_photo(endpoint: Endpoint, utkface_tar: Path) -> None:
    """Issue 23: a photo of three real UTKFace faces (child, adult, elderly) answers three
    faces (the default, faces=all) whose boxes cover the sources and whose ages equal each
    face's answer when its chip is sent alone; a wall answers no face with a reason; 1x1 and
    10000x1 images say they hold no usable face. The schema in /openapi.json validates it."""
    import jsonschema
    from faces import compose_photo, covers, utk_faces_by_band, wall_photo

    from ageray.serving.schema import FACES_SCHEMA, PREDICTION_SCHEMA

    chips = [v[0][2] for v in utk_faces_by_band(utkface_tar).values()]
    photo, boxes = compose_photo(chips)
    url = endpoint.url("/v1/predict")
    with httpx.Client(timeout=120) as c:
        got = c.post(url, content=photo, headers={"content-type": "image/png"})
        assert got.status_code == 200, got.text
        body = got.json()
        jsonschema.Draft202012Validator(FACES_SCHEMA).validate(body)
        assert body["reason"] is None and body["image"] == {"width": 880, "height": 320}
        assert [f["index"] for f in body["faces"]] == [0, 1, 2] and body["batch_size"] >= 3
        alone = c.post(url, json={"images": [b64(chip) for chip in chips]}).json()["predictions"]
        for source, single in zip(boxes, alone):
            (face,) = [f for f in body["faces"] if covers(f["box"], source)]
            (chip_face,) = single["faces"]
            assert abs(face["age"] - chip_face["age"]) <= 0.5, (face["age"], chip_face["age"])
            assert len(face["landmarks"]) == 5 and face["score"] >= 0.9
        wall = c.post(url, content=wall_photo(), headers={"content-type": "image/jpeg"}).json()
        assert wall["faces"] == [] and wall["reason"].startswith("no face with score >= 0.9")
        for w, h in ((1, 1), (10000, 1)):
            tiny = encode(Image.new("RGB", (w, h), (90, 90, 90)))
            none = c.post(url, content=tiny, headers={"content-type": "image/png"}).json()
            assert none["faces"] == [] and "no face can be read" in none["reason"]
            flat = c.post(url, json={"image": b64(tiny), "faces": "largest"}).json()
            jsonschema.Draft202012Validator(PREDICTION_SCHEMA).validate(flat)
            assert isinstance(flat["age"], float) and f"{w}x{h} px" in flat["quality"]
    spec = httpx.get(endpoint.url("/openapi.json")).json()["paths"]["/v1/predict"]["post"]
    (param,) = [p for p in spec["parameters"] if p["name"] == "faces"]
    assert param["schema"]["enum"] == ["all", "largest"] and param["schema"]["default"] == "all"
    answers = spec["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert answers[0]["properties"]["faces"]["items"]["required"][:4] == [
        "index", "box", "landmarks", "score"
    ]  # fmt: skip


def test_alias_move_is_picked_up_with_reload(endpoint: Endpoint, registry: Registry) -> None:
    """models:/<name>@prod stays the URI; moving the alias and bumping `reload` in
    user_config swaps the version in place."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    try:
        client.set_registered_model_alias(NAME, "prod", "2")
        endpoint.deploy({**BASE_UC, "reload": "1"})
        info = endpoint.model_info()
        assert (info["version"], info["alias"], info["uri"]) == (
            "2",
            "prod",
            f"models:/{NAME}@prod",
        )
    finally:
        client.set_registered_model_alias(NAME, "prod", "1")
        endpoint.deploy({**BASE_UC, "reload": "2"})
    assert endpoint.model_info()["version"] == "1"


def test_model_swap_under_load_loses_nothing(endpoint: Endpoint, registry: Registry, faces):
    """Clients keep sending while user_config points the app at version 2: every request
    succeeds, each answer equals the in-process answer of the version it names, and once
    the redeploy returns every answer comes from version 2."""
    refs = {v: [reference(m, f) for f in faces[:16]] for v, m in registry.refs.items()}
    url = endpoint.url("/v1/predict?faces=largest")  # flat answers
    results: list[tuple[float, int, dict[str, Any] | str, int]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                i = rng.randrange(16)
                t = time.time()
                r = c.post(url, content=faces[i], headers={"content-type": "image/jpeg"})
                with lock:
                    results.append(
                        (t, r.status_code, r.json() if r.status_code == 200 else r.text, i)
                    )

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    endpoint.deploy({**BASE_UC, "model_uri": f"models:/{NAME}/2"})
    swapped = time.time()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not [r for r in results if r[1] != 200], [r for r in results if r[1] != 200][:3]
    versions = [r[2]["model"]["version"] for r in results]
    assert set(versions) == {"1", "2"}, set(versions)
    for _, _, body, i in results:
        assert_matches(body, refs[body["model"]["version"]][i])
    after = [r for r in results if r[0] > swapped]
    assert after and all(r[2]["model"]["version"] == "2" for r in after)
    info = endpoint.model_info()
    assert (info["version"], info["uri"]) == ("2", f"models:/{NAME}/2")
    assert info["metrics"] == {"val_mae": 6.5, "cmae": 7.25}
