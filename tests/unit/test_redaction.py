"""No credentials in tracking: the redaction rule, the tracking health check that sends a
URI's user:password as a header, and a Tracker writing into a real (sqlite) MLflow store with
credentials in every place it reads them: the environment, URIs and the config. Everything
that store then holds (params, tags, every artifact) is read back and searched."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
from pathlib import Path

import pytest

from ageray.config import load_config
from ageray.redaction import (
    RedactingFilter,
    http_request,
    redact,
    redact_data,
    redacted_path,
    strip_userinfo,
)

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN0123456789"
MLFLOW_PASSWORD = "mlflow-pa55word-from-env"
URI_PASSWORD = "uri-pa55word-in-config"
S3_KEY_SECRET = "s3-url-secret-key-999"
ENV = {
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
    "AWS_DEFAULT_REGION": "us-east-1-not-secret",
}
SECRETS = (AWS_SECRET, SESSION_TOKEN, MLFLOW_PASSWORD, URI_PASSWORD, S3_KEY_SECRET)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:s3cr3t@mlflow:5000", "http://***@mlflow:5000"),
        ("https://token@mlflow.example/api", "https://***@mlflow.example/api"),
        ("postgresql://u:p@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("s3://AKIAEXAMPLE:secret@bucket/shards", "s3://***@bucket/shards"),
        (
            "failed: see http://a:b@h:1/x and https://c:d@e/",
            "failed: see http://***@h:1/x and https://***@e/",
        ),
        (
            "https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1"
            "&X-Amz-Signature=abc123&X-Amz-Security-Token=zzz",
            "https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=***"
            "&X-Amz-Signature=***&X-Amz-Security-Token=***",
        ),
        ("http://mlflow:5000/?apikey=k1&page=2", "http://mlflow:5000/?apikey=***&page=2"),
        # nothing to hide: unchanged
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("models:/ageray@candidate", "models:/ageray@candidate"),
        ("runs:/0123/model", "runs:/0123/model"),
        ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
        ("/data/shards/utkface?x=1", "/data/shards/utkface?x=1"),
        ("email bob@example.org", "email bob@example.org"),
    ],
)
def test_redact_uris(text: str, expected: str) -> None:
    assert redact(text, environ={}) == expected


def test_secret_environment_values_are_replaced_wherever_they_appear() -> None:
    env = {**ENV, "MOTO_SECRET": "testing"}  # short placeholders are left alone
    text = f"key={AWS_SECRET} token {SESSION_TOKEN}; region us-east-1-not-secret; testing"
    assert redact(text, environ=env) == "key=*** token ***; region us-east-1-not-secret; testing"
    nested = {"a": [f"x{MLFLOW_PASSWORD}y", 3], "b": (None, "http://u:p@h")}
    assert redact_data(nested, environ=env) == {"a": ["x***y", 3], "b": (None, "http://***@h")}


def test_userinfo_becomes_a_basic_auth_header() -> None:
    assert strip_userinfo("http://al%40ice:p%3Ass@127.0.0.1:5000/x?q=1") == (
        "http://127.0.0.1:5000/x?q=1",
        ("al@ice", "p:ss"),
    )
    assert strip_userinfo("http://[::1]:5000/") == ("http://[::1]:5000/", None)
    request = http_request("https://alice:s3cr3t@mlflow:5000/health")
    assert request.full_url == "https://mlflow:5000/health"
    assert request.get_header("Authorization") == "Basic YWxpY2U6czNjcjN0"


def test_check_tracking_sends_the_uri_credentials_as_a_header_and_never_prints_them() -> None:
    """A real HTTP server on loopback that answers /health only with the right credentials;
    urllib would otherwise take ``user:password@127.0.0.1`` for the host name."""
    from ageray.tracking import TrackingUnavailable, check_tracking

    seen: list[tuple[str, str | None]] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == "Basic YWxpY2U6czNjcjN0"
            self.send_response(200 if ok else 500)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_tracking(f"http://alice:s3cr3t@127.0.0.1:{port}", timeout=5)
        assert seen[0] == ("/health", "Basic YWxpY2U6czNjcjN0")
        with pytest.raises(TrackingUnavailable) as err:
            check_tracking(f"http://alice:wrong-pa55word@127.0.0.1:{port}", timeout=1)
        assert f"http://***@127.0.0.1:{port}" in str(err.value)
        assert "wrong-pa55word" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_redacted_path_copies_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "report.json").write_text('{"mae": 4.2}')
    with redacted_path(clean) as p:
        assert p == clean
    folder = tmp_path / "evaluation"
    (folder / "sub").mkdir(parents=True)
    (folder / "report.md").write_text(f"tracking http://bob:{URI_PASSWORD}@mlflow:5000\n")
    (folder / "sub" / "config.yaml").write_text(f"aws: {AWS_SECRET}\n")
    png = bytes(range(256)) + AWS_SECRET.encode()  # binary files are copied as they are
    (folder / "plot.png").write_bytes(png)
    with redacted_path(folder) as p:
        assert p != folder and p.name == "evaluation"
        assert (p / "report.md").read_text() == "tracking http://***@mlflow:5000\n"
        assert (p / "sub" / "config.yaml").read_text() == "aws: ***\n"
        assert (p / "plot.png").read_bytes() == png
        copy = p
    assert not copy.exists()  # the copy is gone after the upload
    assert URI_PASSWORD in (folder / "report.md").read_text()  # the local file is untouched


def test_log_records_are_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    try:
        logger.warning("API request to %s failed", "http://alice:s3cr3t@mlflow:5000/api")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "API request to http://***@mlflow:5000/api failed\n"


def test_tracker_stores_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the environment (AWS, MLflow), in URIs inside the config (shards on S3
    with keys in the URL, a Ray address with a password, a presigned pretrained-weights
    URL) and in what the jobs log (params, tags, a manifest, an evaluation folder): the
    sqlite store holds none of them afterwards, and holds the redacted forms."""
    from mlflow.tracking import MlflowClient

    from ageray.tracking import Tracker

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://carol:{URI_PASSWORD}@unused:5000")
    shards = f"s3://AKIAEXAMPLEKEYID:{S3_KEY_SECRET}@bucket/shards"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        [
            f"tracking.uri={uri}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"data.shards={shards}",
            f"ray.address=ray://admin:{URI_PASSWORD}@head:10001",
            f"model.pretrained=https://w.example/r18.pth?X-Amz-Security-Token={SESSION_TOKEN}",
        ],
    )
    tracker = Tracker(cfg)
    parent = tracker.start_pipeline("train")
    stage = tracker.start_stage("stage1")
    tracker.log_params(stage, {"stage2.init_model": shards, "note": AWS_SECRET})
    tracker.set_tags(stage, {"ageray.error": f"read {shards} failed: {MLFLOW_PASSWORD}"})
    tracker.log_manifest(parent, {"source": shards, "options": {"token": SESSION_TOKEN}}, "s")
    report = tmp_path / "eval"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"shards": shards, "aws": AWS_SECRET}))
    (report / "plot.png").write_bytes(b"\x89PNG\r\n")
    tracker.log_artifact(parent, report, "evaluation")
    tracker.log_artifact(stage, report / "report.json")
    tracker.end(stage)
    tracker.end(parent)

    client = MlflowClient(uri)
    stored: list[str] = []
    for run_id in (parent, stage):
        run = client.get_run(run_id)
        stored += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / f"dl-{run_id}")))
        files = [p for p in local.rglob("*") if p.is_file()]
        assert files
        stored += [p.read_bytes().decode("utf-8", "replace") for p in files]
    blob = "\n".join(stored)
    for secret in (*SECRETS, "AKIAEXAMPLEKEYID", "carol", "admin:"):
        assert secret not in blob, secret
    params = client.get_run(parent).data.params
    assert params["data.shards"] == "s3://***@bucket/shards"
    assert params["ray.address"] == "ray://***@head:10001"
    assert params["model.pretrained"].endswith("r18.pth?X-Amz-Security-Token=***")
    assert "\n  shards: s3://***@bucket/shards\n" in blob  # config/resolved.yaml
    assert "read s3://***@bucket/shards failed: ***" in blob  # the tag


# ------------------------------------------------------------------ at every exit (issue 21)


def test_bare_userinfo_and_remembered_uri_parts_are_redacted() -> None:
    """How libraries quote a URI's parts in their errors: botocore names the "bucket"
    ``KEY:SECRET@bucket``, others quote the password alone or URL-decoded."""
    from ageray.redaction import remember_uris

    bucket_error = 'Invalid bucket name "AKIAREMEMBER0001:s3-pa55-remembered@bucket": ...'
    assert redact(bucket_error, environ={}) == 'Invalid bucket name "***@bucket": ...'
    for keep in ("models:/ageray@candidate", "at 12:00:01 user@host", "ray://***@head:1"):
        assert redact(keep, environ={}) == keep
    remember_uris(
        ["--model", "s3://AKIAREMEMBER0001:s3-pa55%2Fremembered@b/m?X-Amz-Signature=sig-remem-42"]
    )
    text = "auth failed for AKIAREMEMBER0001 with s3-pa55/remembered (sig sig-remem-42)"
    assert redact(text) == "auth failed for *** with *** (sig ***)"


def test_install_redacts_every_logger_the_console_and_tracebacks(tmp_path: Path) -> None:
    """In a fresh interpreter (install changes process-wide hooks): a logger created after
    install with its own handler (as Ray's and Serve's are), an exception logged with its
    traceback, a print, and the traceback that ends the process: none holds the secret."""
    import subprocess
    import sys

    secret = "canary-pa55word-in-the-uri"
    code = f"""
import logging, sys
from ageray.redaction import install
install()
late = logging.getLogger("ray.serve.late")  # like Ray's: own handler, no propagation
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
late.addHandler(handler)
late.propagate = False
uri = "s3://AKIAKEY00000000:{secret}@bucket/model"
late.error("loading %s failed", uri)
try:
    raise ValueError("Invalid bucket name " + uri.split("//")[1])
except ValueError:
    late.exception("swap failed")
print("console:", uri.replace("s3://AKIAKEY00000000:", ""))
raise RuntimeError("cannot read " + uri)
"""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code, f"--set=model_uri=s3://x:{secret}@b/m"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root / "platform"), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "RuntimeError: cannot read s3://***@bucket/model" in out
    assert "loading s3://***@bucket/model failed" in out
    assert "Invalid bucket name ***@bucket" in out and "console: ***@bucket/model" in out
    assert secret not in out, out


def test_serve_errors_redact_their_messages() -> None:
    from ageray.serving.errors import ServeError

    err = ServeError.http(404, "no route for /v1/x?X-Amz-Signature=abc123&user=http://u:pw@h")
    assert "abc123" not in err.message and ":pw@" not in err.message
    assert err.body()["error"]["message"] == err.message and "***" in err.message
