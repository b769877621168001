"""The storage layer against a real S3 server (SeaweedFS, the session's ``s3`` fixture):
what a mock lets slide and S3 enforces — listing pages of at most 1,000 keys, multipart
uploads and their ETags, bucket-name rules, signed requests — and that the server itself
listens on loopback only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
import pytest

from ageray.data import storage

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3) -> str:
    return s3.make_bucket("ageray-s3-server")


def test_listing_past_1000_keys_pages_through_all(s3, bucket: str) -> None:
    """S3 answers ListObjectsV2 with at most 1,000 keys a page: 1,050 objects must all come
    back, in order, and the first raw page must really be truncated (or the test proves
    nothing about pagination)."""
    client = s3.client()
    keys = [f"many/{i:05d}.bin" for i in range(1050)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    first = client.list_objects_v2(Bucket=bucket, Prefix="many/")
    assert first["IsTruncated"] and first["KeyCount"] == 1000
    listed = storage.list_files(f"s3://{bucket}/many")
    assert listed == [f"s3://{bucket}/{k}" for k in keys]
    assert storage.list_files(f"s3://{bucket}/many", suffix="9.bin") == [
        f"s3://{bucket}/{k}" for k in keys if k.endswith("9.bin")
    ]


def test_file_over_the_multipart_threshold_goes_up_in_parts(s3, bucket: str, tmp_path) -> None:
    """A 13 MiB file over an 8 MiB threshold: uploaded as a 3-part multipart upload (S3's
    ETag of a multipart object is ``<md5-of-md5s>-<parts>``), read back byte-exact."""
    data = os.urandom(13 * 1024 * 1024)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    url = f"s3://{bucket}/multipart/big.bin"
    storage.upload_file(
        local, url, multipart_threshold=8 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
    )
    head = s3.client().head_object(Bucket=bucket, Key="multipart/big.bin")
    parts = [data[i : i + 5 * 1024 * 1024] for i in range(0, len(data), 5 * 1024 * 1024)]
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    assert head["ETag"].strip('"') == f"{hashlib.md5(md5s).hexdigest()}-3"
    assert head["ContentLength"] == len(data)
    assert storage.sha256(url) == hashlib.sha256(data).hexdigest()
    # below the threshold: one PutObject, whose ETag is the plain MD5
    storage.write_bytes(f"s3://{bucket}/multipart/small.bin", b"small")
    small = s3.client().head_object(Bucket=bucket, Key="multipart/small.bin")
    assert small["ETag"].strip('"') == hashlib.md5(b"small").hexdigest()
    uploads = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert not [u for u in uploads if u["Key"].startswith("multipart/")]  # none left open


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("Ageray", r"contains 'A'"),
        ("age_ray", r"contains '_'"),
        ("ab", r"2 characters long"),
        ("-ageray", r"start and end"),
        ("age..ray", r"two adjacent periods"),
        ("192.168.1.1", r"IP address"),
    ],
)
def test_invalid_bucket_name_names_the_bucket_and_the_rule(s3, name: str, rule: str) -> None:
    """The server refuses these names (InvalidBucketName, which names neither); ours says
    which bucket and which rule, before any request."""
    with pytest.raises(botocore.exceptions.ClientError, match="InvalidBucketName"):
        s3.client().create_bucket(Bucket=name)
    url = f"s3://{name}/shards"
    for call in (
        lambda: storage.write_bytes(storage.join(url, "k"), b"1"),
        lambda: storage.list_files(url),
        lambda: storage.open_read(storage.join(url, "k")),
    ):
        with pytest.raises(ValueError, match=rf"{name!r} is not a valid S3 bucket name: .*{rule}"):
            call()


def test_wrong_secret_is_refused_with_a_clear_error(s3, bucket: str, monkeypatch) -> None:
    """The server checks signatures: a wrong secret is a PermissionError naming the URL."""
    storage.write_bytes(f"s3://{bucket}/signed/ok", b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setattr(storage, "_clients", {})  # a fresh client, with the wrong secret
    with pytest.raises(PermissionError, match=rf"s3://{bucket}/signed/ok: access denied"):
        storage.read_bytes(f"s3://{bucket}/signed/ok")


def test_server_listens_on_loopback_only(s3) -> None:
    listening = s3.control.listening()
    assert len(listening) >= 5, listening  # master, volume, filer, s3 and their gRPC ports
    for addr in listening:
        host = addr.rsplit(":", 1)[0].strip("[]")
        assert ipaddress.ip_address(host).is_loopback, f"SeaweedFS listens on {addr}"
    assert s3.endpoint.startswith("http://127.0.0.1:")


def test_a_fetched_model_leaves_nothing_in_tmpdir(s3, bucket: str, tmp_path, monkeypatch) -> None:
    """``fetched`` (a stage's backbone or stage-1 model from the run's S3): the folder or the
    single file comes down, is readable inside the ``with``, and the temp copy is gone
    after it; a local path is handed over untouched."""
    import tempfile

    from ageray.training.checkpoint import fetched

    client = s3.client()
    client.put_object(Bucket=bucket, Key="model/model.safetensors", Body=b"w" * 10)
    client.put_object(Bucket=bucket, Key="model/info.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="backbone.safetensors", Body=b"b")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with fetched(f"s3://{bucket}/model") as path:
        assert sorted(p.name for p in path.iterdir()) == ["info.json", "model.safetensors"]
        assert (path / "model.safetensors").read_bytes() == b"w" * 10
    with fetched(f"s3://{bucket}/backbone.safetensors") as path:
        assert path.read_bytes() == b"b"
    assert list(tmp.iterdir()) == []
    local = tmp_path / "local.safetensors"
    local.write_bytes(b"x")
    with fetched(local) as path:
        assert path == local
    assert local.is_file()
