"""The `tokenrelay` command as a user runs it: a real process on a loopback port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.support.process import CLEAN_ENV, serve_process


def tokenrelay(*args: str) -> list[str]:
    return [sys.executable, "-m", "server", *args]


@pytest.fixture
def served() -> Iterator[str]:
    with serve_process() as process:  # no configuration, no keys: the README's first command
        yield process.url


def test_serve_with_no_configuration_answers_with_the_demo_provider(served: str) -> None:
    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "ping from a user"}]}
    response = httpx2.post(served + "/api/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert "ping from a user" in response.json()["choices"][0]["message"]["content"]
    models = httpx2.get(served + "/api/models").json()
    assert [m["id"] for m in models["data"]] == ["demo/echo", "demo/reasoner", "demo/tools"]


def test_bad_configuration_fails_fast_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        '[server]\nport = "eighty"\n\n'
        '[[providers]]\nname = "a"\nkind = "openai"\nbase_url = "ftp://nowhere"\n'
        'api_key_env = "TOKENRELAY_TEST_MISSING_KEY"\n\n'
        '[[providers]]\nname = "b"\nkind = "martian"\n'
    )
    for command in ("check-config", "serve"):
        result = subprocess.run(
            tokenrelay(command, "--config", str(config)),
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert "server.port: Expected int, got str" in result.stderr
        assert "providers[1].kind: expected one of" in result.stderr
        assert "providers[0]" not in result.stderr or "base_url" in result.stderr


def test_check_config_reports_semantic_problems_together(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        '[[providers]]\nname = "a"\nkind = "openai"\nbase_url = "ftp://nowhere"\n'
        'api_key_env = "TOKENRELAY_TEST_MISSING_KEY"\nidle_timeout = -1\n\n'
        '[[providers]]\nname = "a"\nkind = "anthropic"\n'
    )
    result = subprocess.run(
        tokenrelay("check-config", "--config", str(config)),
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    for problem in (
        "providers[0].base_url: expected an http(s) URL",
        "providers[0].idle_timeout: expected a positive number of seconds",
        "providers[0].api_key_env: environment variable TOKENRELAY_TEST_MISSING_KEY is not set",
        "providers[1].name: 'a' is used by another provider",
        "providers[1].api_key_env: required for a 'anthropic' provider without base_url",
    ):
        assert problem in result.stderr
