"""An unreachable S3 endpoint, however it reads (botocore, pyarrow, a Ray worker's traceback
as text), becomes one error that names the endpoint and what to do. No server needed."""

from __future__ import annotations

import pytest

from ageray.data import storage

ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing answers


@pytest.fixture(autouse=True)
def _endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENDPOINT)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", ENDPOINT)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(storage, "_clients", {})


def test_a_write_to_a_dead_endpoint_names_it_and_says_nothing_was_written() -> None:
    with pytest.raises(storage.StorageUnreachable) as err:
        storage.write_bytes("s3://ageray/k.bin", b"1")
    text = str(err.value)
    assert ENDPOINT in text and "s3://ageray/k.bin" in text
    assert "nothing was written" in text and "AWS_ENDPOINT_URL" in text
    assert isinstance(err.value, OSError)  # callers handling I/O errors keep working


def test_a_listing_of_a_dead_endpoint_names_it() -> None:
    with pytest.raises(storage.StorageUnreachable, match=ENDPOINT):
        storage.list_files("s3://ageray/prefix")


def test_a_ray_worker_traceback_about_pyarrow_is_recognised() -> None:
    worker = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...\n"
        "OSError: When getting information for key 'runs/x' in bucket 'ckpt': AWS Error "
        "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect"
    )
    down = storage.unreachable_cause(worker, "s3://ckpt/runs/x", "checkpoints under")
    assert down is not None and ENDPOINT in str(down) and "s3://ckpt/runs/x" in str(down)
    assert "HeadObject" in str(down)  # the cause travels along


def test_other_errors_and_local_paths_are_left_alone() -> None:
    assert storage.unreachable_cause(ValueError("bad lr"), "s3://ckpt/runs", "x") is None
    text = OSError("AWS Error NETWORK_CONNECTION")
    assert storage.unreachable_cause(text, "/tmp/runs", "x") is None
