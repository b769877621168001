"""Credentials out of everything ageray logs: MLflow params, tags, artifacts, console lines.

Why a rule of its own: credentials reach ageray in URIs (``tracking.uri`` or
``MLFLOW_TRACKING_URI`` as ``https://user:password@host``, a database URI, a presigned URL's
``X-Amz-Signature``) and in the environment (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``MLFLOW_TRACKING_PASSWORD`` ...). The code needs them to connect; a tracking server, whose
runs many people read and whose artifacts get copied around, must never hold them. So every
string on its way out goes through :func:`redact`:

* the user-info part of any URI (``scheme://user:password@``) becomes ``scheme://***@``;
* query parameters named like a credential (``signature``, ``token``, ``key``, ``password``,
  ``secret``, ``credential`` ...) keep their name and lose their value;
* the value of any environment variable whose name says it is secret (``*SECRET*``,
  ``*PASSWORD*``, ``*TOKEN*``, ``*ACCESS_KEY*``, ``*API_KEY*``, ``*CREDENTIAL*``,
  ``*PRIVATE*``) is replaced wherever it appears, 8 characters or longer (shorter values
  are test placeholders, and replacing them would garble ordinary words).

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
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "http_request",
    "redact",
    "redact_data",
    "redacted_path",
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
_SECRET_NAME = re.compile(r"(?i)SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE")
_MIN_SECRET_LEN = 8
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".html", ".log", ".toml"}
_TEXT_NAMES = {"MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml"}
_MAX_TEXT_BYTES = 20 * 1024 * 1024


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment's secret-named variables, longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(found, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URI credentials, credential query values and secret environment values
    replaced by ``***``."""
    if not text:
        return text
    out = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)
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


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message (a library that logs a URL
    with its credentials, an exception text that quotes one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
