"""Batch prediction with Ray Data, and exports logged to the registry, on real services.

* a folder of 16 images, 2 of them corrupt, through ``jobs.predict`` on a local Ray: 16 rows,
  the 2 with ``error`` set, the 14 answers those of the one path in-process;
* shards on S3 (the SeaweedFS server) in, Parquet on S3 out, ``jobs.predict`` as its own process
  (its own Ray, as under ``ray job submit``);
* a real Serve deployment of the app answers as the one path does in-process;
* ``jobs.export`` on a registered model (real ``mlflow server`` with S3 artifacts): the ONNX
  export lands in the registered model's tree, which holds no pickle-format file, and the
  onnxruntime backend uses it; TorchScript goes to the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from faces import face_records, make_routed_model, pickle_files

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_routed_model(tmp_path_factory.mktemp("predict") / "model", rule="learned")


def _rows(path: str) -> list[dict]:
    from ageray.inference.batch import read_parquet

    return read_parquet(path).to_pylist()


def test_predict_folder_with_corrupt_files(ray_local, model_dir: Path, tmp_path: Path) -> None:
    from ageray.inference import load_predictor
    from jobs.predict import main

    records, _ = face_records(14)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, r in enumerate(records):
        (folder / ("sub" if i % 2 else "") / f"{r.key}.jpg").write_bytes(r.image)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "cut.jpg").write_bytes(records[0].image[:300])
    (folder / "notes.txt").write_text("not an image: not listed")
    out = tmp_path / "out" / "ages.parquet"
    # a row per file: --faces largest (the default for a folder is a row per face)
    assert main(["--model", str(model_dir), "--input", str(folder), "--output", str(out),
                 "--batch-size", "8", "--actors", "2", "--no-progress",
                 "--faces", "largest"]) == 0  # fmt: skip
    rows = {r["key"]: r for r in _rows(str(out))}
    assert len(rows) == 16
    assert rows["broken.jpg"]["error"].startswith("not_image")
    assert rows["cut.jpg"]["error"].startswith("truncated") and rows["cut.jpg"]["age"] is None
    ok = [k for k, r in rows.items() if r["error"] is None]
    assert len(ok) == 14
    ref = load_predictor(model_dir)
    want = ref.predict([(folder / k).read_bytes() for k in ok], keys=ok)
    for w in want:
        got = rows[w["key"]]
        assert got["head"] == w["head"] and got["rule"] == "learned"
        for f in ("age", "age_low", "age_high", "age_vanilla", "kl_vanilla", "weight_balanced"):
            assert got[f] == pytest.approx(w[f], abs=1e-5), f  # other batch compositions
        assert got["source"] == str(folder / w["key"])


@pytest.mark.realdata
def test_predict_writes_a_row_per_face(
    ray_local, model_dir: Path, utkface_tar: Path, tmp_path: Path
) -> None:
    """Issue 23 through jobs.predict (Ray Data): a folder holding a photo of three real
    UTKFace faces, the three chips and a wall gives a row per face with its index and box
    (covering the sources), ages equal to each chip's row within 0.5 year, and one no_face
    row for the wall."""
    from faces import compose_photo, covers, utk_faces_by_band, wall_photo

    from ageray.inference import load_predictor
    from jobs.predict import main

    chips = [v[0][2] for v in utk_faces_by_band(utkface_tar).values()]
    photo, boxes = compose_photo(chips)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "family.png").write_bytes(photo)
    (folder / "wall.jpg").write_bytes(wall_photo())
    for name, chip in zip(("child", "adult", "elderly"), chips):
        (folder / f"{name}.jpg").write_bytes(chip)
    out = tmp_path / "faces.parquet"
    assert main(["--model", str(model_dir), "--input", str(folder), "--output", str(out),
                 "--actors", "1", "--no-progress"]) == 0  # fmt: skip
    rows = _rows(str(out))
    family = sorted((r for r in rows if r["key"] == "family.png"), key=lambda r: r["face_index"])
    assert [r["face_index"] for r in family] == [0, 1, 2]
    (wall,) = [r for r in rows if r["key"] == "wall.jpg"]
    assert wall["age"] is None and wall["error"].startswith("no_face: no face with score")
    for name, source in zip(("child", "adult", "elderly"), boxes):
        (face,) = [r for r in family if covers(r["face_box"], source)]
        (chip,) = [r for r in rows if r["key"] == f"{name}.jpg"]
        assert abs(face["age"] - chip["age"]) <= 0.5 and len(face["face_landmarks"]) == 10
    want = load_predictor(model_dir).predict([photo], keys=["family.png"], faces="all")
    for got, w in zip(family, want):
        assert got["face_box"] == w["face_box"]
        assert got["age"] == pytest.approx(w["age"], abs=1e-4)  # other batch compositions


def test_predict_s3_shards_to_s3_parquet(s3, model_dir: Path, tmp_path: Path) -> None:
    from ageray.data.shards import write_shards

    bucket = s3.make_bucket("predict")
    records, _ = face_records(10)
    write_shards(records, f"s3://{bucket}/shards", splits={"test": 0.5, "val": 0.5},
                 progress=False, workers=1)  # fmt: skip
    out = f"s3://{bucket}/predictions/test.parquet"
    env = {**os.environ, **s3.env, "PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.predict", "--model", str(model_dir), "--input",
           f"s3://{bucket}/shards", "--split", "test", "--output", out, "--actors", "1",
           "--set", "ray.num_cpus=1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[ageray] wrote s3://" in done.stdout
    from ageray.data.manifest import read_manifest

    manifest = read_manifest(f"s3://{bucket}/shards")
    rows = _rows(out)
    assert len(rows) == manifest["splits"]["test"]["count"] > 0
    assert all(r["error"] is None and r["source"].startswith("s3://") for r in rows)
    bad = subprocess.run([*cmd[:6], f"s3://{bucket}/nothing-here", *cmd[7:11]], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "nothing-here" in bad.stderr


def test_export_logged_with_the_registered_model(
    mlflow_srv, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from ageray.config import Config
    from ageray.tracking import Tracker, log_model, model_info

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_srv.uri)
    cfg = Config()
    cfg.tracking.experiment = "it-export"
    cfg.tracking.registered_model = "ageray-export"
    cfg.data.image_size = 64
    tracker = Tracker(cfg)
    run_id = tracker.start_pipeline("train")
    out = log_model(tracker, run_id, model_dir)
    tracker.end(run_id)
    uri = f"models:/{out['name']}/{out['version']}"

    from jobs.export import main

    assert main(["--model", uri, "--format", "onnx", "--output", str(tmp_path / "onnx"),
                 "--parity-images", "6"]) == 0  # fmt: skip
    assert main(["--model", uri, "--format", "torchscript", "--output", str(tmp_path / "ts"),
                 "--parity-images", "6"]) == 0  # fmt: skip
    tree = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    files = {str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()}
    assert "artifacts/model/export/onnx/model.onnx" in files
    assert pickle_files(tree) == [], sorted(files)
    tags = mlflow.MlflowClient().get_model_version(out["name"], out["version"]).tags
    assert tags["ageray.export.onnx"].endswith("artifacts/model/export/onnx")
    assert tags["ageray.export.torchscript"] == f"runs:/{run_id}/export/torchscript"
    run_files = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/export/torchscript",
                                                    dst_path=str(tmp_path / "ts-dl"))  # fmt: skip
    assert (Path(run_files) / "model.ts").is_file()
    assert model_info(uri)["run_id"] == run_id

    # the onnxruntime backend takes the logged export (exporting again would fail here)
    import ageray.inference.export as export

    def no_export(*args, **kwargs):
        raise AssertionError("the logged export should have been used")

    monkeypatch.setattr(export, "export_model", no_export)
    from ageray.inference import load_predictor

    path = load_predictor(uri, backend="onnxruntime")
    records, _ = face_records(3)
    rows = path.predict([r.image for r in records])
    assert all(r["error"] is None and r["rule"] == "learned" for r in rows)


def test_serve_answers_like_the_one_path(ray_local, model_dir: Path) -> None:
    """A real Serve deployment of the app (serve.app:build_app, HTTP) answers the same faces
    exactly as the one path in-process does (one image per request = one per forward)."""
    import httpx
    from ray import serve
    from services import free_port

    from ageray.inference import load_predictor

    sys.path.insert(0, str(ROOT))
    from serve.app import build_app

    records, _ = face_records(6)
    images = [r.image for r in records]
    want = load_predictor(model_dir).predict(images, batch_size=1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app(
            str(model_dir),
            settings={"device": "cpu", "channels_last": False, "torch_threads": 1},
            ray_actor_options={"num_cpus": 0.5},
        )
        serve.run(app, name="onepath", route_prefix="/onepath")
        for data, w in zip(images, want):
            r = httpx.post(
                f"http://127.0.0.1:{port}/onepath/v1/predict?faces=largest",  # rows per file
                content=data,
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got["age"], got["head"], got["rule"]) == (w["age"], w["head"], w["rule"])
            assert (
                got["interval"]["low"] == w["age_low"] and got["interval"]["high"] == w["age_high"]
            )
            for h in ("vanilla", "balanced"):
                assert got["heads"][h] == {"age": w[f"age_{h}"], "kl": w[f"kl_{h}"]}
    finally:
        serve.delete("onepath")
        serve.shutdown()
