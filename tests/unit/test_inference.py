"""ageray.inference: the one prediction path of validation and evaluation, on a real tiny
routed model (no Ray, no shards: the loader is any iterable of batches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from datagen import make_tiny_model

from ageray import metrics as M
from ageray.inference import collect_predictions, merge_predictions, prediction_metrics


class Batches(list):
    """A loader: batches, and the skip counts a real loader keeps."""

    skipped: dict[str, int]


def loader(n: int, start: int = 0, batch: int = 3) -> Batches:
    gen = torch.Generator().manual_seed(start)
    out = Batches()
    for i in range(start, start + n, batch):
        k = min(batch, start + n - i)
        out.append(
            {
                "image": torch.randn(k, 3, 64, 64, generator=gen),
                "age": torch.arange(i, i + k, dtype=torch.float32) * 7 % 90,
                "age_std": torch.full((k,), 2.0),
                "key": [f"s{j:03d}" for j in range(i, i + k)],
            }
        )
    out.skipped = {"truncated": start + 1}
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from ageray.model import load_model

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    return load_model(Path(folder))[0]


def test_predictions_of_every_head_and_rule(model):
    model.train()
    preds = collect_predictions(model, loader(7), device=torch.device("cpu"))
    assert model.training  # the caller's mode is restored
    assert list(preds["_keys"]) == [f"s{j:03d}" for j in range(7)]
    for key in ("age", "age_std", "vanilla_age", "balanced_age", "routed_age", "bigger_age"):
        assert preds[key].shape == (7,), key
    assert preds["_skipped"] == {"truncated": 1}
    choice = preds["routed_choice"].astype(bool)
    # the smaller-KL rule answers with the head it chose; the bigger rule with the other
    want = np.where(choice, preds["balanced_age"], preds["vanilla_age"])
    np.testing.assert_allclose(preds["routed_age"], want, rtol=1e-5)
    assert np.array_equal(preds["bigger_choice"].astype(bool), ~choice)
    assert choice.any() or (~choice).any()


def test_ranks_merge_into_the_whole_split(model):
    cpu = torch.device("cpu")
    whole = collect_predictions(model, loader(6), device=cpu)
    first, second = (collect_predictions(model, loader(3, start=s), device=cpu) for s in (0, 3))
    merged = merge_predictions([first, second])
    assert list(merged["_keys"]) == [f"s{j:03d}" for j in range(6)]
    assert merged["_skipped"] == {"truncated": 1 + 4}  # rank 0 counted 1, rank 1 counted 4
    assert set(merged) == set(whole)
    # rank order kept: the first rank's batch is the whole split's first batch
    np.testing.assert_allclose(merged["vanilla_age"][:3], whole["vanilla_age"][:3], rtol=1e-5)
    np.testing.assert_array_equal(merged["routed_age"][3:], second["routed_age"])


def test_prediction_metrics_per_row():
    y = np.array([10.0, 20.0, 30.0, 70.0])
    preds = {
        "age": y,
        "vanilla_age": y + 2,
        "balanced_age": y - 1,
        "routed_age": y + np.array([0.0, 1.0, 0.0, -1.0]),
    }
    out = prediction_metrics(preds, aar_groups="lae", prefix="val")
    assert out["val_mae"] == pytest.approx(2.0)
    assert out["val_balanced_mae"] == pytest.approx(1.0)
    assert out["val_routed_mae"] == pytest.approx(0.5)
    assert out["val_routed_aar"] == pytest.approx(M.aar(y, preds["routed_age"], groups="lae"))
    assert out["val_samples"] == 4.0
    single = prediction_metrics({"age": y, "vanilla_age": y, "routed_age": y}, prefix="test")
    assert "test_routed_mae" not in single and single["test_mae"] == 0.0  # one head: no route
    assert prediction_metrics({"age": np.zeros(0)}) == {}
