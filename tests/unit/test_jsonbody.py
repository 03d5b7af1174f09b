"""Request bodies: JSON within a small nesting depth, else one clear refusal."""

from __future__ import annotations

import pytest

from gateway.http import jsonbody


def test_ordinary_bodies_parse() -> None:
    assert jsonbody.parse(b'{"name": "laptop", "apps": ["web"]}') == {
        "name": "laptop",
        "apps": ["web"],
    }
    assert jsonbody.parse(b"[" * 32 + b"]" * 32) is not None


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,  # the review's body: json's decoder raised RecursionError (a 500)
        b"[" * 33 + b"]" * 33,  # valid JSON, nested past the bound
        b'{"a":' * 40 + b"1" + b"}" * 40,
    ],
)
def test_regression_deep_nesting_is_refused_with_one_line(raw: bytes) -> None:
    with pytest.raises(jsonbody.BadBody, match="nests deeper than 32 levels"):
        jsonbody.parse(raw)


def test_not_json_is_refused() -> None:
    with pytest.raises(jsonbody.BadBody, match="must be JSON"):
        jsonbody.parse(b"{nope")
