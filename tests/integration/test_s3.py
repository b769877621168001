"""Shards on S3 (a real SeaweedFS server on loopback, via the ``s3`` fixture): atomic and
multipart writes, manifest and streams read back, and reads that survive connections dropped
mid-body — by a real TCP proxy that cuts the connection after N bytes, not a mock.

Why a proxy: a dropped connection must travel the production path (urllib3 raising
"IncompleteRead" inside botocore's streaming body) for the retry to be tested honestly; a
fake body object would only test that our code calls itself again.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from datagen import make_records

from ageray.config import DataConfig
from ageray.data import storage
from ageray.data.loader import eval_loader, train_loader
from ageray.data.manifest import read_manifest
from ageray.data.shards import write_shards

pytestmark = pytest.mark.integration


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server. For the first ``drops`` GET
    requests whose path contains ``target``, the connection is closed after ``after`` bytes
    of the response have been relayed. Records every request line and Range header."""

    def __init__(self, upstream: str, *, target: str, after: int | list[int], drops: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.target = target
        self.after = after if isinstance(after, list) else [after] * drops
        self.drops_left = drops
        self.requests: list[tuple[str, str | None]] = []  # (request line, range)
        self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            state = {"drop": False, "sent": 0}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                m = re.match(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+)", data)
                if m:  # a new request on this connection (no pipelining in botocore)
                    rng = re.search(rb"(?im)^range: *(\S+)", data)
                    line = f"{m.group(1).decode()} {m.group(2).decode()}"
                    with self._lock:
                        self.requests.append((line, rng.group(1).decode() if rng else None))
                        drop = m.group(1) == b"GET" and self.target in line and self.drops_left > 0
                        after = None
                        if drop:
                            after = self.after[len(self.after) - self.drops_left]
                            self.drops_left -= 1
                    state.update(drop=drop, sent=0, after=after)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while data := upstream.recv(65536):
                if state["drop"]:
                    room = state["after"] - state["sent"]
                    if len(data) >= room:
                        client.sendall(data[: max(room, 0)])
                        with self._lock:
                            self.dropped += 1
                        break  # cut the connection mid-response
                    state["sent"] += len(data)
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def bucket(s3) -> str:
    return s3.make_bucket("ageray-test")


@pytest.fixture
def through_proxy(s3, monkeypatch: pytest.MonkeyPatch):
    """Make a proxy and point the AWS endpoint at it for this test."""
    proxies: list[DroppingProxy] = []

    def make(**kw) -> DroppingProxy:
        proxy = DroppingProxy(s3.endpoint, **kw)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        return proxy

    yield make
    for p in proxies:
        p.close()


@pytest.fixture(scope="module")
def records():
    return make_records(120, identities=30, size=20)


def cfg_for(url: str, **kw) -> DataConfig:
    base = dict(shards=url, image_size=16, batch_size=8, eval_batch_size=8, num_workers=2)
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------ storage


def test_storage_roundtrip_local_and_s3(bucket: str, tmp_path: Path) -> None:
    for root in (str(tmp_path / "local"), f"s3://{bucket}/roundtrip"):
        url = storage.join(root, "a", "b.json")
        assert not storage.exists(url)
        storage.write_json(url, {"x": [1, 2]})
        assert storage.exists(url)
        assert storage.read_json(url) == {"x": [1, 2]}
        storage.write_bytes(storage.join(root, "c.bin"), b"hello")
        assert storage.read_bytes(storage.join(root, "c.bin")) == b"hello"
        listed = storage.list_files(root)
        assert [u.replace(os.sep, "/").rsplit("/", 2)[-2:] for u in listed] == [
            ["a", "b.json"],
            [root.rsplit("/", 1)[-1], "c.bin"],
        ]
        import hashlib

        assert storage.sha256(storage.join(root, "c.bin")) == hashlib.sha256(b"hello").hexdigest()
        storage.remove(url)
        storage.remove(url)  # missing is fine
        assert not storage.exists(url)
        with pytest.raises(FileNotFoundError, match=re.escape(url)):
            storage.open_read(url)


def test_s3_errors_name_the_url(s3) -> None:
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-xyz/k", b"1")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_atomic_write_on_s3_never_shows_a_partial_object(bucket: str) -> None:
    url = f"s3://{bucket}/atomic/obj.bin"
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(url) as fh:
        fh.write(b"x" * 1000)
        raise RuntimeError("boom")
    assert not storage.exists(url)


def test_multipart_upload_and_ranged_reads(bucket: str, s3) -> None:
    data = os.urandom(11 * 1024 * 1024)
    url = f"s3://{bucket}/big/blob.bin"
    storage.write_bytes(url, data, multipart_threshold=1, multipart_chunksize=5 * 1024 * 1024)
    head = s3.client().head_object(Bucket=bucket, Key="big/blob.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: a real multipart upload
    with storage.open_read(url) as fh:
        assert fh.read(10) == data[:10]
        fh.seek(7 * 1024 * 1024)
        assert fh.read(100) == data[7 * 1024 * 1024 : 7 * 1024 * 1024 + 100]
        fh.seek(-5, os.SEEK_END)
        assert fh.read() == data[-5:]


# ------------------------------------------------------------------------------ dropped reads


def test_dropped_connection_resumes_from_the_byte_offset(bucket: str, through_proxy) -> None:
    data = os.urandom(700_000)
    url = f"s3://{bucket}/drop/blob.bin"
    storage.write_bytes(url, data)
    proxy = through_proxy(target="/drop/blob.bin", after=200_000, drops=2)
    raw = storage.S3RangeReader(url, retries=3, backoff=0.01)
    with raw:
        out = bytearray()
        while chunk := raw.read(64 * 1024):
            out += chunk
    assert bytes(out) == data
    assert proxy.dropped == 2 and raw.reconnects == 2
    gets = [r for line, r in proxy.requests if line.startswith("GET") and "blob.bin" in line]
    assert gets[0] is None
    offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in gets[1:]]
    assert len(offsets) == 2 and all(o > 0 for o in offsets)  # resumed, not restarted


def test_reads_fail_clearly_when_retries_run_out(bucket: str, through_proxy) -> None:
    """The first response breaks after 50 kB, every reconnection before its first byte of
    body: progress stops, and after ``retries`` attempts in a row the read fails."""
    import boto3
    import botocore.config

    url = f"s3://{bucket}/drop/always.bin"
    storage.write_bytes(url, os.urandom(300_000))
    proxy = through_proxy(target="/drop/always.bin", after=[50_000] + [5] * 9, drops=10)
    client = boto3.client(  # no botocore-level retries: we test ours
        "s3",
        endpoint_url=proxy.endpoint,
        config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}),
    )
    reader = storage.S3RangeReader(url, client=client, retries=2, backoff=0.01)
    with pytest.raises(OSError, match=r"at byte 4\d{4} of 300000 after 2 retries"):
        reader.read()
    assert reader.reconnects == 2


# ------------------------------------------------------------------------------ shards on S3


@pytest.fixture
def s3_shards(bucket: str, records) -> Iterator[tuple[str, dict]]:
    url = f"s3://{bucket}/shards/run1"
    manifest = write_shards(
        iter(records),
        url,
        max_count=9,
        workers=2,
        progress=False,
        multipart_threshold=1,  # every shard goes up as a multipart upload
        source="unit",
    )
    yield url, manifest


def test_shards_written_multipart_and_streamed_back(s3_shards, s3, bucket: str) -> None:
    url, manifest = s3_shards
    assert read_manifest(url) == manifest
    client = s3.client()
    for split in manifest["splits"].values():
        for s in split["shards"]:
            key = f"shards/run1/{s['name']}"
            head = client.head_object(Bucket=bucket, Key=key)
            assert head["ETag"].strip('"').endswith("-1")  # multipart
            assert head["ContentLength"] == s["bytes"]
            assert storage.sha256(f"s3://{bucket}/{key}") == s["sha256"]
    # exact-once eval over 2 ranks x 2 workers, straight from S3
    cfg = cfg_for(url)
    for split in ("train", "test"):
        seen: list[str] = []
        for rank in range(2):
            loader = eval_loader(cfg, split, rank=rank, world_size=2)
            seen += [k for b in loader for k in b["key"]]
            assert not any(loader.skipped.values())
        assert len(seen) == manifest["splits"][split]["count"] == len(set(seen))
    steps = [len(list(train_loader(cfg, "train", rank=r, world_size=2))) for r in range(2)]
    assert steps[0] == steps[1] == manifest["splits"]["train"]["count"] // 16


def test_stream_survives_dropped_connections(s3_shards, through_proxy) -> None:
    """DataLoader worker processes read through a proxy that cuts 3 shard downloads."""
    url, manifest = s3_shards
    proxy = through_proxy(target="/shards/run1/train/", after=3000, drops=3)
    cfg = cfg_for(url, s3_retries=4)
    seen: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for rank in range(2):
        loader = eval_loader(cfg, "train", rank=rank, world_size=2)
        seen.update(k for b in loader for k in b["key"])
        skipped.update(loader.skipped)
    assert proxy.dropped == 3
    assert not any(skipped.values())
    assert sum(seen.values()) == len(seen) == manifest["splits"]["train"]["count"]


def test_rerun_on_s3_overwrites_and_removes_stale(bucket: str, records) -> None:
    url = f"s3://{bucket}/shards/rerun"
    write_shards(iter(records), url, max_count=5, workers=2, progress=False)
    m2 = write_shards(iter(records), url, max_count=60, workers=2, progress=False)
    listed = {s["name"] for sp in m2["splits"].values() for s in sp["shards"]}
    on_s3 = {u.removeprefix(url + "/") for u in storage.list_files(url)}
    assert on_s3 == listed | {"manifest.json"}


def test_missing_manifest_on_s3_says_what_to_run(bucket: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"run `python -m jobs\.make_shards"):
        read_manifest(f"s3://{bucket}/nothing/here")
