"""Gender and race in the answers of a multi-task model, without Ray: the one inference
path's rows, the pyfunc model's DataFrame and Serve's JSON answer (checked against the
OpenAPI schema that ``/docs`` shows), for the parallel and the hybrid net."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ageray.config import Config, ModelConfig
from ageray.data.labels import GENDERS, RACES
from ageray.model import build_model, save_model

SIZE = 48


def tiny_multitask(folder: Path, multitask: str) -> Path:
    cfg = Config()
    cfg.data.image_size = SIZE
    cfg.model = ModelConfig(
        backbone="test_resnet", head="linear", formulation="mae", multitask=multitask
    )
    torch.manual_seed(0)
    return save_model(build_model(cfg), folder, cfg)


def faces(n: int = 3) -> list[bytes]:
    from ageray.data.synthetic import iter_synthetic

    return [r.image for r in iter_synthetic(num_samples=n, image_size=SIZE, seed=2)]


@pytest.mark.parametrize("multitask", ["parallel", "hybrid"])
def test_pyfunc_and_serve_answer_gender_and_race(multitask: str, tmp_path: Path) -> None:
    import jsonschema
    import pandas as pd

    from ageray.registry.pyfunc_model import AgeRayPyfunc
    from ageray.serving.model import build_prediction, load_served_model
    from ageray.serving.schema import PREDICTION_SCHEMA

    folder = tiny_multitask(tmp_path / multitask, multitask)
    images = faces()

    py = AgeRayPyfunc()
    py.load_context(SimpleNamespace(artifacts={"model": str(folder)}))
    frame = py.predict(None, pd.DataFrame({"image": images}))
    assert frame["error"].isna().all()
    for trait, names in (("gender", GENDERS), ("race", RACES)):
        probs = np.stack(frame[f"{trait}_probs"].to_numpy())
        assert probs.shape == (3, len(names))
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        assert frame[trait].tolist() == probs.argmax(1).tolist()
        assert frame[f"{trait}_label"].tolist() == [names[i] for i in probs.argmax(1)]

    served = load_served_model(str(folder), device="cpu")
    from ageray.serving.settings import Limits

    prepared = served.model_input(images[0], "face.jpg", Limits())
    rows = served.forward(prepared.tensor[None])
    answer = build_prediction(rows[0], served)
    jsonschema.Draft202012Validator(PREDICTION_SCHEMA).validate(answer)
    assert answer["gender"]["label"] in GENDERS and answer["race"]["label"] in RACES
    assert answer["gender"]["probs"] == pytest.approx(frame["gender_probs"][0], abs=1e-5)
    assert answer["race"]["label"] == frame["race_label"][0]


def test_age_only_models_answer_without_gender_and_race(tmp_path: Path) -> None:
    from ageray.inference import load_predictor

    cfg = Config()
    cfg.data.image_size = SIZE
    cfg.model = ModelConfig(backbone="test_resnet", head="linear", formulation="ldl")
    folder = save_model(build_model(cfg), tmp_path / "ldl", cfg)
    rows = load_predictor(str(folder)).predict(faces(1), keys=["a"])
    assert rows[0]["gender"] is None and rows[0]["race_label"] is None
    assert rows[0]["age"] is not None
