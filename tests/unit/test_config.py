"""ageray.config: YAML + overrides -> typed, validated Config; errors name the key."""

from __future__ import annotations

import pytest

from ageray.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    flatten,
    load_config,
    to_dict,
)


def test_defaults_are_a_valid_config() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.num_classes == 101
    assert cfg.data.augment.rrc_scale == (0.8, 1.0)


def test_overrides_are_coerced_to_declared_types() -> None:
    cfg = load_config(
        None,
        [
            "train.stage1.epochs=3",
            "data.augment.rrc_scale=[0.5, 0.9]",
            "train.stage2.mae_term=true",
            "model.pretrained=null",
            "run.seed=7",
            "train.stage1.optim.lr=1e-3",
        ],
    )
    assert cfg.train.stage1.epochs == 3 and isinstance(cfg.train.stage1.epochs, int)
    assert cfg.data.augment.rrc_scale == (0.5, 0.9)
    assert all(isinstance(v, float) for v in cfg.data.augment.rrc_scale)
    assert cfg.train.stage2.mae_term is True
    assert cfg.model.pretrained is None
    assert cfg.train.stage1.optim.lr == pytest.approx(1e-3)


def test_round_trip_through_dict_and_yaml(tmp_path) -> None:
    cfg = load_config(None, ["model.backbone=resnet50", "data.augment.rrc_ratio=[0.75, 1.25]"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_unknown_key_fails_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"model.backbon.*did you mean 'model.backbone'"):
        load_config(None, ["model.backbon=resnet50"])


def test_bad_values_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train.stage1.epochs: expected an integer"):
        load_config(None, ["train.stage1.epochs=three"])
    with pytest.raises(ConfigError, match=r"model.head: 'mlp' is not one of"):
        load_config(None, ["model.head=mlp"])
    with pytest.raises(ConfigError, match=r"rrc_scale: expected 2 values"):
        load_config(None, ["data.augment.rrc_scale=[0.5]"])


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match=r"loss\.name=sum .* needs model\.head=glae"):
        load_config(None, ["model.head=linear", "loss.name=sum"])
    with pytest.raises(ConfigError, match="formulation=mae predicts one number"):
        load_config(None, ["model.head=linear", "model.formulation=mae", "loss.name=base"])
    with pytest.raises(ConfigError, match="mae_term"):
        load_config(
            None,
            [
                "model.head=linear",
                "model.formulation=mae",
                "loss.name=mae",
                "train.stage2.mae_term=true",
            ],
        )


def test_missing_file_and_bad_override_syntax(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["no_equals_sign"])


def test_flatten_for_mlflow_params() -> None:
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    params = flatten(to_dict(load_config(None)))
    assert params["model.backbone"] == "resnet18"
    assert "train.stage2.optim.lr" in params


def test_gpu_path_settings_and_retired_keys() -> None:
    cfg = load_config(None, ["data.augment_on=device", "data.num_workers=auto", "train.compile=1"])
    assert (cfg.data.augment_on, cfg.data.num_workers, cfg.train.compile) == (
        "device",
        "auto",
        True,
    )
    assert load_config(None, ["data.num_workers=3"]).data.num_workers == 3
    with pytest.raises(ConfigError, match="augment_on"):
        load_config(None, ["data.augment_on=gpu"])
    # a config saved before model.dual_head was retired still loads (with a warning)
    with pytest.warns(UserWarning, match=r"model.dual_head' is retired"):
        old = config_from_dict(
            {"model": {"dual_head": False}, "train": {"stage2": {"enabled": True}}}
        )
    assert old.train.stage2.enabled
