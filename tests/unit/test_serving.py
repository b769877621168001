"""Serving rules without Ray: request parsing, limits, decoding, the served model's forward
and answers, auth, admission. Each bad-input class has its own test that checks the status
and the error code a client would branch on."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_tiny_model
from model_predict import predict
from PIL import Image

from ageray.config import ModelConfig
from ageray.data.transforms import decode_image, preprocess_for_eval
from ageray.model import build_model, save_model
from ageray.serving import (
    Admission,
    Limits,
    ServeError,
    ServeSettings,
    build_prediction,
    check_auth,
    check_image_header,
    decode_checked,
    load_served_model,
    parse_predict_body,
    warmup,
)

LIMITS = Limits()


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def face_jpeg(size: int = 96, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr, "RGB"), "JPEG", quality=90)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (1-bit grey) with a tiny IDAT: what a
    decompression bomb looks like before inflation."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "xYzBoUnDaRy") -> bytes:
    out = b""
    for name, filename, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (
            (
                f"--{boundary}\r\nContent-Disposition: {disp}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


MP = "multipart/form-data; boundary=xYzBoUnDaRy"


def raises(status: int, code: str, fn, *args, **kwargs) -> ServeError:
    with pytest.raises(ServeError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert (err.status, err.code) == (status, code), repr(err)
    assert err.body() == {"error": {"code": code, "message": err.message}}
    assert len(err.message) > 20  # names the problem and the fix
    return err


# --------------------------------------------------------------------------- parsing


def test_raw_image_body() -> None:
    data = face_jpeg()
    for ctype in ("image/jpeg", "image/png", "application/octet-stream"):
        parsed = parse_predict_body(ctype, data, LIMITS)
        assert [p.data for p in parsed.images] == [data]
        assert not parsed.many


def test_multipart_file_and_image_fields() -> None:
    data = face_jpeg()
    for field in ("file", "image"):
        parsed = parse_predict_body(MP, multipart([(field, "face.jpg", data)]), LIMITS)
        assert parsed.images[0].data == data and not parsed.many
    body = multipart([("note", None, b"hi"), ("file", "a.jpg", data), ("image", "b.jpg", data)])
    parsed = parse_predict_body(MP, body, LIMITS)
    assert len(parsed.images) == 2 and parsed.many


def test_json_single_and_many() -> None:
    data = face_jpeg()
    b64 = base64.b64encode(data).decode()
    parsed = parse_predict_body("application/json", json.dumps({"image": b64}).encode(), LIMITS)
    assert parsed.images[0].data == data and not parsed.many
    body = json.dumps({"images": [b64, b64, b64], "distribution": True}).encode()
    parsed = parse_predict_body("application/json; charset=utf-8", body, LIMITS)
    assert len(parsed.images) == 3 and parsed.many and parsed.distribution
    # data URLs and MIME line breaks are accepted
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    for value in (f"data:image/jpeg;base64,{b64}", wrapped):
        parsed = parse_predict_body(
            "application/json", json.dumps({"image": value}).encode(), LIMITS
        )
        assert parsed.images[0].data == data


def test_empty_body() -> None:
    for ctype in ("image/jpeg", "application/json", MP):
        raises(400, "empty_body", parse_predict_body, ctype, b"", LIMITS)


def test_wrong_content_type_is_415() -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "video/mp4"):
        err = raises(415, "unsupported_media_type", parse_predict_body, ctype, b"abc", LIMITS)
        assert "multipart/form-data" in err.message
    raises(415, "unsupported_media_type", parse_predict_body, None, b"abc", LIMITS)


def test_malformed_json_and_shapes() -> None:
    for body in (b"{", b"\xff\xfe", b'{"image": "abc"'):
        raises(400, "malformed_json", parse_predict_body, "application/json", body, LIMITS)
    cases = [
        b"[1, 2]",
        b'{"imgs": "x"}',
        b'{"image": "x", "images": ["x"]}',
        b"{}",
        b'{"images": "abc"}',
        b'{"images": []}',
        b'{"image": 3}',
        b'{"image": "x", "distribution": "yes"}',
    ]
    for body in cases:
        raises(422, "invalid_request", parse_predict_body, "application/json", body, LIMITS)


def test_malformed_base64() -> None:
    for value in ("not base64!!", "abc", "data:image/png,xyz"):
        body = json.dumps({"image": value}).encode()
        raises(400, "malformed_base64", parse_predict_body, "application/json", body, LIMITS)
    body = json.dumps({"images": [base64.b64encode(b"x").decode(), "%%%"]}).encode()
    err = raises(400, "malformed_base64", parse_predict_body, "application/json", body, LIMITS)
    assert "images[1]" in err.message
    raises(400, "empty_image", parse_predict_body, "application/json", b'{"image": ""}', LIMITS)


def test_too_many_images() -> None:
    limits = Limits(max_images=3)
    b64 = base64.b64encode(face_jpeg()).decode()
    body = json.dumps({"images": [b64] * 4}).encode()
    raises(413, "too_many_images", parse_predict_body, "application/json", body, limits)
    files = [("file", f"{i}.jpg", face_jpeg()) for i in range(4)]
    raises(413, "too_many_images", parse_predict_body, MP, multipart(files), limits)


def test_image_over_size_limit_is_413() -> None:
    limits = Limits(max_image_bytes=1000, max_request_bytes=100_000)
    big = face_jpeg(128)
    assert len(big) > 1000
    raises(413, "payload_too_large", parse_predict_body, "image/jpeg", big, limits)
    body = json.dumps({"image": base64.b64encode(big).decode()}).encode()
    raises(413, "image_too_large", parse_predict_body, "application/json", body, limits)
    raises(413, "image_too_large", parse_predict_body, MP, multipart([("file", "a", big)]), limits)
    huge = b"{" + b" " * 200_000 + b"}"
    raises(413, "payload_too_large", parse_predict_body, "application/json", huge, limits)
    raises(413, "image_too_large", check_image_header, big, "x", limits)


def test_default_size_limit_is_10mb() -> None:
    assert Limits().max_image_bytes == 10 * 1024 * 1024
    raw = b"\xff\xd8\xff" + b"\0" * (10 * 1024 * 1024)
    raises(413, "payload_too_large", parse_predict_body, "image/jpeg", raw, LIMITS)


def test_malformed_multipart() -> None:
    raises(400, "malformed_multipart", parse_predict_body, "multipart/form-data", b"abc", LIMITS)
    bad = b"--xYzBoUnDaRy\r\nthis is not a header line at all\r\n\r\n"
    raises(400, "malformed_multipart", parse_predict_body, MP, bad + b"\0" * 10, LIMITS)
    body = multipart([("note", None, b"hello")])
    raises(422, "missing_image", parse_predict_body, MP, body, LIMITS)


# --------------------------------------------------------------------------- decoding


def test_not_an_image_and_truncated() -> None:
    raises(400, "not_an_image", decode_checked, b"hello world, not pixels", "x", LIMITS, 64)
    raises(400, "not_an_image", decode_checked, b"\0" * 64, "x", LIMITS, 64)
    jpeg = face_jpeg(128)
    raises(400, "truncated_image", decode_checked, jpeg[: len(jpeg) // 2], "x", LIMITS, 64)
    png = encode(Image.new("RGB", (64, 64), (10, 20, 30)))
    raises(400, "truncated_image", decode_checked, png[:40], "x", LIMITS, 64)
    raises(400, "empty_image", decode_checked, b"", "x", LIMITS, 64)


def test_pixel_limit_from_header_before_decoding() -> None:
    bomb = png_header_only(10_000, 10_000)  # 10^8 pixels declared in ~100 bytes
    t0 = time.perf_counter()
    err = raises(413, "too_many_pixels", decode_checked, bomb, "x", LIMITS, 64)
    assert time.perf_counter() - t0 < 1.0 and "10000x10000" in err.message
    bomb = png_header_only(100_000, 100_000)  # past Pillow's own guard as well
    raises(413, "too_many_pixels", decode_checked, bomb, "x", LIMITS, 64)
    small = Limits(max_pixels=64 * 64 - 1)
    raises(413, "too_many_pixels", decode_checked, encode(Image.new("L", (64, 64))), "x", small, 64)
    decode_checked(encode(Image.new("L", (64, 64))), "x", Limits(max_pixels=64 * 64), 64)


def test_pillow_decompression_bomb_error_is_413_too() -> None:
    """With our own limit set very high, Pillow's guard (2x its MAX_IMAGE_PIXELS) still
    catches the bomb and it is still a 413, not a 500."""
    limits = Limits(max_pixels=10**12)
    bomb = png_header_only(30_000, 30_000)  # 9e8 > 2 * 89,478,485
    raises(413, "too_many_pixels", decode_checked, bomb, "x", limits, 64)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(Image.new("L", (40, 30), 128)),
        lambda: encode(Image.new("L", (40, 30), 128), "JPEG"),
        lambda: encode(Image.new("CMYK", (40, 30), (10, 20, 30, 40)), "JPEG"),
        lambda: encode(Image.new("RGBA", (40, 30), (10, 20, 30, 0))),
        lambda: encode(Image.new("LA", (40, 30), (10, 128))),
        lambda: encode(Image.new("P", (40, 30), 3), transparency=3),
        lambda: encode(Image.new("1", (40, 30), 1)),
        lambda: encode(Image.fromarray(np.full((30, 40), 40000, np.uint16))),  # 16-bit
        lambda: encode(Image.new("RGB", (1, 1), (200, 100, 50))),
        lambda: encode(Image.new("RGB", (8, 8), (200, 100, 50)), "JPEG"),
        lambda: encode(Image.new("RGB", (8, 8), (200, 100, 50)), "GIF"),
        lambda: encode(Image.new("RGB", (8, 8), (200, 100, 50)), "BMP"),
        lambda: encode(Image.new("RGB", (8, 8), (200, 100, 50)), "WEBP"),
        lambda: encode(Image.new("RGB", (8, 8), (200, 100, 50)), "TIFF"),
    ],
)
def test_any_mode_and_tiny_images_are_answered(make, served) -> None:
    data = make()
    img = decode_checked(data, "x", LIMITS, served.image_size)
    assert img.mode == "RGB"
    prep = served.model_input(data, "x", LIMITS)
    assert prep.tensor.shape == (3, served.image_size, served.image_size)
    assert torch.isfinite(prep.tensor).all()
    out = served.forward(prep.tensor[None])
    assert np.isfinite(out[0]["age"])


# --------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def served(model_dir: Path):
    return load_served_model(str(model_dir), "cpu")


def test_load_local_folder(served, model_dir: Path) -> None:
    assert served.image_size == 64
    assert served.head_names == ["vanilla", "balanced"]
    assert served.registry["uri"] == str(model_dir)
    desc = served.describe()
    assert desc["config"]["data"] == {"image_size": 64, "normalize": "imagenet"}
    assert desc["config"]["model"]["backbone"] == "resnet18"
    assert warmup(served, (1, 2)) > 0


def test_model_input_is_evaluation_preprocessing(served) -> None:
    data = face_jpeg(200, seed=3)
    prep = served.model_input(data, "x", LIMITS)
    ref = preprocess_for_eval(
        [decode_image(data, target_size=64)], served.predictor.spec.data_config()
    )[0]
    assert torch.equal(prep.tensor, ref)
    assert prep.face is None and prep.decode_ms > 0


def test_forward_matches_model_predict(served) -> None:
    data = [face_jpeg(96, seed=s) for s in range(5)]
    x = torch.stack([served.model_input(d, "x", LIMITS).tensor for d in data])
    outs = served.forward(x)
    pred = predict(served.predictor.model, x, flip=True, rule="smaller")
    for i, out in enumerate(outs):
        assert out["age"] == pytest.approx(float(pred.age[i]), abs=1e-6)
        assert out["head"] == ("balanced" if int(pred.head[i]) else "vanilla")
        for name in ("vanilla", "balanced"):
            assert out[f"age_{name}"] == pytest.approx(float(pred.heads[name]["age"][i]), abs=1e-6)
            assert out[f"kl_{name}"] == pytest.approx(float(pred.heads[name]["kl"][i]), rel=1e-9)
        other = "vanilla" if out["head"] == "balanced" else "balanced"
        assert out[f"kl_{out['head']}"] <= out[f"kl_{other}"]  # AR: the smaller flip-KL answers
        assert out["age"] == pytest.approx(out[f"age_{out['head']}"], abs=1e-4)
        assert out["rule"] == "smaller" and out["age_low"] <= out["age"] <= out["age_high"]
    # batched and one-at-a-time answers agree (what the batching in Serve relies on)
    single = [served.forward(x[i : i + 1])[0]["age"] for i in range(len(data))]
    assert np.allclose(single, [o["age"] for o in outs], atol=1e-4)


def test_gpu_buckets_pad_the_batch_and_answer_the_same(served) -> None:
    """A GPU replica pads each batch to a bucket size (fixed shapes for cuDNN); the padding's
    rows are dropped and the real images' answers are those of the unpadded batch. Checked
    here on the CPU with the buckets a GPU replica would get."""
    import dataclasses

    from ageray.serving import batch_buckets
    from ageray.serving.model import padded_size

    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(1) == (1,)
    assert [padded_size(n, (1, 2, 4, 8)) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 9]
    assert padded_size(3, ()) == 3
    assert served.buckets == ()  # CPU: no padding (no per-shape kernel choice to amortise)

    x = torch.stack(
        [served.model_input(face_jpeg(96, seed=s), "x", LIMITS).tensor for s in range(3)]
    )
    bucketed = dataclasses.replace(served, buckets=batch_buckets(8))
    got, want = bucketed.forward(x), served.forward(x)
    assert len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert g["head"] == w["head"]
        assert g["age"] == pytest.approx(w["age"], abs=1e-4)
    assert warmup(bucketed, (1,)) > 0  # every bucket warms up


def test_auto_backend_is_onnxruntime_on_the_cpu(served, model_dir: Path) -> None:
    """serve/config.yaml deploys backend auto: ONNX Runtime on a CPU replica (the faster
    there, benchmarks/RESULTS.md), answering as the torch forward does."""
    auto = load_served_model(str(model_dir), "cpu", backend="auto")
    assert auto.backend == "onnxruntime"
    x = torch.stack([served.model_input(face_jpeg(96, seed=s), "x", LIMITS).tensor for s in (1, 2)])
    for a, t in zip(auto.forward(x), served.forward(x), strict=True):
        assert a["head"] == t["head"] and a["age"] == pytest.approx(t["age"], abs=1e-3)


def test_build_prediction(served) -> None:
    x = served.model_input(face_jpeg(), "x", LIMITS).tensor[None]
    res = served.forward(x)[0]
    timing = {"decode": 1.23456, "queue": 0.1, "forward": 5.0, "total": 7.0}
    out = build_prediction(res, served, timing_ms=timing, batch_size=1)
    assert set(out) == {
        "age", "head", "heads", "interval", "rule", "model", "timing_ms", "batch_size"
    }  # fmt: skip
    assert out["head"] in ("vanilla", "balanced")
    assert out["interval"]["level"] == 0.9
    assert out["interval"]["low"] <= out["age"] <= out["interval"]["high"]
    assert set(out["heads"]) == {"vanilla", "balanced"}
    assert set(out["heads"]["vanilla"]) == {"age", "kl"}
    assert out["model"]["uri"] == served.registry["uri"]
    assert out["timing_ms"]["decode"] == 1.235
    json.dumps(out)  # plain JSON types only
    out = build_prediction(res, served, distribution=True, face={"found": True, "box": [1, 2]})
    assert len(out["distribution"]) == 101
    assert sum(out["distribution"]) == pytest.approx(1.0, abs=1e-4)
    assert out["age"] == pytest.approx(
        sum(k * p for k, p in enumerate(out["distribution"])), abs=1e-3
    )
    assert out["face"] == {"found": True, "box": [1, 2]}


def test_normalize_null_falls_back_to_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(), image_size=64)
    save_model(model, tmp_path / "m")  # no cfg: data.normalize is null in model.json
    served = load_served_model(str(tmp_path / "m"), "cpu")
    assert served.predictor.spec.normalize == "imagenet" and served.head_names == ["vanilla"]
    out = served.forward(served.model_input(face_jpeg(), "x", LIMITS).tensor[None])[0]
    assert out["head"] == "vanilla" and out["age_balanced"] is None
    assert set(build_prediction(out, served)["heads"]) == {"vanilla"}


def test_aligned_model_reports_the_face(tmp_path: Path) -> None:
    from ageray.data.synthetic import iter_synthetic

    meta = {"align": True, "align_options": {"detector": "haar", "output_size": 112}}
    served = load_served_model(str(make_tiny_model(tmp_path / "m", meta=meta)), "cpu")
    assert served.predictor.aligner is not None
    face = next(iter(iter_synthetic(num_samples=1, image_size=160))).image
    for data in (face, encode(Image.new("RGB", (8, 8), (90, 90, 90)))):
        prep = served.model_input(data, "x", LIMITS)
        assert prep.tensor.shape == (3, 64, 64)
        assert set(prep.face) == {"found", "box", "score", "detector"}
        assert prep.face["detector"] == "haar"
    assert not served.model_input(encode(Image.new("RGB", (8, 8), (90, 90, 90))), "x", LIMITS).face[
        "found"
    ]


# --------------------------------------------------------------------------- auth


def test_auth() -> None:
    check_auth(None, None)  # auth off
    check_auth("Bearer whatever", "")
    check_auth("Bearer s3cret", "s3cret")
    check_auth("bearer  s3cret ", "s3cret")
    for header in (None, "", "Basic s3cret", "Bearer", "Bearer wrong", "s3cret"):
        err = raises(401, "unauthorized", check_auth, header, "s3cret")
        assert err.headers["WWW-Authenticate"].startswith("Bearer")


# --------------------------------------------------------------------------- admission


def test_admission_bounds_inflight_images() -> None:
    adm = Admission(10)
    assert adm.try_enter(6) and adm.try_enter(4)
    assert not adm.try_enter(1)
    err = adm.overloaded(2)
    assert (err.status, err.code, err.headers["Retry-After"]) == (503, "overloaded", "2")
    adm.leave(4)
    assert adm.try_enter(3) and adm.inflight == 9


# --------------------------------------------------------------------------- settings


def test_settings_from_user_config() -> None:
    s = ServeSettings.from_mapping(
        {"max_batch_size": "8", "batch_wait_timeout_s": 0.005, "limits": {"max_images": 4}}
    )
    assert (s.max_batch_size, s.batch_wait_timeout_s, s.limits.max_images) == (8, 0.005, 4)
    s2 = ServeSettings.from_mapping({"max_image_bytes": 1000}, base=s)
    assert s2.limits.max_image_bytes == 1000 and s2.max_batch_size == 8
    assert s.limits.max_image_bytes == Limits().max_image_bytes  # base not mutated
    with pytest.raises(ValueError, match="did you mean 'max_batch_size'"):
        ServeSettings.from_mapping({"max_batch_sise": 4})
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings.from_mapping({"max_batch_size": 0})
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        ServeSettings.from_mapping({"batch_wait_timeout_s": 5})
    with pytest.raises(ValueError, match="max_inflight_images"):
        ServeSettings.from_mapping({"max_inflight_images": 2, "max_images": 4})
    assert ServeSettings().public()["auth_token_env"] == "AGERAY_API_TOKEN"


# --------------------------------------------------------------------------- batch window


def test_batch_window() -> None:
    from ageray.serving import BatchWindow

    s = ServeSettings(batch_wait_timeout_s=0.002)
    w = BatchWindow()
    assert w.wait(0.0, decoding=0, settings=s) == 0.0  # lone request: no wait
    assert w.wait(0.0, decoding=3, settings=s) == 0.002  # others being decoded
    w.started(8, now=10.0)  # no estimate yet: nothing to wait for
    assert w.wait(10.0, 0, s) == 0.0
    w.finished(8, 0.080)  # 10 ms per image
    w.started(8, now=20.0)  # expected to run until 20.080
    assert w.wait(20.030, 0, s) == pytest.approx(0.050)
    assert w.wait(20.079, 5, s) == pytest.approx(0.002)  # at least the decode wait
    w.finished(8, 0.080)
    assert w.wait(20.1, 0, s) == 0.0  # forward idle again
    w.started(10_000, now=30.0)
    assert w.wait(30.0, 0, s) == w.cap_s  # never longer than the cap
    off = ServeSettings(max_batch_size=1)
    assert w.wait(30.0, 5, off) == 0.0
    fixed = ServeSettings(batch_wait_mode="fixed", batch_wait_timeout_s=0.01)
    assert w.wait(0.0, 0, fixed) == 0.01


def test_channels_last_serving_matches_plain_model(model_dir: Path, served) -> None:
    fast = load_served_model(str(model_dir), "cpu", channels_last=True)
    x = torch.stack(
        [served.model_input(face_jpeg(96, seed=s), "x", LIMITS).tensor for s in range(4)]
    )
    for a, b in zip(fast.forward(x), served.forward(x)):
        assert abs(a["age"] - b["age"]) < 1e-4 and a["head"] == b["head"]
