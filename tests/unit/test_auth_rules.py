"""Pure rules of authentication and limits: path normalisation, settings, JSON depth."""

from __future__ import annotations

import pytest

from server.auth import bearer_keys, is_protected, normalise_path, subprotocol_key
from server.limits import too_deep
from server.settings import SettingsError, load


@pytest.mark.parametrize(
    "path",
    [
        "/api/models",
        "//api//models",
        "/API/Models",
        "/api/models/",
        "/api%2Fmodels",
        "/api%252Fmodels",
        "/./api/models",
        "/healthz/../api/models",
        "/x/%2e%2e/api/models",
        "\\api\\models",
    ],
)
def test_every_spelling_normalises_to_one_path(path: str) -> None:
    assert normalise_path(path) == "/api/models"
    assert is_protected({"type": "http", "path": path})


@pytest.mark.parametrize("path", ["/metrics", "/METRICS/", "//metrics", "/api", "/api/ws"])
def test_protected(path: str) -> None:
    assert is_protected({"type": "http", "path": path})


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/index.html", "/app.js"])
def test_public(path: str) -> None:
    assert not is_protected({"type": "http", "path": path})
    assert is_protected({"type": "websocket", "path": path})  # every socket needs a key


def test_credential_parsing() -> None:
    assert bearer_keys([(b"authorization", b"Bearer abc")]) == ["abc"]
    assert bearer_keys([(b"authorization", b"Basic abc")]) == [""]
    assert subprotocol_key(["tokenrelay.v1", "tokenrelay.auth.YWJj"]) == ["abc"]
    assert subprotocol_key(["tokenrelay.auth.%%%"]) == [""]


def test_depth() -> None:
    assert not too_deep(b"[[[]]]", 3)
    assert too_deep(b"[[[[]]]]", 3)
    assert not too_deep(b'["[[[[[[", {"a": "]]]]]]{{{{"}]', 3)  # brackets in strings do not count
    assert not too_deep(b"[" + b"[]," * 1000 + b"[]]", 3)


def test_auth_and_limit_settings_are_validated_together(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "t.toml"
    path.write_text(
        '[auth]\nkeys = ["abc", "' + "A" * 64 + '"]\n'
        'origins = ["https://ok.example.com", "https://x.example.com/", "ftp://x", "*"]\n'
        "[limits]\nmax_messages = 0\nrequests_per_minute = -1\ntokens_per_minute = 0\n"
    )
    with pytest.raises(SettingsError) as raised:
        load(path, {})
    problems = raised.value.problems
    assert sum(p.startswith("auth.keys[") for p in problems) == 2
    assert sum(p.startswith("auth.origins[") for p in problems) == 3
    assert "limits.max_messages: expected a positive number" in problems
    assert "limits.requests_per_minute: expected zero or more" in problems
    assert not any("tokens_per_minute" in p for p in problems)  # 0 means unlimited
