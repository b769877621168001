"""One way to read and write shards and manifests, whether they live in a local folder or
under ``s3://bucket/prefix``.

Why a module of our own and not fsspec: the streams need two guarantees that generic
file systems do not give together.

* **Reads survive dropped connections.** A training epoch reads gigabytes through long-lived
  HTTP responses; one reset connection must not kill a Ray Train worker. :class:`S3RangeReader`
  is a file-like object over ``GetObject`` that, when the body breaks mid-read, sleeps with
  exponential backoff and issues a new ``GetObject`` with ``Range: bytes=<offset>-`` (and
  ``IfMatch: <etag>``, so a resumed read never splices two versions of an object).
* **Writes are atomic.** No reader ever sees half a shard under its final name. Locally we
  write ``.<name>.tmp-<random>`` in the same folder and ``os.replace`` it; on S3 an object
  becomes visible only when its upload completes (``PutObject``, or ``CompleteMultipartUpload``
  above ``multipart_threshold``), so we write a local temporary file and upload it whole.

Endpoint and credentials come from the standard AWS environment/config (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``...), read by boto3 itself;
this module never reads, logs or stores credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "S3RangeReader",
    "StorageUnreachable",
    "atomic_write",
    "basename",
    "bucket_name_problem",
    "endpoint_url",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "open_read",
    "read_bytes",
    "read_json",
    "remove",
    "s3_client",
    "sha256",
    "split_s3",
    "unreachable_cause",
    "upload_file",
    "write_bytes",
    "write_json",
]

log = logging.getLogger(__name__)

# S3 needs parts of at least 5 MiB (except the last). Shards default to well under 1 GiB, so
# 64 MiB parts keep the part count small; the threshold is configurable so a test can force
# a multipart upload of a small file.
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 64 * 1024 * 1024
_MIN_PART = 5 * 1024 * 1024
READ_BUFFER = 1024 * 1024
TMP_MARK = ".tmp-"  # every temporary name this module creates contains this


# --------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------


def is_s3(url: str | os.PathLike[str]) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(url):
        raise ValueError(f"{url!r} is not an s3:// URL")
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} has no bucket; expected s3://bucket/prefix")
    if "@" not in bucket:  # credentials in a URL are redaction's business, not a bucket
        problem = bucket_name_problem(bucket)
        if problem:
            raise ValueError(
                f"{url!r}: {bucket!r} is not a valid S3 bucket name: {problem}. S3 bucket "
                "names are 3-63 characters of lowercase letters, digits, '.' and '-', "
                "starting and ending with a letter or digit; use such a name"
            )
    return bucket, key


_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def bucket_name_problem(bucket: str) -> str | None:
    """Which S3 bucket-naming rule ``bucket`` breaks, or ``None``.

    Checked here, before any request, because S3 answers a bad name with a bare
    ``InvalidBucketName`` (or, on some servers, a misleading ``NoSuchBucket``) that names
    neither the bucket nor the rule. These are AWS's rules for every bucket created since
    2018, which S3-compatible servers (SeaweedFS, MinIO) enforce too.
    """
    if not 3 <= len(bucket) <= 63:
        return f"it is {len(bucket)} characters long (3 to 63 allowed)"
    bad = sorted(set(bucket) - _BUCKET_CHARS)
    if bad:
        return f"it contains {''.join(bad)!r} (only lowercase letters, digits, '.' and '-')"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return "it must start and end with a lowercase letter or a digit"
    if ".." in bucket:
        return "it has two adjacent periods"
    parts = bucket.split(".")
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return "it is formatted as an IP address"
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if bucket.startswith(prefix):
            return f"it starts with the reserved prefix {prefix!r}"
    for suffix in ("-s3alias", "--ol-s3", "--x-s3", ".mrap", "--table-s3"):
        if bucket.endswith(suffix):
            return f"it ends with the reserved suffix {suffix!r}"
    return None


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local folder or an ``s3://`` prefix (always ``/`` on S3)."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return os.path.join(base, *parts)


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------
# S3 client
# --------------------------------------------------------------------------------------

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def s3_client() -> Any:
    """A boto3 S3 client for this process and the current AWS environment.

    Cached per (process, endpoint, profile, region): DataLoader workers started with
    spawn/forkserver build their own (boto3 clients must not cross a fork), and a test that
    points ``AWS_ENDPOINT_URL`` elsewhere gets a fresh client. boto3 clients are thread-safe,
    so the shard writer's threads share one. Request-level retries (5xx, throttling,
    connection refused) are botocore's "standard" mode; mid-body drops are ours
    (:class:`S3RangeReader`).
    """
    import boto3
    import botocore.config

    key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_PROFILE"),
        os.environ.get("AWS_DEFAULT_REGION"),
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = botocore.config.Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client("s3", config=config)
            _clients[key] = client
        return client


def _client_error_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class StorageUnreachable(ConnectionError):
    """The S3 endpoint did not answer (refused, reset, timed out) after botocore's retries.

    A ``ConnectionError`` (so an ``OSError``): callers that already handle I/O errors keep
    working, and one that wants to wait for the server can tell this case apart."""


def endpoint_url() -> str:
    """The S3 endpoint this process talks to (``AWS_ENDPOINT_URL[_S3]`` or AWS's)."""
    return str(s3_client().meta.endpoint_url)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as be

    return (be.ConnectionError, be.HTTPClientError)


def _unreachable(
    exc: BaseException, url: str, action: str, after: str | None = None
) -> StorageUnreachable:
    """An error that names the endpoint, the object and what to do; for writes it says that
    nothing was committed (uploads are atomic), so re-running is safe."""
    endpoint = endpoint_url()
    if after is None:
        after = (
            "nothing was written under that name (S3 shows an object only once its upload "
            "completes); re-run the same command when it answers"
            if action == "writing"
            else "re-run when it answers"
        )
    return StorageUnreachable(
        f"{action} {url} failed: the S3 endpoint {endpoint} does not answer "
        f"({type(exc).__name__}: {exc}). Check that the S3 server is running and reachable "
        f"and that AWS_ENDPOINT_URL points at it; {after}"
    )


# How an unreachable S3 endpoint reads in errors that are not botocore's: pyarrow's S3
# file system (Ray Train's checkpoints) and worker tracebacks that Ray hands on as text.
_UNREACHABLE_TEXT = (
    "AWS Error NETWORK_CONNECTION",
    "curlCode: 7",
    "Could not connect to the endpoint URL",
    "StorageUnreachable",
)


def unreachable_cause(
    exc: BaseException, url: str, action: str, *, after: str | None = None
) -> StorageUnreachable | None:
    """The :class:`StorageUnreachable` (naming the endpoint) to raise instead of ``exc`` when
    ``exc`` says the S3 endpoint did not answer, else ``None``.

    Why text too: a Ray Train worker's error reaches the driver as a ``WorkerGroupError``
    whose message is the worker's traceback, and pyarrow's S3 errors are plain ``OSError``s
    that name neither the endpoint URL nor a fix.
    """
    if not is_s3(url):
        return None
    seen: set[int] = set()
    cur: BaseException | None = exc
    text = []
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (StorageUnreachable, *_connection_errors())):
            return _unreachable(cur, url, action, after)
        seen.add(id(cur))
        text.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    blob = "\n".join(text)
    if any(mark in blob for mark in _UNREACHABLE_TEXT):
        line = next(ln for ln in blob.splitlines()[::-1] if any(m in ln for m in _UNREACHABLE_TEXT))
        return _unreachable(ConnectionError(line.strip()[-300:]), url, action, after)
    return None


def _translate(exc: Exception, url: str) -> Exception:
    """A botocore ClientError as the OSError a caller can act on, naming the URL."""
    code = _client_error_code(exc)
    if code in ("404", "NoSuchKey", "NotFound"):
        return FileNotFoundError(f"{url} does not exist")
    if code == "NoSuchBucket":
        return FileNotFoundError(
            f"{url}: bucket does not exist; create it or check AWS_ENDPOINT_URL / the URL"
        )
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return PermissionError(
            f"{url}: access denied ({code}); check the AWS credentials in the environment "
            "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket policy"
        )
    return OSError(f"{url}: S3 error {code or type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _retryable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the connection broke", for which resuming the read is right."""
    import botocore.exceptions as be
    import urllib3.exceptions as ue

    return (
        be.ResponseStreamingError,
        be.IncompleteReadError,
        be.ReadTimeoutError,
        be.ConnectionClosedError,
        be.EndpointConnectionError,
        be.ConnectionError,
        ue.ProtocolError,
        ue.ReadTimeoutError,
        http.client.IncompleteRead,
        ConnectionError,
        socket.timeout,
        _ShortRead,
    )


class _ShortRead(Exception):
    """The body ended before Content-Length bytes: the connection was closed under us."""


class S3RangeReader(io.RawIOBase):
    """A seekable, read-only file over one S3 object that resumes after dropped connections.

    Each (re)connection is a ``GetObject`` with ``Range: bytes=<pos>-``; when reading the
    body fails with a connection-level error (or the body ends short of the object size),
    the body is discarded, we sleep ``backoff * 2**attempt`` (capped, with jitter) and
    reconnect at the current offset. ``retries`` counts consecutive failures without progress;
    any byte read resets it. Resumed requests carry ``IfMatch`` with the first response's ETag,
    so an object overwritten mid-read fails loudly instead of mixing two versions.

    Wrap it in :class:`io.BufferedReader` (``open_read`` does) for efficient small reads.
    """

    def __init__(
        self,
        url: str,
        *,
        client: Any = None,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.client = client or s3_client()
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.reconnects = 0  # how many times a broken body was resumed (for tests and logs)
        self._pos = 0
        self._body: Any = None
        self._etag: str | None = None
        self._size: int | None = None
        # fail fast at open time on FileNotFoundError / PermissionError; retry broken links
        self._retrying(self._connect)

    # -- connection ---------------------------------------------------------------------
    def _connect(self) -> None:
        import botocore.exceptions

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self._pos:
            kwargs["Range"] = f"bytes={self._pos}-"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            resp = self.client.get_object(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = _client_error_code(exc)
            if code in ("PreconditionFailed", "412"):
                raise OSError(
                    f"{self.url} changed while it was being read (ETag {self._etag}); "
                    "re-run the reader against the new object"
                ) from exc
            if code == "InvalidRange" and self._size is not None and self._pos >= self._size:
                self._body = io.BytesIO(b"")
                return
            if code in ("500", "503", "InternalError", "SlowDown", "ServiceUnavailable"):
                raise ConnectionError(f"{self.url}: transient S3 error {code}") from exc
            raise _translate(exc, self.url) from exc
        if self._etag is None:
            self._etag = resp.get("ETag")
        if self._size is None:
            if self._pos == 0:
                self._size = int(resp["ContentLength"])
            else:  # "bytes 10-99/100"
                self._size = int(str(resp.get("ContentRange", "")).rsplit("/", 1)[-1])
        self._body = resp["Body"]

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # closing a broken socket may raise anything
                self._body.close()
        self._body = None

    # -- io.RawIOBase -------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        assert self._size is not None
        return self._size

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos != self._pos:
            self._drop_body()
            self._pos = pos
        return pos

    def _retrying(self, fn: Any) -> Any:
        """Call ``fn`` until it succeeds; on a connection-level error drop the body, back
        off exponentially (with jitter) and try again, at most ``retries`` times in a row.
        Each call of this method is one unit of progress, so the count restarts with it."""
        errors = _retryable_errors()
        attempt = 0
        while True:
            try:
                return fn()
            except errors as exc:
                self._drop_body()
                attempt += 1
                if attempt > self.retries:
                    raise OSError(
                        f"{self.url}: reading failed at byte {self._pos} of "
                        f"{self._size if self._size is not None else '?'} after "
                        f"{self.retries} retries ({type(exc).__name__}: {exc}); check the "
                        f"network and the S3 endpoint {self.client.meta.endpoint_url}, or "
                        "raise data.s3_retries"
                    ) from exc
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                log.warning(
                    "%s: connection broke at byte %d (%s); retry %d/%d in %.2fs",
                    self.url,
                    self._pos,
                    type(exc).__name__,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                self.reconnects += 1

    def _read_some(self, want: int) -> bytes:
        if self._body is None:
            self._connect()
        data = self._body.read(min(want, self.size - self._pos))
        if not data:
            raise _ShortRead(f"body ended at byte {self._pos} of {self.size}")
        return data

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        if want == 0 or self._pos >= self.size:
            return 0
        data = self._retrying(lambda: self._read_some(want))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(
    url: str | os.PathLike[str],
    *,
    retries: int = 5,
    backoff: float = 0.2,
    buffer_size: int = READ_BUFFER,
) -> IO[bytes]:
    """Open a local path or ``s3://`` URL for streaming binary reads.

    Raises FileNotFoundError / PermissionError naming the URL. S3 reads resume after
    dropped connections (see :class:`S3RangeReader`).
    """
    url = str(url)
    if is_s3(url):
        raw = S3RangeReader(url, retries=retries, backoff=backoff)
        return io.BufferedReader(raw, buffer_size=buffer_size)
    return open(url, "rb", buffering=buffer_size)


def read_bytes(url: str | os.PathLike[str], *, retries: int = 5) -> bytes:
    with open_read(url, retries=retries) as fh:
        return fh.read()


def read_json(url: str | os.PathLike[str], *, retries: int = 5) -> Any:
    data = read_bytes(url, retries=retries)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{url} is not valid JSON: {exc}") from exc


def exists(url: str | os.PathLike[str]) -> bool:
    url = str(url)
    if not is_s3(url):
        return os.path.exists(url)
    import botocore.exceptions

    bucket, key = split_s3(url)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as exc:
        if _client_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _translate(exc, url) from exc
    except _connection_errors() as exc:
        raise _unreachable(exc, url, "checking") from exc


def list_files(url: str | os.PathLike[str], suffix: str = "") -> list[str]:
    """All files under a folder / prefix (recursively), as full paths or URLs, sorted.

    A missing local folder or empty prefix is an empty list.
    """
    url = str(url)
    if not is_s3(url):
        root = Path(url)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.name.endswith(suffix))
    import botocore.exceptions

    bucket, prefix = split_s3(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    out = []
    try:
        for page in (
            s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix):
                    out.append(f"s3://{bucket}/{obj['Key']}")
    except botocore.exceptions.ClientError as exc:
        raise _translate(exc, url) from exc
    except _connection_errors() as exc:
        raise _unreachable(exc, url, "listing") from exc
    return sorted(out)


def remove(url: str | os.PathLike[str]) -> None:
    """Delete one file/object; a missing one is not an error."""
    url = str(url)
    if not is_s3(url):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url)
        return
    import botocore.exceptions

    bucket, key = split_s3(url)
    try:
        s3_client().delete_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        raise _translate(exc, url) from exc
    except _connection_errors() as exc:
        raise _unreachable(exc, url, "deleting") from exc


def sha256(url: str | os.PathLike[str], *, retries: int = 5) -> str:
    h = hashlib.sha256()
    with open_read(url, retries=retries) as fh:
        while chunk := fh.read(READ_BUFFER):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def upload_file(
    local_path: str | os.PathLike[str],
    url: str,
    *,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
) -> None:
    """Upload a complete local file to ``url`` (s3://). Atomic: S3 shows the object only
    when the PutObject / CompleteMultipartUpload succeeds; a failed multipart upload is
    aborted by boto3's transfer manager, leaving nothing under the key."""
    import boto3.s3.transfer
    import botocore.exceptions

    bucket, key = split_s3(url)
    config = boto3.s3.transfer.TransferConfig(
        multipart_threshold=max(1, multipart_threshold),
        multipart_chunksize=max(_MIN_PART, multipart_chunksize),
        max_concurrency=4,
    )
    try:
        s3_client().upload_file(str(local_path), bucket, key, Config=config)
    except botocore.exceptions.ClientError as exc:
        raise _translate(exc, url) from exc
    except boto3.exceptions.S3UploadFailedError as exc:
        cause = exc.__cause__ or exc.__context__  # boto3 wraps the ClientError
        if isinstance(cause, botocore.exceptions.ClientError):
            raise _translate(cause, url) from exc
        raise OSError(f"uploading {local_path} to {url} failed: {exc}") from exc
    except _connection_errors() as exc:
        raise _unreachable(exc, url, "writing") from exc


@contextlib.contextmanager
def atomic_write(
    url: str | os.PathLike[str],
    *,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
) -> Iterator[IO[bytes]]:
    """``with atomic_write(url) as fh: fh.write(...)`` — the file appears under ``url`` only
    if the block completes; on an exception (or a killed process) nothing is visible there.

    Local: a ``.<name>.tmp-<random>`` file in the destination folder (same file system, so
    ``os.replace`` is atomic), fsynced before the rename. S3: a local temporary file,
    uploaded whole when the block exits (multipart above ``multipart_threshold``).
    """
    url = str(url)
    if is_s3(url):
        fd, tmp = tempfile.mkstemp(prefix="ageray-upload-", suffix=TMP_MARK.rstrip("-"))
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
            upload_file(
                tmp,
                url,
                multipart_threshold=multipart_threshold,
                multipart_chunksize=multipart_chunksize,
            )
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp_path, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not all FS allow this
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(url: str | os.PathLike[str], data: bytes, **kw: Any) -> None:
    with atomic_write(url, **kw) as fh:
        fh.write(data)


def write_json(url: str | os.PathLike[str], obj: Any, **kw: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode(), **kw)
