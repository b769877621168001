"""The edge guard is on under ``serve deploy serve/config.yaml`` (the production path).

A Ray head started with ``ray start --head`` (tests/services.py ``ray_head``, nothing of
ageray's in its environment but the code on PYTHONPATH, as an image would have it), then
``serve deploy`` of serve/config.yaml with only what a test must change (a tiny model on
disk, loopback, one CPU replica). Nothing else turns the guard on: the file's
``controller_options`` must.

Held to: 4x the replica's request slots (``max_ongoing_requests`` from the file) taken by
slow-loris clients, half with a stalled body and half with stalled headers, leave a valid
prediction, ``/readyz`` and ``/healthz`` answering within 2 s; the stalled headers are
cut off by the header deadline; a very long URL and an oversized header block get the
JSON envelope as 414 and 431.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from datagen import make_tiny_model
from PIL import Image
from services import BIN, free_port, ray_head

from ageray.serving import Limits
from ageray.serving.guard import EDGE_ENV, EDGE_LIMITS_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 2.0


def _config(model: Path, port: int) -> dict:
    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["http_options"].update(host="127.0.0.1", port=port)
    app = doc["applications"][0]
    app["args"] = {"model_uri": str(model)}
    dep = app["deployments"][0]
    dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=1)
    dep["user_config"].update(
        device="cpu", backend="torch", warmup_batch_sizes=[1], model_poll_s=0, max_batch_size=8
    )
    return doc


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    tmp = tmp_path_factory.mktemp("deploy-guard")
    model = make_tiny_model(tmp / "model", seed=0)
    port = free_port()
    doc = _config(model, port)
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    for var in (EDGE_ENV, EDGE_LIMITS_ENV):
        os.environ.pop(var, None)
    env: dict[str, str] = {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        "RAY_raylet_start_wait_time_s": "120",  # a busy shared machine starts slowly
    }
    with ray_head(tmp, num_cpus=2, env=env) as address:
        cli = {**os.environ, **env}
        cli.pop(EDGE_ENV, None)
        done = subprocess.run(
            [str(BIN / "serve"), "deploy", str(cfg), "--address", address],
            env=cli,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "serve deploy: /readyz never answered 200"
            time.sleep(1)
        try:
            yield base, doc
        finally:
            subprocess.run(
                [str(BIN / "serve"), "shutdown", "-y", "--address", address],
                env=cli,
                capture_output=True,
                timeout=120,
            )


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (150, 110, 90)).save(buf, "JPEG")
    return buf.getvalue()


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _timed(call) -> tuple[int, float]:
    t0 = time.monotonic()
    status = call().status_code
    return status, time.monotonic() - t0


def test_stalled_uploads_do_not_hold_the_deployment(deployed: tuple[str, dict]) -> None:
    """The issue's "Done when" for serve deploy: 4x the request slots held by stalled
    uploads (bodies and headers); valid requests and /readyz answer within 2 s."""
    base, doc = deployed
    slots = doc["applications"][0]["deployments"][0]["max_ongoing_requests"]
    n = 4 * slots
    stalled: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", _port(base)), timeout=30)
            if i % 2:  # slow-loris body: headers, 100 of 100,000 bytes, then nothing
                s.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: 100000\r\n\r\n\xff\xd8" + b"\0" * 98
                )
            else:  # slow-loris headers: half a header block, then nothing
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            stalled.append(s)
        time.sleep(0.5)
        data = jpeg()
        with httpx.Client(timeout=30) as c:
            ready = _timed(lambda: c.get(base + "/readyz"))
            health = _timed(lambda: c.get(base + "/healthz"))
            predict = _timed(
                lambda: c.post(
                    base + "/v1/predict", content=data, headers={"content-type": "image/jpeg"}
                )
            )
        # the header deadline closes the stalled-header connections (408 JSON)
        s = stalled[0]
        s.settimeout(Limits().header_timeout_s + 10)
        t0 = time.monotonic()
        answer = s.recv(4096)
        cut_after = time.monotonic() - t0
    finally:
        for s in stalled:
            s.close()
    print(
        f"\nserve deploy, {n} stalled uploads: /readyz {ready[1]:.3f}s, /healthz "
        f"{health[1]:.3f}s, predict {predict[1]:.3f}s; stalled headers cut after "
        f"{cut_after:.1f}s more"
    )
    assert ready[0] == health[0] == predict[0] == 200
    assert max(ready[1], health[1], predict[1]) < BOUND_S
    assert answer.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in answer, answer[:300]


def test_http_layer_errors_are_json(deployed: tuple[str, dict]) -> None:
    base, _ = deployed
    with httpx.Client(timeout=30) as c:
        r = c.get(base + "/readyz?" + "q" * 30_000)  # httpx itself refuses > 64 KiB
        assert r.status_code == 414 and r.json()["error"]["code"] == "uri_too_long"
        r = c.get(base + "/readyz", headers={"x-big": "a" * 200_000})
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        r = c.get(base + "/readyz", headers={f"x-h{i}": "v" for i in range(150)})
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        assert c.get(base + "/readyz").status_code == 200


def test_300_concurrent_clients_are_answered_or_shed_within_the_bound(
    deployed: tuple[str, dict],
) -> None:
    """Shed, don't queue: 300 single-image requests at once; each gets 200 or 503 +
    Retry-After (the JSON envelope), none later than the admission bound + margin."""
    import asyncio

    base, _ = deployed
    bound = Limits().admission_timeout_s
    margin = 3.0  # event-loop lag on a busy 2-core machine
    data = jpeg()

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str]:
        t0 = time.monotonic()
        r = await client.post(
            base + "/v1/predict", content=data, headers={"content-type": "image/jpeg"}
        )
        code = r.json()["error"]["code"] if r.status_code != 200 else ""
        assert r.status_code != 503 or r.headers.get("retry-after"), r.text
        return r.status_code, time.monotonic() - t0, code

    async def main() -> list[tuple[int, float, str]]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(300)))

    results = asyncio.run(main())
    statuses = {s for s, _, _ in results}
    slowest = max(t for _, t, _ in results)
    codes = sorted({c for _, _, c in results if c})
    n200 = sum(s == 200 for s, _, _ in results)
    print(f"\n300 clients: {n200} x 200, {300 - n200} x 503 {codes}; slowest {slowest:.2f}s")
    assert statuses <= {200, 503}, statuses
    assert n200 > 0
    assert slowest <= bound + margin
