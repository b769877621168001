"""Property-based fuzz of what ``POST /v1/predict`` does before the model: the request
guard (header and body limits), the JSON / multipart / raw parsers and each image's header
check and decode. Property: every request is answered 200 or a 4xx ``ServeError`` with a
code and a message; nothing escapes as an exception (which Serve would answer 500).

In-process and fast (a few seconds for 2,500 generated requests) so CI runs it on every
push; the same code answers the real endpoint (tests/integration/test_serve.py fuzzes that
over HTTP with hand-written mutants)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ageray.serving import Limits, RequestGuard, ServeError, decode_checked, parse_predict_body
from ageray.serving.requests import JSON_KEYS, MULTIPART_FIELDS

LIMITS = Limits(max_image_bytes=64 * 1024, max_request_bytes=128 * 1024, max_images=4)


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the checkout
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


COUNTS = {"json": 1200, "multipart": 1000, "raw": 300}


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90 if mode == "L" else (90, 60, 30)).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [_image("JPEG"), _image("PNG"), _image("PNG", "L"), _image("GIF"), _image("BMP")]


# --------------------------------------------------------------------------- the pipeline


async def _predict_before_model(scope: dict, receive: Any, send: Any) -> None:
    """The handler's steps up to the forward: parse, then decode every image."""
    message = await receive()
    headers = dict(scope["headers"])
    ctype = headers.get(b"content-type", b"").decode("latin-1") or None
    try:
        parsed = parse_predict_body(ctype, message["body"], LIMITS)
        for img in parsed.images:
            decode_checked(img.data, img.name, LIMITS, 32)
    except ServeError as err:
        await err.send(send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


GUARD = RequestGuard(_predict_before_model, limits=LIMITS)


def post(content_type: str | None, body: bytes) -> int:
    """One request through the guard and the parsers; returns the status."""
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1", "replace")))
    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(GUARD(scope, receive, send))
    status = sent[0]["status"]
    if status != 200:
        error = json.loads(sent[1]["body"])["error"]
        assert error["code"] and len(error["message"]) > 10, error
    return status


def assert_4xx_or_200(status: int, what: Any) -> None:
    assert status == 200 or 400 <= status < 500, (status, what)


# --------------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
image_bytes = st.sampled_from(IMAGES) | st.binary(max_size=300)


@st.composite
def base64_values(draw: st.DrawFn) -> Any:
    data = draw(image_bytes)
    text = base64.b64encode(data).decode()
    kind = draw(st.integers(0, 5))
    if kind == 1:
        text = f"data:image/png;base64,{text}"
    elif kind == 2:  # MIME line breaks
        text = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))
    elif kind == 3 and text:  # damaged
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(["!", "=", " ", "é", "\x00", "=="])) + text[i + 1 :]
    elif kind == 4:
        return draw(json_values)
    elif kind == 5:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # integers past Python's int-string digit limit (4300 digits)
        digits = draw(st.integers(4000, 6000))
        return b'{"image": ' + b"7" * digits + b"}"
    if kind == 1:  # deep nesting
        return b"[" * draw(st.integers(100, 5000))
    if kind == 2:  # any JSON value at all
        return json.dumps(draw(json_values)).encode()
    if kind == 3:  # raw bytes
        return draw(st.binary(max_size=400))
    keys = draw(st.lists(st.sampled_from([*JSON_KEYS, "img", "Image", ""]), min_size=1, max_size=3))
    doc: dict[str, Any] = {}
    for key in keys:
        if key == "images":
            doc[key] = draw(st.lists(base64_values(), max_size=6) | json_values)
        elif key == "distribution":
            doc[key] = draw(st.booleans() | json_values)
        else:
            doc[key] = draw(base64_values())
    text = json.dumps(doc).encode()
    if kind == 9 and text:  # truncated or with a byte replaced
        i = draw(st.integers(0, len(text) - 1))
        text = (
            text[:i] + draw(st.binary(max_size=2)) + text[i + 1 : draw(st.integers(i, len(text)))]
        )
    return text


boundaries = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=? ",
    min_size=1,
    max_size=70,
)


@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(boundaries)
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from((*MULTIPART_FIELDS, "note", "", 'fi"le')) | st.text(max_size=8))
        disp = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disp += f'; filename="{draw(st.text(max_size=10))}"'
        head = f"Content-Disposition: {disp}\r\n"
        if draw(st.booleans()):
            head += f"Content-Type: {draw(st.sampled_from(['image/jpeg', 'text/plain', '']))}\r\n"
        if draw(st.integers(0, 9)) == 0:
            head += f"{draw(st.text(max_size=10))}: {draw(st.text(max_size=10))}\r\n"
        parts.append(
            f"--{boundary}\r\n{head}\r\n".encode("utf-8", "surrogatepass")
            + draw(image_bytes)
            + b"\r\n"
        )
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    mangle = draw(st.integers(0, 5))
    if mangle == 1 and body:
        body = body[: draw(st.integers(0, len(body)))]
    elif mangle == 2 and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + draw(st.binary(min_size=1, max_size=8)) + body[i + 1 :]
    elif mangle == 3:
        body = draw(st.binary(max_size=300))
    ctype = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                f'multipart/form-data; boundary="{boundary}"',
                "multipart/form-data",
                "multipart/form-data; boundary=",
                f"multipart/form-data; charset=utf-8; boundary={boundary}",
                f"multipart/form-data; boundary={boundary}x",
            ]
        )
    )
    return ctype, body


# --------------------------------------------------------------------------- properties


@fuzz(COUNTS["json"])
@given(
    ctype=st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "application/ld+json",
            "APPLICATION/JSON",
        ]
    ),
    body=json_bodies(),
)
def test_json_bodies_are_4xx_or_200(ctype: str, body: bytes) -> None:
    assert_4xx_or_200(post(ctype, body), body[:200])


@fuzz(COUNTS["multipart"])
@given(request=multipart_requests())
def test_multipart_bodies_are_4xx_or_200(request: tuple[str, bytes]) -> None:
    ctype, body = request
    assert_4xx_or_200(post(ctype, body), (ctype, body[:200]))


@fuzz(COUNTS["raw"])
@given(
    ctype=st.sampled_from(
        ["image/jpeg", "image/png", "application/octet-stream", "text/plain", None]
    )
    | st.text(max_size=40),
    body=image_bytes | st.binary(max_size=2000),
)
def test_raw_bodies_and_any_content_type_are_4xx_or_200(ctype: str | None, body: bytes) -> None:
    assert_4xx_or_200(post(ctype, body), (ctype, body[:100]))


def test_the_fuzz_runs_at_least_2000_requests() -> None:
    assert sum(COUNTS.values()) >= 2000


def test_int_digit_limit_is_a_400_not_a_500() -> None:
    """The case the issue names: ``int("7" * 5000)`` raises ValueError, not JSONDecodeError."""
    assert post("application/json", b'{"image": ' + b"7" * 5000 + b"}") == 400
    assert post("application/json", b'{"images": [' + b"1" * 4301 + b"]}") == 400
