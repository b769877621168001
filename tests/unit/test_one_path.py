"""The one inference path: the same faces through every caller give identical answers.

Real UTKFace faces when ../shared/data/utkface-dev.tar is there (read at run time), else
synthetic ones (the reason is in the test id). The faces are written as shards first, so
every path reads the very same bytes: batch prediction (the Ray Data batch function on the
shard reader's rows, as ``jobs.predict`` runs it), the pyfunc model, Serve's model (header
check, prepare, batched forward, the JSON answer: the code a replica runs), the evaluation
(shard stream) and training's validation (``plans.gather_split_predictions`` on the eval loader).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from faces import face_records, make_routed_model

from ageray.inference import load_predictor, quantile_ages, rows_to_table
from ageray.inference.sources import list_items, read_item

N = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from ageray.data.shards import write_shards

    root = tmp_path_factory.mktemp("one-path")
    records, origin = face_records(N)
    write_shards(records, root / "shards", splits={"test": 1.0}, progress=False, workers=1)
    model_dir = make_routed_model(root / "model", rule="learned")
    rows = [r for item in list_items(str(root / "shards")) for r in read_item(item)]
    assert len(rows) == N and all(r["error"] is None for r in rows)
    return SimpleNamespace(
        root=root, shards=str(root / "shards"), model=model_dir, rows=rows, origin=origin
    )


def _by_key(
    rows, fields=("age", "head", "age_vanilla", "kl_vanilla", "age_balanced", "kl_balanced")
):
    return {r["key"]: tuple(r[f] for f in fields) for r in rows}


def test_every_path_answers_identically(world) -> None:
    from ageray.config import Config
    from ageray.evaluation import eval_config, evaluate_model
    from ageray.inference.batch import BatchWorker
    from ageray.model import load_model
    from ageray.registry.pyfunc_model import AgeRayPyfunc
    from ageray.serving import Limits, build_prediction, load_served_model
    from ageray.training.context import LocalContext
    from ageray.training.plans import gather_split_predictions

    keys = [r["key"] for r in world.rows]
    images = [r["image"] for r in world.rows]

    # 1. batch prediction: the map_batches function on the reader's rows
    batch = pa.table({k: [r[k] for r in world.rows] for k in ("key", "source", "image", "error")})
    table = BatchWorker(str(world.model), threads=None)(batch)
    predicted = table.to_pylist()
    assert table.num_rows == N and all(r["error"] is None for r in predicted)
    assert all(r["rule"] == "learned" for r in predicted)
    ref = _by_key(predicted)

    # 2. the pyfunc model (MLflow), from the same bytes
    import pandas as pd

    py = AgeRayPyfunc()
    py.load_context(SimpleNamespace(artifacts={"model": str(world.model)}))
    frame = py.predict(None, pd.DataFrame({"key": keys, "image": images}))
    assert _by_key(frame.to_dict("records")) == ref

    # 3. Serve's model: header check + prepare per image, one batched forward, JSON answer
    served = load_served_model(str(world.model), "cpu")
    x = torch.stack([served.model_input(d, k, Limits()).tensor for d, k in zip(images, keys)])
    answers = [build_prediction(r, served) for r in served.forward(x)]
    serve_ref = {
        k: (
            a["age"],
            a["head"],
            *(a["heads"][h][f] for h in ("vanilla", "balanced") for f in ("age", "kl")),
        )
        for k, a in zip(keys, answers)
    }
    assert serve_ref == ref
    for a, r in zip(answers, predicted):
        assert (a["interval"]["low"], a["interval"]["high"]) == (r["age_low"], r["age_high"])

    # 4. the evaluation (shard stream -> collect_predictions), one batch like the others
    preds = evaluate_model(world.model, world.shards, "test", batch_size=N, num_workers=0)
    evaluated = {
        str(k): (
            float(preds["routed_age"][i]),
            "balanced" if preds["routed_choice"][i] else "vanilla",
            float(preds["vanilla_age"][i]),
            float(preds["vanilla_kl"][i]),
            float(preds["balanced_age"][i]),
            float(preds["balanced_kl"][i]),
        )
        for i, k in enumerate(preds["_keys"])
    }
    assert evaluated == ref

    # 5. training's validation: plans.gather_split_predictions on the eval loader, LocalContext
    model, info = load_model(world.model)
    cfg: Config = eval_config(info, world.shards, "test", batch_size=N)
    cfg.data.num_workers = 0
    val = gather_split_predictions(model, cfg, "test", LocalContext(), flip=True)
    validated = {
        str(k): (float(val["routed_age"][i]), float(val["vanilla_age"][i]))
        for i, k in enumerate(val["_keys"])
    }
    assert validated == {k: (v[0], v[2]) for k, v in ref.items()}
    print(f"one path: {N} {world.origin} faces, identical through 5 paths")


def test_unusable_images_are_rows_not_crashes(world) -> None:
    path = load_predictor(world.model)
    good = world.rows[0]["image"]
    rows = path.predict(
        [good, b"not an image", good[: len(good) // 3], b"", None, good],
        keys=["a", "b", "c", "d", "e", "f"],
        errors=[None, None, None, None, "unreadable: gone", None],
    )
    assert [r["key"] for r in rows] == ["a", "b", "c", "d", "e", "f"]
    errors = [r["error"] for r in rows]
    assert errors[0] is None and errors[5] is None
    assert errors[1].startswith("not_image") and errors[2].startswith("truncated")
    assert errors[3].startswith("empty") and errors[4] == "unreadable: gone"
    assert rows[0]["age"] == rows[5]["age"] and rows[1]["age"] is None
    table = rows_to_table(rows)
    assert table.num_rows == 6 and table.column("error").null_count == 2
    assert rows_to_table(rows[:1], distribution=True).schema.field("distribution")


def test_rows_carry_the_routed_distribution_and_interval(world) -> None:
    path = load_predictor(world.model)
    rows = path.predict([r["image"] for r in world.rows[:3]], distribution=True)
    for row in rows:
        dist = row["distribution"]
        assert dist.shape == (101,) and abs(float(dist.sum()) - 1.0) < 1e-4
        assert abs(float((np.arange(101) * dist).sum()) - row["age"]) < 1e-3
        lo, hi = quantile_ages(dist[None], 0.05)[0], quantile_ages(dist[None], 0.95)[0]
        assert (row["age_low"], row["age_high"]) == pytest.approx((lo, hi), abs=1e-9)
        assert lo <= row["age"] <= hi
        want = (1 - row["weight_balanced"]) * row["age_vanilla"] + row["weight_balanced"] * row[
            "age_balanced"
        ]
        assert abs(row["age"] - want) < 1e-4  # the learned rule mixes the heads


def test_quantile_ages() -> None:
    one_hot = np.zeros((1, 101))
    one_hot[0, 30] = 1.0
    assert quantile_ages(one_hot, 0.05)[0] == pytest.approx(29.55)
    assert quantile_ages(one_hot, 0.95)[0] == pytest.approx(30.45)
    uniform = np.full((1, 101), 1 / 101)
    assert quantile_ages(uniform, 0.5)[0] == pytest.approx(50.0)
    assert quantile_ages(uniform, 0.05)[0] == pytest.approx(101 * 0.05 - 0.5)
    two = np.zeros((1, 101))
    two[0, [10, 60]] = 0.5
    assert quantile_ages(two, 0.05)[0] < 11 and quantile_ages(two, 0.95)[0] > 59
    edge = np.zeros((1, 101))
    edge[0, 0] = 1.0
    assert quantile_ages(edge, 0.05)[0] == 0.0  # clipped to the label range
    with pytest.raises(ValueError, match="probabilities"):
        quantile_ages(np.zeros(5), 0.5)


def test_aligned_model_prepares_like_the_shard_writer(tmp_path: Path) -> None:
    """A model trained on aligned faces: the path aligns (FaceAligner as the shard writer),
    then decodes the crop; ``align=False`` turns it off; the face is in the row."""
    from datagen import make_tiny_model

    from ageray.data.align import FaceAligner
    from ageray.data.synthetic import iter_synthetic
    from ageray.data.transforms import decode_image, preprocess_for_eval
    from ageray.inference import InputSpec

    meta = {"align": True, "align_options": {"detector": "haar", "output_size": 112}}
    folder = make_tiny_model(tmp_path / "m", meta=meta)
    face = next(iter(iter_synthetic(num_samples=1, image_size=160))).image
    path = load_predictor(folder)
    assert path.aligner is not None
    prep = path.prepare(face, "face")
    crop, _ = FaceAligner(detector="haar", output_size=112, on_no_face="keep").align_bytes(face)
    spec = InputSpec.from_info(path.info)
    want = preprocess_for_eval([decode_image(crop, target_size=64)], spec.data_config())[0]
    assert torch.equal(prep.tensor, want) and set(prep.face) >= {"found", "box"}
    row = path.predict([face])[0]
    assert row["face_found"] is not None
    plain = load_predictor(folder, align=False)
    assert plain.aligner is None and plain.predict([face])[0]["face_found"] is None
