"""Credentials out of everything ageray logs: MLflow params, tags, artifacts, console lines.

Why a rule of its own: credentials reach ageray in URIs (``tracking.uri`` or
``MLFLOW_TRACKING_URI`` as ``https://user:password@host``, a database URI, a presigned URL's
``X-Amz-Signature``) and in the environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``MLFLOW_TRACKING_PASSWORD`` ...). The code needs them to connect; a tracking server, whose
runs many people read and whose artifacts get copied around, must never hold them. So every
string on its way out goes through :func:`redact`:

* the user-info part of any URI (``scheme://user:password@``) becomes ``scheme://***@``,
  and a bare ``user:password@host`` (how botocore or urllib quote the bucket or host of
  such a URI in their errors) becomes ``***@host``;
* query parameters named like a credential (``signature``, ``token``, ``key``, ``password``,
  ``secret``, ``credential`` ...) keep their name and lose their value;
* the value of any environment variable whose name says it is secret (``*SECRET*``,
  ``*PASSWORD*``, ``*TOKEN*``, ``*ACCESS_KEY*``, ``*API_KEY*``, ``*CREDENTIAL*``,
  ``*PRIVATE*``) is replaced wherever it appears, 8 characters or longer (shorter values
  are test placeholders, and replacing them would garble ordinary words);
* the values :func:`remember` was told about (the user, password and credential query
  values of every URI the process was given on its command line, in its environment or
  in a served ``model_uri``), 8 characters or longer, wherever and however they appear
  (a library that quotes the password alone, URL-decoded, in its error).

**At every exit** (:func:`install`, once per process: each job's ``setup_logging``, the
Serve replica's constructor, the ``serve run`` builder): every log record of every logger,
Ray's and Serve's included, whenever they were created (a log-record factory, so handlers
that Ray adds later are covered too): its message, arguments, formatted exception and
stack; the console (``sys.stdout`` / ``sys.stderr`` redact what is written); and a
traceback that ends the process (``sys.excepthook``, ``threading.excepthook``). HTTP
answers redact their messages where they are built (``ageray.serving.errors``).

:func:`redacted_path` gives a file or folder to upload with its text files redacted (the
local files stay as they are); :class:`RedactingFilter` does the same for log records;
:func:`http_request` sends a URL's credentials as a header, never as part of the host.
Imports nothing from ageray: the bottom layer, beside ``config``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import traceback
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "RedactingStream",
    "http_request",
    "install",
    "redact",
    "redact_data",
    "redacted_path",
    "remember",
    "remember_uris",
    "secret_values",
    "strip_userinfo",
]

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"<>?#]+@")
_CREDENTIAL_WORDS = (
    "signature|credential|token|secret|password|passwd|pwd|api_?key|access_?key|sig|key|auth"
)
_QUERY = re.compile(
    rf"(?i)(?P<name>[?&;][A-Za-z0-9_.\-]*(?:{_CREDENTIAL_WORDS})[A-Za-z0-9_.\-]*=)[^&\s#'\"]+"
)
# user:password@host without a scheme (an error quoting the bucket or host part of a URI);
# neither part holds a "/", so "models:/name@alias" and "ray://***@head" stay as they are
_BARE_USERINFO = re.compile(r"(?<![\w/:.\-])[^\s/@:'\"<>()\[\]]+:[^\s/@'\"<>()\[\]]+@(?=[\w\[])")
_SECRET_NAME = re.compile(r"(?i)SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE")
_MIN_SECRET_LEN = 8
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".html", ".log", ".toml"}
_TEXT_NAMES = {"MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml"}
_MAX_TEXT_BYTES = 20 * 1024 * 1024


_REMEMBERED: set[str] = set()
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def remember(*values: str) -> None:
    """Redact these values from now on in this process, wherever they appear (8 characters
    or longer, as for the environment's secrets)."""
    from urllib.parse import unquote

    for value in values:
        for v in {value, unquote(value)}:
            if len(v) >= _MIN_SECRET_LEN:
                _REMEMBERED.add(v)


def remember_uris(texts: Iterable[str]) -> None:
    """:func:`remember` the user, password and credential query values of every URI in
    ``texts`` (a command line, environment values, a served ``model_uri``)."""
    from urllib.parse import parse_qsl, urlsplit

    for text in texts:
        for uri in _URI.findall(text or ""):
            try:
                parts = urlsplit(uri)
                user, password = parts.username, parts.password
            except ValueError:  # a malformed port or host: keep what the user-info holds
                head = uri.split("://", 1)[1].split("/", 1)[0]
                user, _, password = head.rpartition("@")[0].partition(":")
                parts = None
            remember(*(v for v in (user, password) if v))
            query = parts.query if parts is not None else uri.partition("?")[2]
            for name, value in parse_qsl(query, keep_blank_values=False):
                if re.search(rf"(?i){_CREDENTIAL_WORDS}", name):
                    remember(value)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables (and, for the process's own
    environment, the remembered ones), longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    if environ is None:
        found |= _REMEMBERED
    return sorted(found, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URI credentials, credential query values and secret environment values
    replaced by ``***``."""
    if not text:
        return text
    out = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
    out = _BARE_USERINFO.sub(f"{REDACTED}@", out)
    out = _QUERY.sub(rf"\g<name>{REDACTED}", out)
    for value in secret_values(environ):
        out = out.replace(value, REDACTED)
    return out


def redact_data(data: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of nested dicts / lists / tuples with every string value redacted (keys and
    non-string values as they are)."""
    if isinstance(data, str):
        return redact(data, environ)
    if isinstance(data, Mapping):
        return {k: redact_data(v, environ) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(redact_data(v, environ) for v in data)
    return data


def strip_userinfo(uri: str) -> tuple[str, tuple[str, str] | None]:
    """``(uri without user-info, (user, password) or None)``: what an HTTP client that does
    not read credentials from the URL (``urllib``) needs to send them as basic auth."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return bare, (unquote(parts.username or ""), unquote(parts.password or ""))


def _is_text(path: Path) -> bool:
    return (path.suffix.lower() in _TEXT_SUFFIXES or path.name in _TEXT_NAMES) and (
        path.stat().st_size <= _MAX_TEXT_BYTES
    )


def _redacted_text(path: Path) -> str | None:
    """The file's text redacted, or None when it is not text or nothing changes."""
    if not _is_text(path):
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    clean = redact(text)
    return None if clean == text else clean


@contextlib.contextmanager
def redacted_path(path: str | Path) -> Iterator[Path]:
    """What to upload for ``path`` (a file or a folder): itself when no text file in it
    holds a credential, else a temporary copy with those files redacted (binary files
    copied as they are), removed when the ``with`` block ends."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]
    changed = {p: t for p in files if (t := _redacted_text(p)) is not None}
    if not changed:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ageray-redacted-") as tmp:
        target = Path(tmp) / path.name
        if path.is_file():
            target.write_text(changed[path], encoding="utf-8")
        else:
            shutil.copytree(path, target)
            for src, text in changed.items():
                (target / src.relative_to(path)).write_text(text, encoding="utf-8")
        yield target


def http_request(url: str) -> urllib.request.Request:
    """A ``urllib`` request for ``url``, whose ``user:password@`` (urllib would take it
    for part of the host name) is sent as a basic-auth header instead."""
    bare, auth = strip_userinfo(url)
    request = urllib.request.Request(bare)
    if auth is not None:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _redact_record(record: logging.LogRecord) -> None:
    """The record's message (with its arguments), exception and stack text, redacted in
    place. A record whose arguments do not fit its message is left to logging's own
    error report."""
    try:
        message = record.getMessage()
    except (TypeError, ValueError):
        return
    clean = redact(message)
    if clean != message:  # else the record stays as made (tests read msg and args)
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A handler (or logger) filter that redacts each record: message, arguments,
    exception text and stack (a library that logs a URL with its credentials, an
    exception text that quotes one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


class RedactingStream:
    """A text stream (``sys.stdout`` / ``sys.stderr``) whose writes are redacted; all else
    (``fileno``, ``buffer``, ``isatty``, ...) is the wrapped stream's. Why per write: a
    job's own ``print`` of a URI, Ray's lines forwarded from its workers and tqdm's bars
    all end up here."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_installed = threading.Lock()
_INSTALLED: list[bool] = []


def install(*, console: bool = True) -> None:
    """Redaction at every exit of this process (module docstring); idempotent. Also
    remembers the credentials of every URI on the command line and in the environment."""
    remember_uris([*sys.argv, *os.environ.values()])
    with _installed:
        if _INSTALLED:
            return
        _INSTALLED.append(True)
        base = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = base(*args, **kwargs)
            _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        for handler in logging.getLogger().handlers:  # records made before this call
            handler.addFilter(RedactingFilter())
        sys.excepthook = _excepthook
        threading.excepthook = _thread_excepthook
    if console:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, RedactingStream):
                setattr(sys, name, RedactingStream(stream))


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """The traceback that ends the process, redacted (it quotes the failing URI)."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    if sys.__stderr__ is not None:
        sys.__stderr__.write(redact(text))
        sys.__stderr__.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    if sys.__stderr__ is not None:
        sys.__stderr__.write(redact(f"Exception in thread {name}:\n{text}"))
