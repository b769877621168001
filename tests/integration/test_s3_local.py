"""``make s3-up`` / ``make s3-down`` (``python -m jobs.s3_local``): the printed exports reach a
real server; a second ``up`` finds it; ``down`` stops it and keeps the data, which the next
``up`` serves again at the same endpoint with the same keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _s3_local(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.s3_local", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _exports(out: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)$", out, flags=re.M))


def test_up_down_up_keeps_endpoint_keys_and_data(tmp_path: Path) -> None:
    import boto3

    folder = str(tmp_path / "s3")
    try:
        env = _exports(_s3_local("up", "--dir", folder, "--bucket", "local-test"))
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        assert (
            env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == env["MLFLOW_S3_ENDPOINT_URL"]
        )

        def client():
            return boto3.client(
                "s3",
                endpoint_url=env["AWS_ENDPOINT_URL"],
                aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                region_name=env["AWS_DEFAULT_REGION"],
            )

        client().put_object(Bucket="local-test", Key="kept.txt", Body=b"still here")
        assert _exports(_s3_local("up", "--dir", folder)) == env  # finds the running one
        assert "stopped" in _s3_local("down", "--dir", folder)
        assert "was not running" in _s3_local("down", "--dir", folder)
        assert _exports(_s3_local("up", "--dir", folder)) == env  # same endpoint and keys
        body = client().get_object(Bucket="local-test", Key="kept.txt")["Body"].read()
        assert body == b"still here"
        assert (Path(folder) / "server.json").stat().st_mode & 0o077 == 0  # keys: owner only
    finally:
        _s3_local("down", "--dir", folder)
