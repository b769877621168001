"""Auth that fails closed (``require_auth``) and the alias-poll setting of ServeSettings."""

from __future__ import annotations

import pytest

from ageray.serving import ServeSettings


def test_require_auth_without_a_token_names_the_variable() -> None:
    s = ServeSettings.from_mapping({"require_auth": True, "auth_token_env": "MY_TOKEN"})
    for env in ({}, {"MY_TOKEN": ""}):
        with pytest.raises(ValueError, match="MY_TOKEN") as err:
            s.check_auth_configured(env)
        assert "require_auth" in str(err.value)
    s.check_auth_configured({"MY_TOKEN": "t0k"})  # a token: starts
    assert s.auth_token({"MY_TOKEN": "t0k"}) == "t0k"


def test_auth_is_optional_by_default() -> None:
    s = ServeSettings()
    assert s.require_auth is False
    s.check_auth_configured({})
    assert s.auth_token({}) is None


def test_require_auth_is_a_typed_user_config_key() -> None:
    assert ServeSettings.from_mapping({"require_auth": "true"}).require_auth is True
    with pytest.raises(Exception, match="require_auth"):
        ServeSettings.from_mapping({"require_auht": True})


@pytest.mark.parametrize(
    ("uri", "poll", "follows"),
    [
        ("models:/ageray@champion", 30, True),
        ("models:/ageray@champion", 0, False),
        ("models:/ageray/3", 30, False),  # a pinned version never moves
        ("/models/local", 30, False),
        (None, 30, False),
    ],
)
def test_follows_alias(uri: str | None, poll: float, follows: bool) -> None:
    s = ServeSettings.from_mapping({"model_uri": uri, "model_poll_s": poll})
    assert s.follows_alias() is follows


def test_model_poll_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="model_poll_s"):
        ServeSettings.from_mapping({"model_poll_s": -1})


def test_public_view_shows_the_flags_not_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGERAY_API_TOKEN", "s3cret")
    view = ServeSettings.from_mapping({"require_auth": True}).public()
    assert view["require_auth"] is True and view["auth"] is True
    assert "s3cret" not in repr(view)
