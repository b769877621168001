"""Every face through the one path: a photo composed of three real UTKFace faces (a child,
an adult, an elderly person) answers three faces whose boxes cover the sources and whose
ages equal each face's answer when its chip is sent alone; a wall answers no face; a 1x1
and a 10000x1 image say they hold no usable face. Serve's rendering (without Ray) and the
``ageray predict`` command (a subprocess) give the same answers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datagen import make_tiny_model
from faces import compose_photo, covers, utk_faces_by_band, wall_photo
from PIL import Image

from ageray.inference import load_predictor
from ageray.serving import Limits, build_answers, load_served_model

ROOT = Path(__file__).resolve().parents[2]
AGE_TOL = 0.5  # years: issue 23's bound between a face in the photo and the face alone


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faces") / "m", 0)


@pytest.fixture(scope="module")
def family(utkface_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    bands = utk_faces_by_band(utkface_tar)
    chips = [v[0][2] for v in bands.values()]
    photo, boxes = compose_photo(chips)
    folder = tmp_path_factory.mktemp("photos")
    (folder / "family.png").write_bytes(photo)
    (folder / "wall.jpg").write_bytes(wall_photo())
    return {"photo": photo, "boxes": boxes, "chips": chips, "folder": folder}


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 110, 100)).save(buf, format="PNG")
    return buf.getvalue()


def _missing(v: object) -> bool:
    return isinstance(v, float) and v != v  # NaN


def match(rows: list[dict], boxes: list) -> list[dict]:
    """The row whose box covers each source rectangle (exactly one each)."""
    out = []
    for source in boxes:
        hits = [r for r in rows if r["face_box"] is not None and covers(r["face_box"], source)]
        assert len(hits) == 1, (source, [r["face_box"] for r in rows])
        out.append(hits[0])
    return out


@pytest.mark.realdata
def test_three_faces_answer_as_each_face_alone(model_dir: Path, family: dict) -> None:
    path = load_predictor(model_dir)
    (photo,) = path.predict_images([family["photo"]], keys=["family"], faces="all")
    assert photo.error is None and photo.reason is None and len(photo.rows) == 3
    assert (photo.width, photo.height) == Image.open(io.BytesIO(family["photo"])).size
    assert [r["face_index"] for r in photo.rows] == [0, 1, 2]
    for row in photo.rows:
        assert row["key"] == "family" and row["error"] is None and row["quality"] is None
        assert len(row["face_landmarks"]) == 10 and row["face_score"] >= 0.9
    alone = path.predict(family["chips"], keys=["child", "adult", "elderly"], faces="all")
    assert [r["face_index"] for r in alone] == [0, 0, 0]  # one face in each chip
    for face, chip in zip(match(photo.rows, family["boxes"]), alone):
        assert abs(face["age"] - chip["age"]) <= AGE_TOL, (face["age"], chip["age"])
        assert abs(face["age_vanilla"] - chip["age_vanilla"]) <= AGE_TOL
    # faces=largest is the single-image path as before: one row per image, no face index
    largest = path.predict([family["photo"], *family["chips"]], faces="largest")
    assert len(largest) == 4 and all(r["face_index"] is None for r in largest)
    assert largest[1]["age"] == path.predict(family["chips"][:1])[0]["age"]


@pytest.mark.realdata
def test_no_face_and_unusable_sizes(model_dir: Path, family: dict) -> None:
    path = load_predictor(model_dir)
    wall, tiny, line = path.predict_images(
        [wall_photo(), png(1, 1), png(10000, 1)], keys=["wall", "1x1", "line"], faces="all"
    )
    (row,) = wall.rows
    assert row["age"] is None and row["face_found"] is False
    assert row["error"] == "no_face: no face with score >= 0.9 and size >= 16 px found"
    assert wall.to_json()["faces"] == [] and wall.to_json()["reason"] == row["error"][9:]
    for answer in (tiny, line):
        (row,) = answer.rows
        assert row["age"] is None and row["error"].startswith("no_face: image ")
        assert "no face can be read" in row["quality"]
    # faces=largest still answers (chips and datasets), with the note
    rows = path.predict([png(1, 1), png(10000, 1), family["chips"][0]], faces="largest")
    assert rows[0]["age"] is not None and "1x1 px" in rows[0]["quality"]
    assert rows[1]["age"] is not None and "10000x1 px" in rows[1]["quality"]
    assert rows[2]["quality"] is None


@pytest.mark.realdata
def test_serve_rendering_matches_the_path(model_dir: Path, family: dict) -> None:
    """The replica's steps without Ray: model_faces per image, one forward over all faces
    of the request, build_answers; the JSON validates against /openapi.json's schema."""
    import jsonschema
    import torch

    from ageray.serving.schema import FACES_SCHEMA, PREDICTION_SCHEMA

    served = load_served_model(str(model_dir), "cpu", backend="torch")
    images = [family["photo"], wall_photo(), family["chips"][0]]
    inputs = [served.model_faces(d, f"img{i}", Limits(), "all") for i, d in enumerate(images)]
    tensors = [f.tensor for p in inputs for f in p.faces]
    assert len(tensors) == 4  # 3 + 0 + 1 faces, one batch
    rows = served.forward(torch.stack(tensors))
    meta = {"queue_ms": 0.0, "forward_ms": 1.0, "batch_size": len(tensors)}
    answers = build_answers(
        inputs, [(r, meta) for r in rows], served, faces="all", distribution=False,
        read_ms=0.0, total_ms=1.0,
    )  # fmt: skip
    for a in answers:
        jsonschema.Draft202012Validator(FACES_SCHEMA).validate(a)
    assert [len(a["faces"]) for a in answers] == [3, 0, 1]
    assert answers[1]["reason"] == "no face with score >= 0.9 and size >= 16 px found"
    want = load_predictor(model_dir).predict([family["photo"]], faces="all")
    for face, row in zip(answers[0]["faces"], want):
        assert face["index"] == row["face_index"] and face["box"] == row["face_box"]
        assert abs(face["age"] - row["age"]) <= 1e-4 and len(face["landmarks"]) == 5
    assert answers[0]["batch_size"] == 4 and answers[0]["image"] == {"width": 880, "height": 320}
    flat = served.model_faces(png(1, 1), "one", Limits(), "largest")
    (row,) = served.forward(flat.faces[0].tensor[None])
    (answer,) = build_answers(
        [flat], [(row, meta)], served, faces="largest", distribution=False, read_ms=0.0,
        total_ms=1.0,
    )  # fmt: skip
    jsonschema.Draft202012Validator(PREDICTION_SCHEMA).validate(answer)
    assert "faces" not in answer and "1x1 px" in answer["quality"]


@pytest.mark.realdata
def test_ageray_predict_command(model_dir: Path, family: dict) -> None:
    folder = family["folder"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT)])
    (folder / "broken.jpg").write_bytes(b"not an image")
    cmd = [sys.executable, "-m", "ageray.cli", "predict", "--model", str(model_dir)]
    photos = [str(folder / name) for name in ("family.png", "wall.jpg")]
    broken = [str(folder / "broken.jpg"), str(folder / "missing.jpg")]
    out = subprocess.run(
        [*cmd, *photos, *broken, "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1  # the readable photos answered, the others named on stderr
    assert "broken.jpg" in out.stderr and "missing.jpg" in out.stderr
    assert "No such file" in out.stderr
    doc = json.loads(out.stdout)["predictions"]
    assert [d["key"] for d in doc] == photos and [len(d["faces"]) for d in doc] == [3, 0]
    assert doc[1]["reason"].startswith("no face with score >= 0.9")
    want = load_predictor(model_dir).predict([family["photo"]], faces="all")
    assert [round(f["age"], 4) for f in doc[0]["faces"]] == [round(r["age"], 4) for r in want]
    table = subprocess.run([*cmd, photos[0]], capture_output=True, text=True, env=env)
    assert table.returncode == 0 and "3 faces" in table.stdout, table.stderr
    assert len([ln for ln in table.stdout.splitlines() if ln.strip()[:1].isdigit()]) == 3


def test_job_form_is_told_apart() -> None:
    from ageray.cli import VERBS, is_job_form

    assert is_job_form(["--model", "m", "--input", "photos/", "--output", "x.parquet"])
    assert is_job_form(["--output=x.parquet", "--input=d"])
    assert not is_job_form(["photo.jpg", "--model", "m", "--json"])
    assert {"promote", "crossval"} <= set(VERBS)


@pytest.mark.realdata
def test_pyfunc_and_batch_worker_answer_per_face(model_dir: Path, family: dict) -> None:
    """The pyfunc model (params faces=all) and jobs.predict's map_batches worker give the
    path's per-face rows; faces=largest (the pyfunc's default) a row per image."""
    from types import SimpleNamespace

    import pandas as pd
    import pyarrow as pa

    from ageray.inference.batch import BatchWorker
    from ageray.registry.pyfunc_model import AgeRayPyfunc

    images = [family["photo"], wall_photo(), *family["chips"]]
    keys = ["family", "wall", "child", "adult", "elderly"]
    want = load_predictor(model_dir).predict(images, keys=keys, faces="all")
    assert [r["key"] for r in want] == ["family"] * 3 + keys[1:]
    py = AgeRayPyfunc()
    py.load_context(SimpleNamespace(artifacts={"model": str(model_dir)}))
    frame = py.predict(None, pd.DataFrame({"key": keys, "image": images}), params={"faces": "all"})
    # pandas holds a missing value as NaN (None in the path's rows)
    got = [{k: None if _missing(v) else v for k, v in r.items()} for r in frame.to_dict("records")]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["key"], g["face_index"], g["error"]) == (w["key"], w["face_index"], w["error"])
        assert g["age"] == w["age"]
    faces = match(got[:3], family["boxes"])
    for face, chip in zip(faces, got[4:]):
        assert abs(face["age"] - chip["age"]) <= AGE_TOL
    assert len(py.predict(None, pd.DataFrame({"image": images}))) == 5  # largest: per image
    with pytest.raises(ValueError, match="faces"):
        py.predict(None, pd.DataFrame({"image": images[:1]}), params={"faces": "every"})
    batch = pa.table({"key": keys, "source": keys, "image": images, "error": [None] * 5})
    table = BatchWorker(str(model_dir), threads=None, faces="all")(batch).to_pylist()
    assert [(r["key"], r["face_index"]) for r in table] == [
        (r["key"], r["face_index"]) for r in want
    ]
    for t, w in zip(table, want):  # other batch compositions: float32 rounding only
        assert t["age"] == w["age"] or abs(t["age"] - w["age"]) <= 1e-4
    assert table[3]["error"].startswith("no_face:") and table[3]["face_box"] is None
    per_file = BatchWorker(str(model_dir), threads=None, faces="largest")(batch).to_pylist()
    assert [r["key"] for r in per_file] == keys
