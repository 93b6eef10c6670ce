"""`tokenrelay create-key`, and `serve` refusing an open non-loopback bind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.auth import digest
from server.cli import _is_loopback
from tests.support.process import CLEAN_ENV


def tokenrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_create_key_prints_a_key_and_its_digest() -> None:
    done = tokenrelay("create-key")
    assert done.returncode == 0
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    key, printed = lines["key"].strip(), lines["digest"].strip()
    assert digest(key) == printed and len(key) > 40
    assert tokenrelay("create-key").stdout != done.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_serve_refuses_an_open_non_loopback_bind(host: str) -> None:
    done = tokenrelay("serve", "--host", host, "--port", "1")
    assert done.returncode == 2
    assert "without gateway keys" in done.stderr and "--allow-unauthenticated" in done.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("example.com", False),
    ],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
