"""Credentials are removed from every formatted log line, tracebacks included."""

from __future__ import annotations

import logging
import sys

import pytest

from server.auth import new_key
from server.logs import JsonFormatter, TextFormatter
from server.redaction import redact_credentials

KEY = new_key()
UPSTREAM = "sk-proj-" + "A1b2C3d4" * 6


@pytest.mark.parametrize(
    "text",
    [
        f'127.0.0.1:5000 - "WebSocket /api/ws?token={KEY}" 401',
        f"GET /api/models?access_token={KEY[4:]}&x=1",
        f"< X-Auth-Token: {KEY[4:]}",
        f"< Sec-WebSocket-Protocol: tokenrelay.v1, {KEY}",
        f"< authorization: bEaReR {KEY[4:]}",
        f"upstream said: invalid key {UPSTREAM}",
        f"Tokenrelay.Auth.{KEY[4:]}",
    ],
)
def test_key_shaped_strings_are_redacted(text: str) -> None:
    cleaned = redact_credentials(text)
    assert KEY[4:] not in cleaned and UPSTREAM[3:] not in cleaned
    assert "[redacted]" in cleaned


def test_ordinary_text_is_left_alone() -> None:
    text = 'stream request_id="abc" outcome="completed" model="oai/task-runner-12345678"'
    assert redact_credentials(text) == text


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_tracebacks_are_redacted(formatter: logging.Formatter) -> None:
    try:
        raise ValueError(f"bad header value {KEY} for {UPSTREAM}")
    except ValueError:
        record = logging.LogRecord(
            "uvicorn.error", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    line = formatter.format(record)
    assert "ValueError" in line and "[redacted]" in line
    assert KEY[4:] not in line and UPSTREAM[3:] not in line


def test_other_libraries_log_through_the_same_redaction() -> None:
    """A library logger the gateway does not name (asyncio here) is formatted and redacted."""
    import subprocess

    code = (
        "import logging, logging.config, sys\n"
        "from server.logs import log_config\n"
        "logging.config.dictConfig(log_config('info', 'text'))\n"
        "try:\n"
        f"    raise RuntimeError('upstream refused {UPSTREAM}')\n"
        "except RuntimeError:\n"
        f"    logging.getLogger('asyncio').exception('task failed with {KEY}')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert " ERROR asyncio task failed with [redacted]" in done.stderr, done.stderr
    assert "RuntimeError" in done.stderr
    assert KEY[4:] not in done.stderr and UPSTREAM[3:] not in done.stderr
