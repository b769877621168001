"""ageray.registry on a real (sqlite) MLflow registry: parsing registry URIs, where an alias
points, and moving it with ``previous-<alias>`` kept for a rollback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ageray.registry import alias_version, move_alias, parse_model_uri


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("models:/ageray@champion", ("ageray", None, "champion")),
        ("models:/ageray/3", ("ageray", "3", None)),
        ("models:/ageray", ("ageray", None, None)),
    ],
)
def test_parse_model_uri(uri: str, parsed: tuple) -> None:
    assert parse_model_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["runs:/abc/model", "/models/local", "ageray@champion"])
def test_parse_model_uri_refuses_what_is_not_a_registry_uri(uri: str) -> None:
    with pytest.raises(ValueError, match="models:/<name>"):
        parse_model_uri(uri)


def test_move_alias_keeps_the_previous_version(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path), run_id=None)
    assert alias_version(client, "m", "champion") is None  # no champion yet
    assert alias_version(client, "nope", "champion") is None  # no such model either
    assert move_alias(client, "m", "champion", "1", previous_alias="previous-champion") is None
    assert alias_version(client, "m", "previous-champion") is None  # nothing before
    assert move_alias(client, "m", "champion", "2", previous_alias="previous-champion") == "1"
    assert alias_version(client, "m", "champion") == "2"
    assert alias_version(client, "m", "previous-champion") == "1"
    # moving onto the version it already names leaves previous-<alias> alone
    assert move_alias(client, "m", "champion", "2", previous_alias="previous-champion") == "2"
    assert alias_version(client, "m", "previous-champion") == "1"
