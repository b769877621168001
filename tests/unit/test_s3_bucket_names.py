"""S3 bucket-name rules, checked before any request (no server needed)."""

from __future__ import annotations

import pytest

from ageray.data import storage


@pytest.mark.parametrize(
    "name", ["abc", "ageray-test", "my.bucket.name", "a" * 63, "0bucket9", "mlflow"]
)
def test_valid_names_pass(name: str) -> None:
    assert storage.bucket_name_problem(name) is None
    assert storage.split_s3(f"s3://{name}/k/x") == (name, "k/x")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("a" * 64, "64 characters long"),
        ("UPPER", "contains 'EPRU'"),
        ("under_score", "contains '_'"),
        ("end-", "start and end"),
        (".start", "start and end"),
        ("a..b", "two adjacent periods"),
        ("10.0.0.1", "IP address"),
        ("xn--bucket", "reserved prefix 'xn--'"),
        ("bucket-s3alias", "reserved suffix '-s3alias'"),
    ],
)
def test_invalid_names_say_which_rule(name: str, rule: str) -> None:
    assert rule in (storage.bucket_name_problem(name) or "")
    with pytest.raises(ValueError, match=f"'{name}' is not a valid S3 bucket name"):
        storage.split_s3(f"s3://{name}/prefix")


def test_credentials_in_a_url_are_not_judged_as_a_bucket() -> None:
    """``s3://KEY:SECRET@bucket`` is a form redaction handles; it must not raise here."""
    assert storage.split_s3("s3://AKIA:secret@bucket/p") == ("AKIA:secret@bucket", "p")
