"""The `[catalog]` and `[classifier]` settings tables."""

from __future__ import annotations

import pytest

from server.settings import SettingsError, load


def test_defaults_classify_in_process() -> None:
    settings = load(None, {})
    assert settings.classifier.address is None
    assert settings.classifier.deadline > 0
    assert (settings.catalog.ttl, settings.catalog.retry) == (300.0, 15.0)


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "classifier.internal:443", "[::1]:50051"])
def test_addresses(address: str) -> None:
    settings = load(None, {"TOKENRELAY_CLASSIFIER__ADDRESS": address})
    assert settings.classifier.address == address


def test_every_problem_is_reported() -> None:
    environ = {
        "TOKENRELAY_CLASSIFIER__ADDRESS": "http://127.0.0.1",
        "TOKENRELAY_CLASSIFIER__DEADLINE": "0",
        "TOKENRELAY_CATALOG__TTL": "-1",
        "TOKENRELAY_CATALOG__RETRY": "0",
    }
    with pytest.raises(SettingsError) as caught:
        load(None, environ)
    assert sorted(caught.value.problems) == [
        "catalog.retry: expected a positive number of seconds (from TOKENRELAY_CATALOG__RETRY)",
        "catalog.ttl: expected a positive number of seconds (from TOKENRELAY_CATALOG__TTL)",
        "classifier.address: expected host:port, e.g. 127.0.0.1:50051"
        " (from TOKENRELAY_CLASSIFIER__ADDRESS)",
        "classifier.deadline: expected a positive number of seconds"
        " (from TOKENRELAY_CLASSIFIER__DEADLINE)",
    ]


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(SettingsError) as caught:
        load(None, {"TOKENRELAY_CLASSIFIER__ADRESS": "127.0.0.1:1"})
    assert caught.value.problems == [
        "classifier.adress: unknown setting; did you mean 'address'?"
        " (from TOKENRELAY_CLASSIFIER__ADRESS)"
    ]
