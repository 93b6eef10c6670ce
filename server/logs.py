"""Logging: one line per request and per stream, as text or JSON lines, never with secrets.

Lines carry their data as `fields` (passed in `extra`); the text form prints them as
`key=value` with strings JSON-quoted (so client-chosen text cannot forge a log line), the JSON
form as one object per line. Nothing logs API keys, `Authorization` headers or message content
(content only with `log_content = true`, at debug level); whatever a library writes, each
formatted line, traceback included, goes through `server.redaction` last.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from server.redaction import redact_credentials

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class TextFormatter(logging.Formatter):
    """`2026-11-24T07:00:00.123Z INFO tokenrelay.stream stream request_id="…" outcome="…"`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}"
        line += f" {record.getMessage()}"
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_encode(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_credentials(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return redact_credentials(_encode(out))


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn and the gateway's own loggers."""
    formatter = "json" if fmt == "json" else "text"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"()": "server.logs.TextFormatter"},
            "json": {"()": "server.logs.JsonFormatter"},
        },
        "filters": {"secrets": {"()": "server.redaction.SecretFilter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["secrets"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "tokenrelay": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
        # Any other library's warnings and errors (asyncio, websockets, …) go through the same
        # formatter and redaction, rather than Python's bare last-resort handler.
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
